"""Energies minimised by algorithm ("reasoning") layers.

Chen, Zhang, Reisinger, Song, *Understanding Deep Architectures with Reasoning Layer*, NeurIPS 2020
(arXiv 2006.13401): a hybrid model is ``x -> E_theta(x, .) -> Alg^k -> y^k`` where the neural module
produces an energy over the output ``y`` and the algorithm layer runs ``k`` steps of an optimiser on it.

Two levels of objects live here:

* an :class:`Energy` is an ``nn.Module`` ``E(x, y)``; ``energy.bind(x)`` evaluates the neural part once
  and returns a :class:`BoundEnergy` ``y -> E(x, y)`` for a batch;
* a :class:`BoundEnergy` gives ``value(y)`` [B] and ``grad(y)`` [B, n] (``grad_y E``); the algorithm
  layers only ever talk to bound energies.

Quadratics (sign convention of the paper): ``E(y) = 1/2 y^T Q y - b^T y``, ``grad = Q y - b``,
minimiser ``y* = Q^{-1} b``.  :class:`QuadraticEnergy` keeps ``Q(x)`` symmetric positive definite with
spectrum in ``[mu, L]`` (so the condition number ``L / mu`` is a knob), as in the paper's experiment:
``Q = R diag(e) R^T`` with ``e = [L, mu + (L - mu) softmax(MLP(x)), mu]``.

Non-smooth terms for proximal layers: :class:`L1Penalty` (``lam ||y||_1``, prox = soft threshold),
:class:`NonnegativeConstraint` and :class:`BoxConstraint` (indicators, prox = projection).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from iterlayers.errors import OptionTypeError, ValidationError

__all__ = [
    "BoundEnergy",
    "Quadratic",
    "AutogradBound",
    "Energy",
    "QuadraticEnergy",
    "AutogradEnergy",
    "Regularizer",
    "L1Penalty",
    "NonnegativeConstraint",
    "BoxConstraint",
    "random_rotation",
    "spd_from_eigs",
]


def _check_batch_vector(y: Tensor, name: str = "y") -> None:
    if not isinstance(y, Tensor):
        raise OptionTypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 2:
        raise ValidationError(f"{name} must have shape [batch, n], got {tuple(y.shape)}")


class BoundEnergy:
    """An energy ``y -> E(y)`` for a fixed batch of inputs (the neural part already evaluated)."""

    dim: int

    def value(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def grad(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def zeros(self) -> Tensor:
        """The default initial iterate ``y_0 = 0`` (the paper's choice)."""
        raise NotImplementedError


class Quadratic(BoundEnergy):
    """``E(y) = 1/2 y^T Q y - b^T y`` per sample, ``Q`` [B, n, n] symmetric, ``b`` [B, n].

    ``grad E(y) = Q y - b``; for SPD ``Q`` the minimiser is ``Q^{-1} b``.
    """

    def __init__(self, Q: Tensor, b: Tensor):
        if not isinstance(Q, Tensor) or not isinstance(b, Tensor):
            raise OptionTypeError("Q and b must be torch.Tensors")
        if Q.dim() != 3 or Q.shape[-1] != Q.shape[-2]:
            raise ValidationError(f"Q must have shape [batch, n, n], got {tuple(Q.shape)}")
        _check_batch_vector(b, "b")
        if b.shape[0] != Q.shape[0] or b.shape[1] != Q.shape[1]:
            raise ValidationError(f"b of shape {tuple(b.shape)} does not match Q of shape {tuple(Q.shape)}")
        if Q.dtype != b.dtype:
            raise OptionTypeError(f"Q and b must share a dtype, got {Q.dtype} and {b.dtype}")
        self.Q, self.b = Q, b
        self.dim = b.shape[1]

    def value(self, y: Tensor) -> Tensor:
        Qy = torch.einsum("bij,bj->bi", self.Q, y)
        return 0.5 * (y * Qy).sum(-1) - (self.b * y).sum(-1)

    def grad(self, y: Tensor) -> Tensor:
        return torch.einsum("bij,bj->bi", self.Q, y) - self.b

    def minimizer(self) -> Tensor:
        """Exact ``y* = Q^{-1} b`` (Cholesky solve)."""
        chol = torch.linalg.cholesky(self.Q)
        return torch.cholesky_solve(self.b.unsqueeze(-1), chol).squeeze(-1)

    def zeros(self) -> Tensor:
        return torch.zeros_like(self.b)


class AutogradBound(BoundEnergy):
    """``E(y) = fn(y)`` for any differentiable ``fn: [B, n] -> [B]``; gradient by autograd.

    The gradient keeps its graph when autograd is recording, so layers built on it can be trained.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], like: Tensor):
        _check_batch_vector(like, "like")
        self.fn, self._like = fn, like
        self.dim = like.shape[1]

    def value(self, y: Tensor) -> Tensor:
        return self.fn(y)

    def grad(self, y: Tensor) -> Tensor:
        recording = torch.is_grad_enabled()
        with torch.enable_grad():
            y_ = y if y.requires_grad else y.detach().requires_grad_(True)
            e = self.fn(y_)
            if e.dim() != 1 or e.shape[0] != y.shape[0]:
                raise ValidationError(f"energy must return shape [batch], got {tuple(e.shape)}")
            (g,) = torch.autograd.grad(e.sum(), y_, create_graph=recording)
        return g if recording else g.detach()

    def zeros(self) -> Tensor:
        return torch.zeros_like(self._like)


class Energy(nn.Module):
    """A (possibly learned) energy ``E(x, y)``; :meth:`bind` returns the per-batch energy in ``y``."""

    def bind(self, x: Tensor) -> BoundEnergy:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Energy values ``E(x, y)`` [B]."""
        return self.bind(x).value(y)

    def grad(self, x: Tensor, y: Tensor) -> Tensor:
        """``grad_y E(x, y)`` [B, n]."""
        return self.bind(x).grad(y)


def random_rotation(batch: int, n: int, *, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """Haar-random rotations [batch, n, n] (QR of a Gaussian with sign fix, det = +1)."""
    g = torch.randn(batch, n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    neg = torch.linalg.det(q) < 0
    q[neg, :, 0] = -q[neg, :, 0]  # flip one column: still Haar on SO(n)
    return q.to(dtype)


def spd_from_eigs(R: Tensor, e: Tensor) -> Tensor:
    """``Q = R diag(e) R^T`` for rotations ``R`` [B, n, n] and eigenvalues ``e`` [B, n]."""
    return (R * e.unsqueeze(-2)) @ R.transpose(-1, -2)


class QuadraticEnergy(Energy):
    """Learned quadratic energy with controlled spectrum (the paper's experimental energy).

    Input ``x = (u, R, b)``: features ``u`` [B, d_in], a rotation ``R`` [B, n, n] and a linear term
    ``b`` [B, n] (as in the reference setting, ``R`` and ``b`` are part of the input and only the
    eigenvalues are learned).  Eigenvalues::

        e(u) = [L, mu + (L - mu) softmax(MLP(u)), mu]       (n - 2 middle entries)

    so every ``Q(u) = R diag(e(u)) R^T`` is SPD with ``mu = lambda_min`` and ``L = lambda_max`` exactly
    (``pin_extremes=True``, the paper's choice) or with all eigenvalues ``mu + (L - mu) sigmoid(.)``
    inside ``[mu, L]`` (``pin_extremes=False``).

    Options: ``hidden`` — tuple of hidden widths of the ReLU MLP (``()`` = linear map, the paper's
    "width 0"); ``mu``, ``L`` with ``0 < mu <= L``.
    """

    def __init__(self, dim_in: int, dim: int, *, hidden: tuple[int, ...] = (16,), mu: float = 0.1,
                 L: float = 1.0, pin_extremes: bool = True):
        super().__init__()
        if not (isinstance(dim_in, int) and dim_in > 0):
            raise ValidationError(f"dim_in must be a positive int, got {dim_in!r}")
        if not (isinstance(dim, int) and dim >= (3 if pin_extremes else 1)):
            raise ValidationError(f"dim must be an int >= {3 if pin_extremes else 1}, got {dim!r}")
        hidden = tuple(hidden)
        if any((not isinstance(h, int)) or h < 0 for h in hidden):
            raise ValidationError(f"hidden must be a tuple of non-negative ints, got {hidden!r}")
        if not (0 < mu <= L):
            raise ValidationError(f"need 0 < mu <= L, got mu={mu!r}, L={L!r}")
        self.dim_in, self.dim, self.hidden = dim_in, dim, tuple(h for h in hidden if h > 0)
        self.mu, self.L, self.pin_extremes = float(mu), float(L), bool(pin_extremes)
        layers: list[nn.Module] = []
        prev = dim_in
        for h in self.hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, dim - 2 if pin_extremes else dim))
        self.net = nn.Sequential(*layers)

    def eigenvalues(self, u: Tensor) -> Tensor:
        """Spectrum ``e(u)`` [B, n], every entry in ``[mu, L]``."""
        z = self.net(u)
        if not self.pin_extremes:
            return self.mu + (self.L - self.mu) * torch.sigmoid(z)
        mid = self.mu + (self.L - self.mu) * torch.softmax(z, dim=-1)
        ones = torch.ones_like(mid[:, :1])
        return torch.cat([self.L * ones, mid, self.mu * ones], dim=-1)

    def bind(self, x) -> Quadratic:
        if not (isinstance(x, (tuple, list)) and len(x) == 3):
            raise OptionTypeError("QuadraticEnergy expects x = (u, R, b)")
        u, R, b = x
        if u.dim() != 2 or u.shape[1] != self.dim_in:
            raise ValidationError(f"u must have shape [batch, {self.dim_in}], got {tuple(u.shape)}")
        if R.shape[-2:] != (self.dim, self.dim) or b.shape[-1] != self.dim:
            raise ValidationError(f"R must be [batch, {self.dim}, {self.dim}] and b [batch, {self.dim}]")
        return Quadratic(spd_from_eigs(R, self.eigenvalues(u)), b)

    def extra_repr(self) -> str:
        return (f"dim_in={self.dim_in}, dim={self.dim}, hidden={self.hidden}, mu={self.mu}, L={self.L}, "
                f"pin_extremes={self.pin_extremes}")


class AutogradEnergy(Energy):
    """Any differentiable energy ``E(x, y) = fn(x, y)`` -> [B]; gradients in ``y`` by autograd.

    ``fn`` may be an ``nn.Module`` (its parameters are registered and trained).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], *, dim: int):
        super().__init__()
        if not callable(fn):
            raise OptionTypeError(f"fn must be callable, got {type(fn).__name__}")
        if not (isinstance(dim, int) and dim > 0):
            raise ValidationError(f"dim must be a positive int, got {dim!r}")
        self.fn, self.dim = fn, dim

    def bind(self, x: Tensor) -> AutogradBound:
        batch = x.shape[0]
        like = torch.zeros(batch, self.dim, dtype=x.dtype, device=x.device)
        return AutogradBound(lambda y: self.fn(x, y), like)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Regularizer(nn.Module):
    """A convex, possibly non-smooth term ``R(y)`` with a cheap proximal map.

    ``prox(v, step) = argmin_y  R(y) + ||y - v||^2 / (2 step)``; ``step`` broadcasts against ``v``.
    """

    def value(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def prox(self, v: Tensor, step: Tensor | float) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, y: Tensor) -> Tensor:
        return self.value(y)


class L1Penalty(Regularizer):
    """``R(y) = lam ||y||_1``; prox is soft thresholding ``sign(v) max(|v| - step lam, 0)``.

    ``learnable=True`` makes ``lam`` a parameter (kept positive through ``lam = |raw|``).
    """

    def __init__(self, lam: float, *, learnable: bool = False):
        super().__init__()
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValidationError(f"lam must be a non-negative float, got {lam!r}")
        t = torch.tensor(float(lam), dtype=torch.float64)
        if learnable:
            self.raw = nn.Parameter(t)
        else:
            self.register_buffer("raw", t)

    @property
    def lam(self) -> Tensor:
        return self.raw.abs()

    def value(self, y: Tensor) -> Tensor:
        return self.lam.to(y.dtype) * y.abs().sum(-1)

    def prox(self, v: Tensor, step) -> Tensor:
        thr = self.lam.to(v.dtype) * step
        return torch.sign(v) * torch.relu(v.abs() - thr)

    def extra_repr(self) -> str:
        return f"lam={float(self.lam):.4g}"


class NonnegativeConstraint(Regularizer):
    """Indicator of ``y >= 0``; prox is ``max(v, 0)``."""

    def value(self, y: Tensor) -> Tensor:
        inf = torch.full_like(y[:, 0], float("inf"))
        return torch.where((y >= 0).all(-1), torch.zeros_like(inf), inf)

    def prox(self, v: Tensor, step) -> Tensor:
        return torch.relu(v)


class BoxConstraint(Regularizer):
    """Indicator of ``low <= y <= high``; prox is clamping."""

    def __init__(self, low: float, high: float):
        super().__init__()
        if not low < high:
            raise ValidationError(f"need low < high, got low={low!r}, high={high!r}")
        self.low, self.high = float(low), float(high)

    def value(self, y: Tensor) -> Tensor:
        inf = torch.full_like(y[:, 0], float("inf"))
        ok = ((y >= self.low) & (y <= self.high)).all(-1)
        return torch.where(ok, torch.zeros_like(inf), inf)

    def prox(self, v: Tensor, step) -> Tensor:
        return v.clamp(self.low, self.high)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"
