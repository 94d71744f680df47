"""The one generic solver loop: per-sample stopping, residuals, divergence, best iterate, statistics.

Every solver in :mod:`iterlayers.solvers` runs through :func:`run_loop`. A sample has converged when

    ||f(z) - z||_2 <= atol + rtol * ||f(z)||_2        (2-norm over all non-batch dimensions).

Converged samples are frozen. When the map receives its batched inputs through ``args`` (as
:class:`iterlayers.DEQ` does), the active samples are gathered and ``f`` runs on them alone, so a converged
sample costs nothing; a closure ``f(z)`` that captures batched tensors cannot be sliced and is evaluated on
the whole batch (the frozen rows are then discarded).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from ._base import FixedPointSolver
from ._state import StateSpec, check_finite
from .errors import ConvergenceError, ConvergenceWarning
from .stats import CONVERGED, DIVERGED, SolverStats, is_converged

__all__ = ["run_loop", "report_failure", "ON_FAILURE"]

ON_FAILURE = ("raise", "warn", "ignore")


def _slice_args(args: Sequence, idx: torch.Tensor | None, batch: int) -> tuple:
    if idx is None:
        return tuple(args)
    return tuple(
        a.index_select(0, idx) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a
        for a in args
    )


def run_loop(
    f: Callable,
    z0,
    *,
    solver: FixedPointSolver,
    args: Sequence = (),
    atol: float,
    rtol: float,
    max_iter: int,
    on_failure: str,
    return_trace: bool,
    divergence_ratio: float,
    check_inputs: bool = True,
):
    """Solve ``z = f(z, *args)`` from ``z0``; return ``(z, stats)`` with ``z`` shaped like ``z0``."""
    spec = StateSpec.of(z0)
    B = spec.batch_size
    if check_inputs:
        check_finite(z0, "z0")
        for i, a in enumerate(args):
            check_finite(a, f"args[{i}]")
    sliceable = len(args) > 0

    nfe = 0

    def f_flat(zf: torch.Tensor, idx: torch.Tensor | None, full: torch.Tensor | None) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        if idx is None or sliceable:
            out = f(spec.unflatten(zf), *_slice_args(args, idx, B))
            return spec.flatten(out)
        # A closure cannot be sliced: evaluate the whole batch with the frozen rows in place.
        zz = full.clone()
        zz.index_copy_(0, idx, zf)
        return spec.flatten(f(spec.unflatten(zz), *args)).index_select(0, idx)

    # z and f(z) are never modified in place (solvers copy into their own buffers), so no defensive copies.
    z = spec.flatten(z0)
    nfe += 1
    fz0 = f(z0, *args)
    spec.check_output(fz0, B)
    fz = spec.flatten(fz0)
    use_rel = rtol > 0

    def residual(zz, ff):
        # ||f(z)|| is needed per iteration only for a relative tolerance; otherwise once, at the end.
        return (ff - zz).norm(dim=1), (ff.norm(dim=1) if use_rel else None)

    r, fn = residual(z, fz)
    last_res = r
    # NaN/Inf anywhere in f(z) makes the norm non-finite: such a sample is diverged from the start.
    diverged = ~torch.isfinite(r)
    converged = is_converged(r, fn, atol, rtol) & ~diverged
    best_res = torch.where(diverged, torch.full_like(r, float("inf")), r)
    # best_z / best_fz are the current z / fz themselves while every sample's best iterate is its current
    # one (the usual case for a converging solve), so tracking the best costs no copy.
    best_z, best_fz = z, fz
    best_is_last = torch.ones(B, dtype=torch.bool, device=z.device)
    nstep = torch.zeros(B, dtype=torch.long, device=z.device)
    trace = [last_res.clone()] if return_trace else None
    state = solver.init(z, fz)
    # ~(r <= limit) is true for NaN, Inf and blow-up alike: one comparison per iteration.
    div_limit = divergence_ratio * torch.clamp(best_res, min=atol)
    done = converged | diverged
    n_active = B - int(done.sum())

    for _ in range(max_iter):
        if n_active == 0:
            break
        if n_active == B:
            z, fz = solver.step(state, z, fz, None, lambda zz: f_flat(zz, None, None))
            r, fn = residual(z, fz)
            nstep.add_(1)
            improved = r < best_res
            best_res = torch.where(improved, r, best_res)
            if bool(improved.all()):
                best_z, best_fz = z, fz
            else:
                keep = improved.unsqueeze(1)
                best_z, best_fz = torch.where(keep, z, best_z), torch.where(keep, fz, best_fz)
            best_is_last = improved
            last_res = r
            converged = is_converged(r, fn, atol, rtol)
            diverged = ~(r <= div_limit)
            done = converged | diverged
        else:
            active = ~done
            idx = active.nonzero().flatten()
            z_new, fz_new = solver.step(
                state, z.index_select(0, idx), fz.index_select(0, idx), idx,
                lambda zz, _i=idx, _z=z: f_flat(zz, _i, _z),
            )
            r_new, fn_new = residual(z_new, fz_new)
            z = z.index_copy(0, idx, z_new)
            fz = fz.index_copy(0, idx, fz_new)
            nstep.index_add_(0, idx, torch.ones_like(idx))
            last_res = last_res.index_copy(0, idx, r_new)
            improved = active & (last_res < best_res)
            best_res = torch.where(improved, last_res, best_res)
            best_is_last = improved | (best_is_last & done)
            if bool(best_is_last.all()):
                best_z, best_fz = z, fz
            elif bool(improved.any()):
                keep = improved.unsqueeze(1)
                best_z, best_fz = torch.where(keep, z, best_z), torch.where(keep, fz, best_fz)
            conv_new = is_converged(r_new, fn_new, atol, rtol)
            bad_new = ~(r_new <= div_limit.index_select(0, idx))
            converged = converged.index_copy(0, idx, conv_new)
            diverged = diverged.index_copy(0, idx, bad_new & ~conv_new)
            done = converged | diverged
        n_active = B - int(done.sum())
        if return_trace:
            trace.append(last_res.clone())

    # Return the best iterate of every sample: for a converged sample it is the converged one.
    out_z = best_z
    if solver.verify_final:
        nfe += 1
        best_fz = spec.flatten(f(spec.unflatten(out_z), *args))
        out_res = (best_fz - out_z).norm(dim=1)
    else:
        out_res = best_res
    best_flag = best_res < torch.where(torch.isfinite(last_res), last_res, torch.full_like(last_res, float("inf")))
    if out_z is z0 or (isinstance(z0, torch.Tensor) and out_z.data_ptr() == z0.data_ptr()):
        out_z = out_z.clone()  # never hand the caller's own z0 back as the solution
    stats = SolverStats.of_final_iterate(
        solver.name, out_res, best_fz.norm(dim=1), nstep=nstep, diverged=diverged, best=best_flag, nfe=nfe,
        atol=atol, rtol=rtol, max_iter=max_iter, trace=trace, info=solver.extra_info(state),
    )
    if stats.status != CONVERGED:
        report_failure(stats, on_failure)
    return spec.unflatten(out_z), stats


def report_failure(stats: SolverStats, on_failure: str) -> None:
    """Raise, warn or do nothing (``on_failure``) about a solve that did not converge, naming the samples."""
    if on_failure == "ignore":
        return
    bad = (~stats.converged).nonzero().flatten()
    shown = bad[:5].tolist()
    what = "diverged (NaN/Inf or residual blow-up)" if stats.status == DIVERGED else "did not converge"
    msg = (
        f"{stats.solver} solve {what}: {len(bad)} of {stats.batch_size} samples above tolerance "
        f"(atol={stats.atol:g}, rtol={stats.rtol:g}) after max_iter={stats.max_iter}; samples {shown}"
        f"{'...' if len(bad) > 5 else ''} have residuals "
        f"{[float(f'{r:.3g}') for r in stats.abs_residual[bad[:5]].tolist()]} after "
        f"{stats.nstep[bad[:5]].tolist()} iterations"
    )
    if on_failure == "raise":
        raise ConvergenceError(msg, stats)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)
