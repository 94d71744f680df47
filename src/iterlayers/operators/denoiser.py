"""A diffusion-style denoiser read as an iterated operator (Zappala et al., arXiv 2310.01618, Sec. 4 / B.1).

Diffusion sampling repeatedly applies a learned denoiser and mixes its output with the current state; the
paper reads this as (relaxed) Picard iteration of the denoising operator towards a fixed point on the data
manifold. On 1-D signals (MNIST-1D) with an observation y = x + sigma * eps:

    T(z, y) = z + D([z, y])              (D: a small 1-D conv net; predicts a correction to the estimate z)
    z_0 = y,   z_{n+1} = a z_n + (1 - a) T(z_n, y)

trained end-to-end through N iterations on ||z_N - x||^2; the same network with N = 1 is one denoising pass.
"""
from __future__ import annotations

import torch
from torch import nn

from .picard import PicardIteration

__all__ = ["DenoisingOperator", "IterativeDenoiser"]


class DenoisingOperator(nn.Module):
    """T(z, y) = z + D([z, y]) on signals of shape [B, L]."""

    def __init__(self, *, channels: int = 32, kernel_size: int = 5, depth: int = 3):
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth!r}")
        pad = kernel_size // 2
        layers: list[nn.Module] = [nn.Conv1d(2, channels, kernel_size, padding=pad), nn.GELU()]
        for _ in range(depth - 2):
            layers += [nn.Conv1d(channels, channels, kernel_size, padding=pad), nn.GELU()]
        layers.append(nn.Conv1d(channels, 1, kernel_size, padding=pad))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return z + self.net(torch.stack([z, y], dim=1)).squeeze(1)

    def extra_repr(self) -> str:
        return "T(z, y) = z + D([z, y])"


class IterativeDenoiser(nn.Module):
    """Relaxed Picard iteration of a learned denoising operator, started from the noisy signal."""

    def __init__(self, *, max_iter: int = 4, alpha: float = 0.5, eval_max_iter: int | None = None,
                 channels: int = 32, kernel_size: int = 5, depth: int = 3):
        super().__init__()
        self.operator = DenoisingOperator(channels=channels, kernel_size=kernel_size, depth=depth)
        self.picard = PicardIteration(self.operator, alpha=alpha, max_iter=max_iter, eval_max_iter=eval_max_iter)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 2:
            raise ValueError(f"y must be a batch of 1-D signals [B, L], got {tuple(y.shape)}")
        return self.picard(y, z0=y)

    def extra_repr(self) -> str:
        return "z_0 = y, z_{n+1} = a z_n + (1 - a) T(z_n, y)"
