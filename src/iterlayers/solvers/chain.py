"""A fallback chain of solvers with per-sample status: each solver takes over the samples the previous ones failed on.

``solve_chain(f, z0, solvers=["picard", "anderson", "broyden"])`` runs the first solver through the one loop
(:func:`~iterlayers.solvers._loop.run_loop`, failures ignored), then hands every sample it failed on (not
converged within ``max_iter``, diverged, stalled) to the next solver, starting from that sample's best iterate,
and so on down the list. What a stage runs on:

- *independent rows* (a stage reported ``stopping`` ``"per_sample"`` or ``"per_sample (verified...)"`` on the
  whole batch) and batched ``args``: the failed samples alone, their ``args`` rows sliced (``kwargs`` never sliced);
- *coupled rows* (a stage reported ``stopping`` starting with ``"joint"``): the whole system again, jointly,
  from the returned (best whole) iterate: a coupled system has no per-sample answer to keep;
- otherwise (no batched ``args``, so ``f`` only sees whole batches; or independence not established, e.g.
  ``"per_sample (no row stopped early)"``): the whole batch from the merged iterate, with the stopping asked for;
  samples already converged pass their test at the start and are frozen there (no iteration spent on them),
  and the loop's verification sees them in their real batch.

A failed sample whose best residual is not finite (NaN/Inf in ``f`` at its best iterate, or excluded for NaN/Inf
in its inputs) is not handed on: ``f`` at the same point would give the same non-finite value.

The result is the merged iterate and ONE :class:`SolverStats`: per-sample residuals (``abs_residual``,
``rel_residual``, ``converged``, ``diverged``, ``best``) of the returned iterate, taken from the stage that
returned it; ``nstep`` summed over the stages a sample took part in (each solver has its own budget of
``max_iter`` iterations, so ``nstep <= len(solvers) * max_iter``); ``nfe`` summed; ``solver`` the chain
(``"picard -> anderson"``). ``info`` holds

- ``"finished_by"``: a list of ``B`` solver names, the solver whose iterations produced each converged sample's
  returned iterate (a sample converged at ``z0`` is credited to the first solver), ``"none"`` if not converged;
- ``"finished_stage"``: the same as a ``[B]`` long tensor of positions in the chain (``-1``: not converged);
- ``"stages"``: one summary per stage (solver, samples it ran on, nfe, iterations, its stopping, how many
  converged, its status);
- ``"stopping"``: the first joint stopping a stage reported, else the first stage's; integer solver counters
  (e.g. ``anderson_fallbacks``) summed over the stages, other entries from the first stage that had them.

A failure of the whole chain is reported once, at the end, with :func:`report_failure` and ``on_failure``
(``"raise"`` also refuses NaN/Inf inputs up front with :class:`NonFiniteInputError`, as :func:`run_loop` does).
Like ``run_loop`` this builds no graph by itself only if called under ``torch.no_grad()``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Callable, Sequence

import torch

from ._loop import FixedPointSolver, LoopOptions, StateSpec, _describe, _screen_inputs, _slice_args, report_failure, run_loop
from .errors import OptionTypeError, ValidationError
from ._loop import CONVERGED, DIVERGED, MAX_ITER, SolverStats

__all__ = ["solve_chain", "make_chain"]



def _independent(how: str) -> bool:
    """Whether the loop's stopping report says the rows are independent (slicing them is then exact):
    ``"per_sample"`` (declared), ``"per_sample (verified)"``, ``"per_sample (verified by an earlier solve...)"``."""
    return how == "per_sample" or how.startswith("per_sample (verified")


def make_chain(solvers) -> tuple[FixedPointSolver, ...]:
    """Validated solver values for a chain: a non-empty list or tuple of names and/or solver instances."""
    from . import make_solver  # solvers/__init__ imports this module: resolve at call time

    if isinstance(solvers, (str, FixedPointSolver)) or not isinstance(solvers, (list, tuple)):
        hint = f"; for one solver write [{solvers!r}]" if isinstance(solvers, (str, FixedPointSolver)) else ""
        raise OptionTypeError(
            f"solvers must be a list of solver names or FixedPointSolver instances, got {_describe(solvers)}{hint}"
        )
    if len(solvers) == 0:
        raise ValidationError("solvers is empty; give at least one solver, e.g. ['anderson', 'broyden']")
    return tuple(make_solver(s) for s in solvers)


#: solve_chain's keyword defaults (those of LoopOptions), to refuse keywords given along with a ready value
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoopOptions) if f.name != "where"}


def solve_chain(
    f: Callable,
    z0,
    *,
    solvers: Sequence,
    args: Sequence = (),
    kwargs: Mapping | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    max_iter: int = 100,
    on_failure: str = "warn",
    return_trace: bool = False,
    divergence_ratio: float = 1e6,
    check_inputs: bool = True,
    stopping: str = "verify",
    arg_names: Sequence[str] | None = None,
    phase: str = "forward",
    verified: bool = False,
    check_every: int = 1,
    options: LoopOptions | None = None,
):
    """Solve ``z = f(z, *args, **kwargs)`` with a fallback chain of solvers; return ``(z, stats)``.

    ``options``: a ready :class:`~iterlayers.solvers.LoopOptions` value in place of the keywords ``atol`` ...
    ``check_every`` (which must then stay at their defaults).

    The options are those of :func:`~iterlayers.solvers._loop.run_loop` (``max_iter`` is each solver's budget),
    plus ``solvers``: a non-empty list of solver names (``"anderson"``, ...) and/or solver instances, tried in
    order on the samples the previous ones failed on. ``verified`` is passed to the stages that run on the whole
    batch; a stage on the sliced failed rows of a batch found independent runs with ``verified=True`` (their
    independence is established, so its final whole-batch check would be spent for nothing). See the module
    docstring for what each stage runs on and for the combined statistics (``stats.info["finished_by"]``).
    ``z`` is shaped like ``z0`` (a tensor or a tuple).
    """
    chain = make_chain(solvers)
    given = dict(atol=atol, rtol=rtol, max_iter=max_iter, on_failure=on_failure, return_trace=return_trace,
                 divergence_ratio=divergence_ratio, check_every=check_every)
    if options is None:
        options = LoopOptions(**given, where="solve_chain")
    else:
        if not isinstance(options, LoopOptions):
            raise OptionTypeError(f"solve_chain: options must be a LoopOptions, got {_describe(options)}")
        changed = sorted(k for k, v in given.items() if v != _DEFAULTS[k])
        if changed:
            raise ValidationError(f"solve_chain: {changed} given together with options=; put them in the value")
    atol, rtol, max_iter, on_failure = options.atol, options.rtol, options.max_iter, options.on_failure
    return_trace = options.return_trace
    if not callable(f):
        raise OptionTypeError(f"solve_chain: f must be callable, got {_describe(f)}")
    if isinstance(args, (torch.Tensor, str)) or not isinstance(args, Sequence):
        raise OptionTypeError(f"args must be a tuple of inputs of f, got {_describe(args)}; wrap one as (x,)")
    args = tuple(args)
    spec = StateSpec.of(z0)
    B = spec.batch_size
    if check_inputs and on_failure == "raise" and B > 0:
        names = list(arg_names) if arg_names is not None else [f"args[{i}]" for i in range(len(args))]
        _screen_inputs(z0, args, kwargs or {}, names, B, "raise")  # refuses NaN/Inf as a single solve would
    sliceable = any(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == B for a in args)
    # every stage reports nothing itself: the chain's failure is reported once, at the end
    loop = dict(kwargs=kwargs, options=options.replace(on_failure="ignore"), check_inputs=check_inputs,
                arg_names=arg_names, phase=phase)

    z = None  # the merged flat iterate
    merged: dict = {}
    stage_of = None  # [B] the position of the stage in which each sample last took a step (-1: none)
    trace: list | None = [] if return_trace else None
    stages, infos = [], []
    joint = independent = False
    nfe = 0
    idx = None  # the rows the next stage runs on (None: all)
    for k, solver in enumerate(chain):
        if k == 0:
            start, stage_args, stage_stopping, stage_verified = z0, args, stopping, verified
        else:
            failed = ~merged["converged"] & torch.isfinite(merged["abs_residual"])
            if not bool(failed.any()):
                break
            if joint:
                idx, stage_stopping, stage_verified = None, "joint", verified
            elif independent and sliceable:
                idx, stage_stopping, stage_verified = failed.nonzero().flatten(), stopping, True
            else:
                idx, stage_stopping, stage_verified = None, stopping, verified
            start = spec.unflatten(z if idx is None else z.index_select(0, idx))
            stage_args = _slice_args(args, idx, B)
        zk, st = run_loop(f, start, solver=solver, args=stage_args, stopping=stage_stopping, verified=stage_verified,
                          **loop)
        nfe += st.nfe
        how = str(st.info.get("stopping", ""))
        joint |= how.startswith("joint")
        independent |= idx is None and _independent(how)
        stages.append({"solver": solver.name, "samples": B if idx is None else int(idx.numel()), "nfe": st.nfe,
                       "iterations": int(st.nstep.max()) if st.nstep.numel() else 0, "stopping": how,
                       "converged": int(st.converged.sum()), "status": st.status})
        infos.append(st.info)
        zk = spec.flatten(zk)
        if k == 0:
            z = zk
            merged = {name: getattr(st, name).clone() for name in
                      ("abs_residual", "rel_residual", "converged", "diverged", "best", "nstep")}
            stage_of = torch.where(st.nstep > 0, 0, -1)
            if trace is not None:
                trace.extend(st.trace)
            continue
        rows = torch.arange(B, device=z.device) if idx is None else idx
        if trace is not None:
            for t in st.trace[1:]:  # trace[0] repeats the residual the previous stage ended with
                trace.append(merged["abs_residual"].index_copy(0, rows, t))
        z = z.index_copy(0, rows, zk)
        for name in ("abs_residual", "rel_residual", "converged", "diverged", "best"):
            merged[name] = merged[name].index_copy(0, rows, getattr(st, name))
        merged["nstep"] = merged["nstep"].index_add(0, rows, st.nstep)
        stage_of = stage_of.index_copy(0, rows, torch.where(st.nstep > 0, k, stage_of.index_select(0, rows)))

    conv = merged["converged"]
    finished = torch.where(conv, stage_of.clamp_min(0), -1)
    info: dict = {}
    for stage_info in infos:
        for key, value in stage_info.items():
            if isinstance(value, int) and not isinstance(value, bool) and isinstance(info.get(key, 0), int):
                info[key] = info.get(key, 0) + value
            else:
                info.setdefault(key, value)
    info["stopping"] = next((s["stopping"] for s in stages if s["stopping"].startswith("joint")),
                            stages[0]["stopping"])
    info["finished_stage"] = finished
    info["finished_by"] = [chain[i].name if i >= 0 else "none" for i in finished.tolist()]
    info["stages"] = stages
    empty = B == 0
    status = CONVERGED if empty or bool(conv.all()) else (DIVERGED if bool(merged["diverged"].any()) else MAX_ITER)
    stats = SolverStats(
        solver=" -> ".join(s.name for s in chain), nstep=merged["nstep"], abs_residual=merged["abs_residual"],
        rel_residual=merged["rel_residual"], converged=conv, diverged=merged["diverged"], best=merged["best"],
        nfe=nfe, status=status, atol=float(atol), rtol=float(rtol), max_iter=int(max_iter), trace=trace, info=info,
    )
    if status != CONVERGED:
        report_failure(stats, on_failure, phase=phase)
    return spec.unflatten(z), stats
