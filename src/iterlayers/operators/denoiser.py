"""A diffusion-style denoiser read as an iterated operator (Zappala et al., arXiv 2310.01618, Sec. 4 / B.1).

Diffusion sampling repeatedly applies a learned denoiser and mixes its output with the current state; the
paper reads this as (relaxed) Picard iteration of the denoising operator towards a fixed point on the data
manifold. On 1-D signals (MNIST-1D) with an observation y = x + sigma * eps:

    T(z, y) = z + D([z, y])              (form="residual"; D: a small 1-D conv net, a correction to z)
    T(z, y) = y + D([z, y])              (form="injected": the observation injected, z enters through D only)
    z_0 = y,   z_{n+1} = a z_n + (1 - a) T(z_n, y)

trained end-to-end through N iterations on ||z_N - x||^2; the same network with N = 1 is one denoising pass.
The residual form's Jacobian in z is I + J_D, about 1 in norm (observed rate about 0.98); the injected form's
is J_D alone, which a Jacobian penalty can keep below 1, making T a contraction (see ``transformer``).
"""
from __future__ import annotations

import torch
from torch import nn

from iterlayers import _validate as V
from iterlayers.errors import ShapeMismatchError, ValidationError

from .picard import PicardIteration
from .transformer import FORMS

__all__ = ["DenoisingOperator", "IterativeDenoiser"]


class DenoisingOperator(nn.Module):
    """T(z, y) = z + D([z, y]) (``form="residual"``) or y + D([z, y]) (``"injected"``) on signals [B, L]."""

    def __init__(self, *, channels: int = 32, kernel_size: int = 5, depth: int = 3, form: str = "residual"):
        super().__init__()
        self.form = V.choice(form, "form", FORMS, where="DenoisingOperator")
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValidationError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if depth < 2:
            raise ValidationError(f"depth must be >= 2, got {depth!r}")
        pad = kernel_size // 2
        layers: list[nn.Module] = [nn.Conv1d(2, channels, kernel_size, padding=pad), nn.GELU()]
        for _ in range(depth - 2):
            layers += [nn.Conv1d(channels, channels, kernel_size, padding=pad), nn.GELU()]
        layers.append(nn.Conv1d(channels, 1, kernel_size, padding=pad))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        base = z if self.form == "residual" else y
        return base + self.net(torch.stack([z, y], dim=1)).squeeze(1)

    def extra_repr(self) -> str:
        return "T(z, y) = z + D([z, y])" if self.form == "residual" else "T(z, y) = y + D([z, y])"


class IterativeDenoiser(nn.Module):
    """Relaxed Picard iteration of a learned denoising operator, started from the noisy signal
    (``backward``, ``tol``, ``solver``: see :class:`PicardIteration`)."""

    def __init__(self, *, max_iter: int = 4, alpha: float = 0.5, eval_max_iter: int | None = None,
                 channels: int = 32, kernel_size: int = 5, depth: int = 3, form: str = "residual",
                 backward: str = "unrolled", tol: float | None = None, solver: str = "picard"):
        super().__init__()
        self.operator = DenoisingOperator(channels=channels, kernel_size=kernel_size, depth=depth, form=form)
        self.picard = PicardIteration(self.operator, alpha=alpha, max_iter=max_iter, eval_max_iter=eval_max_iter,
                                      backward=backward, tol=tol, solver=solver)

    def inject(self, y: torch.Tensor) -> torch.Tensor:
        """u = y: the observation every step sees."""
        if y.dim() != 2:
            raise ShapeMismatchError(f"y must be a batch of 1-D signals [B, L], got {tuple(y.shape)}")
        return y

    def start(self, u: torch.Tensor) -> torch.Tensor:
        """z_0 = y."""
        return u

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The estimate is the state."""
        return z

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        u = self.inject(y)
        return self.decode(self.picard(u, z0=self.start(u)))

    def extra_repr(self) -> str:
        return "z_0 = y, z_{n+1} = a z_n + (1 - a) T(z_n, y)"
