"""Multilayer constrained sparse coding: its objective, the feed-forward approximation, and exact inference.

Deep frame approximation (Murdock, Cazenavette & Lucey, arXiv 2103.05804; CVPR 2020) reads a network with
layer frames ``B_j`` and biases ``b_j = -lambda_j`` as approximate inference in

    w* = argmin_{w >= 0}  F(w) = 1/2 ||x~ - B w||^2 + lambda^T w  (+ ridge/2 ||w||^2),   x~ = [x; 0; ...; 0],

with ``B`` the induced global frame (``global_frame.assemble_global_frame``, un-normalised: the network's own
weights). Its optimality (KKT) conditions, with ``g = grad F(w) = B^T (B w - x~) + lambda + ridge w``, are

    w >= 0,   g >= 0,   w * g = 0      <=>      min(w, g) = 0  (element-wise; ``kkt_residual``).

- *Feed-forward approximation*: every layer solves its own problem ``min_{w_j >= 0} 1/2 ||u_j - B_j w_j||^2 +
  lambda_j^T w_j`` (``u_j`` = the layer's input: previous code, or the concatenation of the earlier hidden
  codes) with one proximal-gradient step of unit size from ``w_j = 0``: ``w_j = ReLU(B_j^T u_j - lambda_j)``,
  layer by layer, plus the shortcut ``w_{j-s}`` in a residual net. That is exactly the ReLU network
  (chain / ResNet / DenseNet); for skip connections it is the network, an initialisation of the global
  problem rather than its layer-wise minimiser.
- *Exact inference*: accelerated proximal gradient (FISTA, Beck & Teboulle 2009) on ``F`` with step
  ``1 / L``, ``L = ||B||_2^2 + ridge``, started from the feed-forward codes:

      w^{t+1} = ReLU(y^t - (1/L) grad F(y^t)),   s_{t+1} = (1 + sqrt(1 + 4 s_t^2)) / 2,
      y^{t+1} = w^{t+1} + ((s_t - 1) / s_{t+1}) (w^{t+1} - w^t),

  converging as ``F(w^t) - F* = O(1 / t^2)``. ``T`` total iterations = the feed-forward pass plus ``T - 1``
  APG steps, so ``T = 1`` *is* the feed-forward network. Alternatively (``solver="deq"``) the fixed point of
  the proximal-gradient map ``w = ReLU(w - (1/L) grad F(w))`` (its fixed points are exactly the minimisers)
  is found by ``iterlayers.deq_solve`` and differentiated implicitly.

``F`` is convex; it is bounded below when ``lambda >= 0`` or ``ridge > 0`` (a negative ``lambda``, i.e. a
positive bias, can make it unbounded along non-negative null directions of ``B`` — give ``ridge > 0`` then).
"""
from __future__ import annotations

from typing import Sequence

import torch

from iterlayers import DEQOptions, deq_solve
from iterlayers.unrolling import fista_momentum

from .global_frame import STRUCTURES
from iterlayers.errors import ValidationError

__all__ = [
    "SPARSE_CODING_SOLVERS",
    "pad_input",
    "objective",
    "objective_gradient",
    "kkt_residual",
    "lipschitz_constant",
    "prox_grad_step",
    "feed_forward",
    "apg",
    "solve_sparse_coding",
]

SPARSE_CODING_SOLVERS = ("apg", "deq")


def pad_input(x: torch.Tensor, total_rows: int) -> torch.Tensor:
    """``x~ = [x; 0]`` of ``total_rows`` rows per sample (``x`` is ``[batch, d0]``)."""
    if x.dim() != 2:
        raise ValidationError(f"x must be [batch, d0], got shape {tuple(x.shape)}")
    if x.shape[1] > total_rows:
        raise ValidationError(f"x has {x.shape[1]} features but the frame has only {total_rows} rows")
    return torch.nn.functional.pad(x, (0, total_rows - x.shape[1]))


def _check(w, x_tilde, B, lam):
    if B.dim() != 2:
        raise ValidationError(f"B must be a [D, K] frame, got shape {tuple(B.shape)}")
    if w.shape[-1] != B.shape[1]:
        raise ValidationError(f"w has {w.shape[-1]} coefficients but B has {B.shape[1]} atoms")
    if x_tilde.shape[-1] != B.shape[0]:
        raise ValidationError(f"x~ has {x_tilde.shape[-1]} rows but B has {B.shape[0]}; use pad_input")
    if lam.shape[-1] != B.shape[1]:
        raise ValidationError(f"lambda has {lam.shape[-1]} entries but B has {B.shape[1]} atoms")


def objective(w, x_tilde, B, lam, *, ridge: float = 0.0) -> torch.Tensor:
    """``F(w) = 1/2 ||x~ - B w||^2 + lambda^T w + ridge/2 ||w||^2`` per sample (``w >= 0`` assumed)."""
    _check(w, x_tilde, B, lam)
    r = x_tilde - w @ B.T
    return 0.5 * r.pow(2).sum(-1) + (w * lam).sum(-1) + 0.5 * ridge * w.pow(2).sum(-1)


def objective_gradient(w, x_tilde, B, lam, *, ridge: float = 0.0) -> torch.Tensor:
    """``grad F(w) = B^T (B w - x~) + lambda + ridge w``."""
    _check(w, x_tilde, B, lam)
    return (w @ B.T - x_tilde) @ B + lam + ridge * w


def kkt_residual(w, x_tilde, B, lam, *, ridge: float = 0.0) -> torch.Tensor:
    """``max_i |min(w_i, g_i)|`` per sample: zero iff ``w`` satisfies the KKT conditions of ``min_{w>=0} F``."""
    g = objective_gradient(w, x_tilde, B, lam, ridge=ridge)
    return torch.minimum(w, g).abs().amax(-1)


def lipschitz_constant(B: torch.Tensor, *, ridge: float = 0.0) -> torch.Tensor:
    """``L = ||B||_2^2 + ridge`` (largest singular value; no gradient flows through the step size)."""
    with torch.no_grad():
        return torch.linalg.matrix_norm(B.detach(), ord=2).pow(2) + ridge


def prox_grad_step(w, x_tilde, B, lam, step, *, ridge: float = 0.0) -> torch.Tensor:
    """``ReLU(w - step * grad F(w))``: the proximal operator of ``lambda^T w + indicator(w >= 0)`` is folded
    into the gradient (``lambda`` is linear), leaving the projection onto ``w >= 0``."""
    return torch.relu(w - step * objective_gradient(w, x_tilde, B, lam, ridge=ridge))


def feed_forward(
    x: torch.Tensor,
    layer_frames: Sequence[torch.Tensor],
    lambdas: Sequence[torch.Tensor],
    *,
    structure: str = "chain",
    skip: int = 2,
) -> list[torch.Tensor]:
    """Layer-wise feed-forward approximation ``w_j = ReLU(B_j^T u_j - lambda_j)``; returns ``[w_1, ..., w_l]``.

    ``u_1 = x``; then chain ``u_j = w_{j-1}``; dense ``u_j = [w_1; ...; w_{j-1}]`` (hidden codes only);
    residual as chain, with the shortcut added to the pre-activation of layer ``j > skip``:
    ``w_j = ReLU(B_j^T w_{j-1} + w_{j-skip} - lambda_j)`` (the ResNet basic block for ``skip = 2``).
    """
    if structure not in STRUCTURES:
        raise ValidationError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if len(layer_frames) != len(lambdas):
        raise ValidationError(f"got {len(layer_frames)} layer frames but {len(lambdas)} lambdas")
    codes: list[torch.Tensor] = []
    for j, (Bj, lj) in enumerate(zip(layer_frames, lambdas)):
        if j == 0:
            u = x
        elif structure == "dense":
            u = torch.cat(codes, dim=-1)
        else:
            u = codes[-1]
        pre = u @ Bj - lj
        if structure == "residual" and j >= skip:
            pre = pre + codes[j - skip]
        codes.append(torch.relu(pre))
    return codes


def apg(
    x_tilde: torch.Tensor,
    B: torch.Tensor,
    lam: torch.Tensor,
    *,
    w0: torch.Tensor | None = None,
    max_iter: int = 100,
    step: float | torch.Tensor | None = None,
    ridge: float = 0.0,
) -> torch.Tensor:
    """``max_iter`` FISTA steps on ``min_{w >= 0} F`` from ``w0`` (default 0); differentiable (unrolled).

    ``max_iter`` is the papers' iteration count of inference beyond the feed-forward pass (``T - 1``): exactly
    that many steps are taken (no early stop, so the unrolled graph has a fixed depth)."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValidationError(f"apg: max_iter must be an int >= 0, got {max_iter!r}")
    if step is None:
        step = 1.0 / lipschitz_constant(B, ridge=ridge)
    w_prev = x_tilde.new_zeros(x_tilde.shape[0], B.shape[1]) if w0 is None else w0
    y = w_prev
    for k in range(max_iter):
        w = prox_grad_step(y, x_tilde, B, lam, step, ridge=ridge)
        y = w + fista_momentum(k) * (w - w_prev)
        w_prev = w
    return w_prev


#: The inference solve's defaults (a DEQOptions value, built once): Anderson to an absolute 1e-6.
SPARSE_CODING_OPTIONS = DEQOptions(solver="anderson", atol=1e-6, rtol=0.0, max_iter=200, on_failure="warn")


def _deq_options(given) -> DEQOptions:
    """``given`` (a :class:`DEQOptions`, a dict of its fields, or None) over :data:`SPARSE_CODING_OPTIONS`."""
    if isinstance(given, DEQOptions):
        return given
    return DEQOptions.build(SPARSE_CODING_OPTIONS, **(given or {}))


def solve_sparse_coding(
    x_tilde: torch.Tensor,
    B: torch.Tensor,
    lam: torch.Tensor,
    *,
    w0: torch.Tensor | None = None,
    solver: str = "apg",
    max_iter: int = 100,
    ridge: float = 0.0,
    deq_options: "DEQOptions | dict | None" = None,
) -> torch.Tensor:
    """Exact inference: ``apg`` (``max_iter`` unrolled FISTA steps, the papers' ``T - 1``) or ``deq`` (fixed point of the
    proximal-gradient map by ``iterlayers.deq_solve``, implicit gradients; ``deq_options``: a DEQOptions, or
    a dict of its fields applied over :data:`SPARSE_CODING_OPTIONS`)."""
    if solver not in SPARSE_CODING_SOLVERS:
        raise ValidationError(f"solver must be one of {SPARSE_CODING_SOLVERS}, got {solver!r}")
    if solver == "apg":
        return apg(x_tilde, B, lam, w0=w0, max_iter=max_iter, ridge=ridge)
    step = 1.0 / lipschitz_constant(B, ridge=ridge)
    z0 = x_tilde.new_zeros(x_tilde.shape[0], B.shape[1]) if w0 is None else w0.detach()
    return deq_solve(lambda z: prox_grad_step(z, x_tilde, B, lam, step, ridge=ridge), z0,
                     options=_deq_options(deq_options))
