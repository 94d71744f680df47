"""Linear convergence rates: fitted from a residual trace, predicted from the Jacobian, and iteration counts.

A fixed-point iteration converges *linearly with rate q* when ``r_k ~ C q^k`` for the residuals
``r_k = ||f(z_k) - z_k||``. For Picard iteration ``z_{k+1} = f(z_k)`` near the fixed point
``z_{k+1} - z* ~ J* (z_k - z*)``, so the asymptotic rate is the spectral radius ``rho(J*)`` of the Jacobian at
the fixed point (Ostrowski; for a q-contraction ``q`` bounds it globally, cf. Zappala et al. 2023,
arXiv 2310.01618: relaxed Picard ``alpha y + (1 - alpha) T(y)`` contracts with factor ``alpha + (1 - alpha) q``).
Accelerated solvers (Anderson, Broyden) are faster than ``rho(J*)``; the prediction applies to Picard.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .spectral import spectral_radius
from iterlayers.errors import ValidationError


def _as_array(trace) -> np.ndarray:
    if isinstance(trace, Tensor):
        arr = trace.detach().double().cpu().numpy()
    elif isinstance(trace, (list, tuple)):
        if len(trace) == 0:
            raise ValidationError("trace is empty: need at least two residuals to fit a rate")
        if isinstance(trace[0], Tensor):
            arr = torch.stack([torch.as_tensor(t).detach().double().cpu().reshape(-1) for t in trace]).numpy()
            if arr.shape[1] == 1 and trace[0].dim() == 0:
                arr = arr[:, 0]
        else:
            arr = np.asarray(trace, dtype=np.float64)
    else:
        arr = np.asarray(trace, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValidationError(f"trace must be 1-D [T] or 2-D [T, B], got shape {arr.shape}")
    return arr


def _fit_one(r: np.ndarray, skip: int, floor_factor: float | None, tail: float, floor: float) -> float:
    r = r[skip:]
    bad = ~np.isfinite(r) | (r <= floor)
    if bad.any():  # an exactly-zero (or broken) residual ends the informative part of the trace
        r = r[: int(np.argmax(bad))]
    if r.size < 2:
        return float("nan")
    if floor_factor is not None:
        # Plateau: after the minimum the residual only wanders at the noise floor; points close to the floor are
        # dominated by roundoff too. Keep everything up to the first point within floor_factor of the minimum.
        r = r[: int(np.argmax(r <= r.min() * floor_factor)) + 1]
        if r.size < 2:  # converged (or stalled) from the start: no decay to fit
            return float("nan")
    r = r[min(int(r.size * (1 - tail)), r.size - 2):]
    k = np.arange(r.size, dtype=np.float64)
    slope = np.polyfit(k, np.log(r), 1)[0]
    return float(math.exp(slope))


def fit_linear_rate(trace, *, skip: int = 0, floor_factor: float | None = 2.0, tail: float = 1.0,
                    floor: float = 0.0):
    """Least-squares fit of ``log r_k = a + k log q``; returns q.

    ``trace``: residual norms as a sequence of floats / 1-D Tensor ``[T]`` -> float; or ``[T, B]`` (a Tensor, or
    a list of ``Tensor[B]`` as in ``SolverStats.trace``) -> ``Tensor[B]`` of per-sample rates. ``skip`` drops a
    transient head. The tail is ignored from the first zero/non-finite residual on, and after the first point
    within ``floor_factor`` (>= 1) of the trace's minimum (the plateau at the noise floor; ``None``: no plateau
    test, every usable point is informative, e.g. a monotone sequence). ``tail`` in (0, 1]
    keeps only that last fraction of the usable points: the asymptotic rate, without the nonlinear transient.
    ``floor`` (>= 0) is a known absolute noise floor (e.g. float64 resolution of a loss gap): residuals at or
    below it end the usable part like zeros do. NaN if fewer than two usable points remain.
    """
    if not isinstance(skip, int) or skip < 0:
        raise ValidationError(f"skip must be a non-negative int, got {skip!r}")
    if floor_factor is not None and (not isinstance(floor_factor, (int, float)) or not floor_factor >= 1):
        raise ValidationError(f"floor_factor must be None or a number >= 1, got {floor_factor!r}")
    if not isinstance(tail, (int, float)) or not 0 < tail <= 1:
        raise ValidationError(f"tail must be a number in (0, 1], got {tail!r}")
    if not isinstance(floor, (int, float)) or not floor >= 0:
        raise ValidationError(f"floor must be a non-negative number, got {floor!r}")
    arr = _as_array(trace)
    if arr.ndim == 1:
        return _fit_one(arr, skip, floor_factor, tail, floor)
    return torch.tensor([_fit_one(arr[:, b], skip, floor_factor, tail, floor) for b in range(arr.shape[1])],
                        dtype=torch.float64)


def predict_iterations(rate, initial_residual, tol):
    """Iterations ``k`` until ``r_0 q^k <= tol``: ``k = ceil(log(tol / r_0) / log q)`` (0 if ``r_0 <= tol``).

    Scalars give an int; Tensors (broadcast) give a LongTensor. ``rate`` must lie in ``[0, 1)``.
    """
    if any(isinstance(a, Tensor) for a in (rate, initial_residual, tol)):
        q = torch.as_tensor(rate, dtype=torch.float64)
        r0 = torch.as_tensor(initial_residual, dtype=torch.float64)
        t = torch.as_tensor(tol, dtype=torch.float64)
        if bool(((q < 0) | (q >= 1) | q.isnan()).any()):
            raise ValidationError("rate must lie in [0, 1) for the iteration to converge")
        if bool((t <= 0).any()) or bool((r0 < 0).any()):
            raise ValidationError("tol must be > 0 and initial_residual >= 0")
        k = torch.ceil(torch.log(t / r0.clamp_min(1e-300)) / torch.log(q.clamp_min(1e-300)) - 1e-9)
        k = torch.where(r0 <= t, torch.zeros_like(k), k.clamp_min(1))
        return k.long()
    q, r0, t = float(rate), float(initial_residual), float(tol)
    if not 0 <= q < 1:
        raise ValidationError(f"rate must lie in [0, 1) for the iteration to converge, got {q}")
    if t <= 0 or r0 < 0:
        raise ValidationError(f"tol must be > 0 and initial_residual >= 0, got tol={t}, initial_residual={r0}")
    if r0 <= t:
        return 0
    if q == 0:
        return 1
    # The small offset keeps an exact power (r0 q^k == tol) from rounding up one step too far.
    return max(1, math.ceil(math.log(t / r0) / math.log(q) - 1e-9))


def predicted_rate(cell: Callable, z_star: Tensor, x: Tensor | None = None, **kwargs) -> Tensor:
    """Asymptotic Picard rate ``rho(J*)``, ``J* = d cell(z*, x)/dz``, per sample; kwargs go to
    ``spectral_radius`` (``method``, ``tol``, ``max_iter``, ``seed``)."""
    return spectral_radius(cell, z_star, x, **kwargs).value
