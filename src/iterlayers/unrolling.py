r"""The one differentiable iteration engine: damped fixed-point iteration with autograd through every step.

:func:`unroll` runs, from ``z_0``,

.. math::

    z_{k+1} = z_k + d_k \, (f(z_k) - z_k), \qquad k = 0, 1, \dots, K - 1,

with the damping ``d_k`` in ``(0, 1]`` a constant or a schedule (``d_k = 1`` is plain Picard iteration
``z_{k+1} = f(z_k)``, computed as exactly that). A paper's relaxation written as
``z_{k+1} = a_k z_k + (1 - a_k) f(z_k)`` (Zappala et al., the Krasnosel'skii-Mann form) is ``d_k = 1 - a_k``.
Gradients flow through every evaluation and every step (ordinary backpropagation: the finite-depth,
weight-tied network of depth ``K``); forward-mode tangents flow the same way.

Each iterate is evaluated once, which gives its residual ``r_k = ||f(z_k) - z_k||_2`` (2-norm over all non-batch
dimensions and all parts of a tuple state), the per-sample quantity of :class:`~iterlayers.SolverStats`.

Stopping.

- *Fixed steps* (``atol`` and ``rtol`` both ``None``): exactly ``K = max_iter`` steps for every sample.
- *Tolerance* (``atol`` and/or ``rtol`` given, the other one 0): sample ``i`` passes when
  ``r_i <= atol + rtol ||f(z)_i||`` (:func:`iterlayers.solvers.is_converged`, the solvers' test), at most
  ``max_iter`` steps. ``stopping="joint"`` steps every sample until all pass; ``"per_sample"`` (or
  ``"verify"``, the same here) freezes a sample that passes (its row of ``z`` is kept by masking). ``f`` is always
  evaluated on the whole batch and every residual recomputed from that evaluation, so a frozen row whose
  residual a coupled row moves back above its tolerance resumes: the reported convergence is that of the
  returned iterate, under the whole-batch map, whatever the coupling. A row with a non-finite residual is
  frozen too (and reported diverged).

The returned statistics describe the returned iterate ``z_K``: its residual needs ``f(z_K)``, which the
tolerance test evaluates anyway. After the last allowed step (``k = max_iter``) that evaluation only measures,
so it runs without a graph and without advancing the caller's random number stream (a dropout cell draws the
same masks as if it had not run); a cell that updates running statistics in training mode (batch norm) does
see it.

States are a tensor ``[B, ...]`` or a tuple of such tensors (as for the solvers, :class:`StateSpec`); ``f`` must
return the structure, shape, dtype and device of its input (checked at the first evaluation, typed errors).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import torch

from . import _validate as V
from .errors import OptionTypeError, ValidationError
from .solvers import StateSpec
from .solvers import SolverStats, is_converged

__all__ = ["unroll", "Unrolling", "STOPPING", "fista_momentum"]

STOPPING = ("per_sample", "joint", "verify")


class Unrolling(NamedTuple):
    """What :func:`unroll` returns: the final iterate, its statistics, and ``[z_0, ..., z_K]`` if asked for."""

    z: object
    stats: SolverStats
    iterates: list | None


def _parts(z) -> tuple:
    return tuple(z) if isinstance(z, (tuple, list)) else (z,)


def _like(z, parts):
    return tuple(parts) if isinstance(z, (tuple, list)) else parts[0]


def _norm(parts) -> torch.Tensor:
    """Per-sample 2-norm over every non-batch element of every part (the norm of the part norms: no squares
    are formed, so no overflow before the norm itself overflows)."""
    norms = [torch.linalg.vector_norm(p.reshape(p.shape[0], -1), dim=1) for p in parts]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)


def _damping_at(damping, k: int):
    if callable(damping):
        return damping(k)
    if isinstance(damping, (tuple, list)):
        return damping[min(k, len(damping) - 1)]  # the last value is reused past the schedule's end
    return damping


def _check_damping_value(d, name: str):
    """A damping value: a number or a 0-dim floating tensor (e.g. learnable) in (0, 1]."""
    if isinstance(d, torch.Tensor):
        if d.dim() != 0 or not d.is_floating_point():
            raise OptionTypeError(f"{name} must be a number or a 0-dim floating tensor, got a {d.dtype} tensor "
                                  f"of shape {tuple(d.shape)}")
        V.in_range(float(d.detach()), name, low=0.0, high=1.0, low_open=True)
        return d
    return V.in_range(d, name, low=0.0, high=1.0, low_open=True)


def _check_damping(damping):
    if callable(damping) and not isinstance(damping, torch.Tensor):
        return damping  # a schedule k -> d_k: each value is checked when it is used
    if isinstance(damping, (tuple, list)):
        if len(damping) == 0:
            raise ValidationError("damping: a schedule must hold at least one value")
        return tuple(_check_damping_value(d, f"damping[{i}]") for i, d in enumerate(damping))
    if isinstance(damping, (torch.Tensor, numbers.Real)) and not isinstance(damping, bool):
        return _check_damping_value(damping, "damping")
    raise OptionTypeError(f"damping must be a number, a 0-dim tensor, a sequence of them or a callable k -> d_k, "
                          f"got {damping!r} ({type(damping).__name__})")


def _fork_rng(device: torch.device):
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def unroll(f: Callable, z0, *, max_iter: int, damping=1.0, atol: float | None = None, rtol: float | None = None,
           stopping: str = "per_sample", return_iterates: bool = False, return_trace: bool = False,
           name: str = "unrolled") -> Unrolling:
    """Iterate ``z <- z + d_k (f(z) - z)`` from ``z0`` with autograd through the steps (module docstring).

    Args:
        f: the map, called as ``f(z)`` on the whole batch (bind inputs with a closure).
        z0: the initial state, a tensor ``[B, ...]`` or a tuple of them.
        max_iter: the number of steps (fixed steps) or their maximum (tolerance), ``>= 0``.
        damping: ``d_k`` in ``(0, 1]``: a number, a 0-dim tensor (learnable), a sequence ``d_0, d_1, ...`` (its
            last value reused past its end) or a callable ``k -> d_k``.
        atol, rtol: the tolerance test ``r <= atol + rtol ||f(z)||``; both ``None``: fixed steps.
        stopping: ``"per_sample"`` / ``"verify"`` (freeze a sample that passes) or ``"joint"``.
        return_iterates: also return ``[z_0, ..., z_K]`` (with their graphs; ``z_K`` is the returned state).
        return_trace: record ``stats.trace``, the per-sample residuals ``[r_0, ..., r_K]``.
        name: the ``solver`` name the statistics carry.

    Returns:
        :class:`Unrolling` ``(z, stats, iterates)``; ``stats.nstep`` counts the steps each sample took,
        ``stats.nfe`` the evaluations of ``f`` (``K + 1``), ``stats.trace`` the residuals.
    """
    max_iter = V.non_negative_int(max_iter, "max_iter")
    damping = _check_damping(damping)
    stopping = V.choice(stopping, "stopping", STOPPING)
    return_iterates = V.boolean(return_iterates, "return_iterates")
    return_trace = V.boolean(return_trace, "return_trace")
    if not callable(f):
        raise OptionTypeError(f"f must be callable as f(z), got {type(f).__name__}")
    fixed = atol is None and rtol is None
    atol = 0.0 if atol is None else V.in_range(atol, "atol", low=0.0)
    rtol = 0.0 if rtol is None else V.in_range(rtol, "rtol", low=0.0)
    spec = StateSpec.of(z0)
    batch = spec.batch_size

    def evaluate(z, k: int):
        if k < max_iter:
            fz = f(z)
        else:  # nothing follows: a measurement, not part of the computation (module docstring)
            with torch.no_grad(), _fork_rng(spec.device):
                fz = f(z)
        if k == 0:
            spec.check_output(fz, batch)
        if fixed and not return_trace and k < max_iter:
            return fz, None, None  # fixed steps: only the returned iterate's residual is reported
        fp = _parts(fz)
        with torch.no_grad():
            r = _norm([a - b for a, b in zip(fp, _parts(z))])
            if fixed:
                done = None
            else:
                done = is_converged(r, _norm(fp), atol, rtol) | ~torch.isfinite(r)
        return fz, r, done

    z = z0
    fz, r, done = evaluate(z, 0)
    nstep = torch.zeros(batch, dtype=torch.long, device=spec.device)  # per-sample stopping only
    trace = [r] if return_trace else None
    iterates = [z0] if return_iterates else None
    k = 0
    while k < max_iter and not (done is not None and bool(done.all())):
        d = _damping_at(damping, k)
        if callable(damping):
            d = _check_damping_value(d, f"damping({k})")
        zp, fp = _parts(z), _parts(fz)
        new = fp if (not isinstance(d, torch.Tensor) and d == 1.0) else tuple(
            a + d * (b - a) for a, b in zip(zp, fp))
        if done is not None and stopping != "joint":
            step = ~done
            nstep += step.long()
            new = tuple(torch.where(step.view(-1, *([1] * (a.dim() - 1))), b, a) for a, b in zip(zp, new))
        z = _like(z0, new)
        k += 1
        fz, r, done = evaluate(z, k)
        if return_trace:
            trace.append(r)
        if return_iterates:
            iterates.append(z)
    if done is None or stopping == "joint":  # every sample took every step
        nstep = torch.full((batch,), k, dtype=torch.long, device=spec.device)
    with torch.no_grad():
        fnorm = _norm(_parts(fz))
    stats = SolverStats.of_final_iterate(
        name, r, fnorm, nstep=nstep, diverged=~torch.isfinite(r),
        best=torch.zeros(batch, dtype=torch.bool, device=spec.device), nfe=k + 1, atol=atol, rtol=rtol,
        max_iter=max_iter, trace=trace, info={"stopping": "fixed" if fixed else stopping},
    )
    return Unrolling(z, stats, iterates)


_FISTA_T: list[float] = [1.0]  # the sequence does not depend on the problem: computed once, shared


def fista_momentum(k: int) -> float:
    """FISTA's extrapolation weight ``(t_k - 1) / t_{k+1}`` after step ``k`` (from 0), with ``t_0 = 1`` and
    ``t_{j+1} = (1 + sqrt(1 + 4 t_j^2)) / 2`` (Beck & Teboulle 2009): the accelerated proximal-gradient
    iteration is ``x_{k+1} = prox_step(y_k)``, ``y_{k+1} = x_{k+1} + fista_momentum(k) (x_{k+1} - x_k)``.
    The one definition for every unrolled FISTA in the library (``reasoning.FISTA``, ``frames.apg``)."""
    k = V.non_negative_int(k, "k", where="fista_momentum")
    seq = _FISTA_T
    while len(seq) <= k + 1:
        seq.append((1.0 + math.sqrt(1.0 + 4.0 * seq[-1] ** 2)) / 2.0)
    return (seq[k] - 1.0) / seq[k + 1]
