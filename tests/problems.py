"""The zoo of fixed-point problems every solver and gradient mode is tested on.

Each problem knows its exact answer where one exists, so tests compare against closed forms, not against
another run of the code under test.
"""
from __future__ import annotations

import torch
from torch import nn


def random_matrix(n: int, norm: float, *, seed: int = 0, dtype=torch.float64, symmetric: bool = False):
    """A random ``n x n`` matrix with spectral norm ``norm``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=dtype)
    if symmetric:
        A = A + A.T
    return norm * A / torch.linalg.matrix_norm(A, 2)


class LinearCell(nn.Module):
    """``f(z, x) = A z + x``; fixed point ``(I - A)^{-1} x``."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, z, x):
        return z @ self.A.T + x

    def exact(self, x):
        n = self.A.shape[0]
        I = torch.eye(n, dtype=self.A.dtype)
        return torch.linalg.solve(I - self.A.detach(), x.T).T


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + U x + b)``, a ``||W||``-contraction (tanh is 1-Lipschitz)."""

    def __init__(self, n: int, d: int | None = None, *, norm: float = 0.8, seed: int = 0, dtype=torch.float64):
        super().__init__()
        d = n if d is None else d
        g = torch.Generator().manual_seed(seed + 1)
        self.W = nn.Parameter(random_matrix(n, norm, seed=seed, dtype=dtype))
        self.U = nn.Parameter(torch.randn(n, d, generator=g, dtype=dtype) / d**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class ConvCell(nn.Module):
    """A small convolutional cell ``tanh(conv(z) + x)`` made contractive by scaling its kernel."""

    def __init__(self, channels: int = 3, *, norm: float = 0.5, seed: int = 0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype)
        with torch.no_grad():
            # ||conv||_2 <= ||kernel||_1 summed over taps and input channels: scale below that bound.
            self.conv.weight.mul_(norm / self.conv.weight.abs().sum(dim=(1, 2, 3)).max())

    def forward(self, z, x):
        return torch.tanh(self.conv(z) + x)


class ShiftCell(nn.Module):
    """``f(z) = z + c``: no fixed point at all (every residual equals ``c``)."""

    def forward(self, z, x):
        return z + x


def expanding_cell(n: int = 5, factor: float = 1.5, seed: int = 0):
    """A linear cell with spectral radius ``factor > 1``: Picard iteration diverges."""
    A = torch.eye(n, dtype=torch.float64) * factor
    return LinearCell(A)


class BatchNormCell(nn.Module):
    """``tanh(0.5 bn(W z) + x)`` with a batch norm: couples rows in train mode and updates running statistics."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, z, x):
        return torch.tanh(0.5 * self.bn(self.lin(z)) + x)


class PairCell(nn.Module):
    """A tuple state ``(u, v) -> (tanh(a v + x), tanh(a u))`` with one float64 parameter ``a = 0.5``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, z, x):
        u, v = z
        return torch.tanh(self.a * v + x), torch.tanh(self.a * u)
