"""The one generic solver loop: stopping rule, residuals, divergence, best iterate, statistics.

Every solver in :mod:`iterlayers.solvers` runs through :func:`run_loop`, which solves ``z = f(z, *args,
**kwargs)`` for a batch. Sample ``i`` passes its test when

    ||f(z)_i - z_i||_2 <= atol + rtol * ||f(z)_i||_2        (2-norm over all non-batch dimensions).

Inputs. ``args`` are batched inputs: a tensor whose first dimension is the batch size ``B`` is sliced along
with the samples when ``f`` runs on a sub-batch. ``kwargs`` are passed to every call as ``f(z, *args,
**kwargs)`` and never sliced (an adjacency coupling the rows, a positional table). A sample whose ``z0`` row
or batched input row holds NaN/Inf is refused (``on_failure="raise"``: :class:`NonFiniteInputError` naming the
input) or, with ``"warn"``/``"ignore"``, excluded: reported diverged with residual ``inf``, never evaluated
(NaN in a non-batched input excludes every sample). A batch of size 0 returns at once, empty and converged.
The first evaluation is checked: ``f`` must return the structure, shape, dtype and device of ``z``.

Stopping (``stopping=``). The *system* is the batch minus the excluded samples.

- ``"joint"``: the system is one fixed-point problem. Every sample is updated at every iteration, ``f`` always
  sees the whole system, and the solve stops when every sample passes its test, at ``max_iter``, or as soon as
  one sample diverges (NaN/Inf or a residual above ``divergence_ratio`` times the largest initial residual of
  the system): a diverged row of a coupled system invalidates the others, so it is reported, not frozen. The
  returned iterate is the best *whole* iterate (the one with the smallest ``max_i r_i / tol_i``), so the
  reported residuals are those of one coherent state.
- ``"per_sample"``: a sample that passes its test (or diverges) is frozen at its best iterate and ``f`` runs on
  the remaining samples alone (``args`` sliced; a map without batched ``args`` is evaluated on the whole batch
  with the frozen rows in place and their outputs discarded). Right only if sample ``i``'s output depends on
  sample ``i`` alone; a converged sample then costs nothing.
- ``"verify"`` (the default): per-sample stopping that checks the independence it relies on and falls back
  to ``"joint"`` when it does not hold, at the cost of at most one extra call of ``f`` per solve.

  * With batched ``args`` (``f`` runs on sub-batches): (a) *probe*: the first sub-batch call also evaluates up
    to ``max(1, n // 8)`` samples again at their previous iterate (active ones first, as duplicates; their
    stored ``f`` comes from the whole-batch evaluation of the previous step), in the same call, so the probe
    costs rows, not a call; it
    sees early the usual couplings (batch statistics, train-mode BatchNorm, ``x - x.mean(0)``). (b) *final
    check*: at the end, ``f`` is evaluated once on the whole system at the returned iterate and compared
    with the stored rows. (b) is exact up to round-off: a sample is never reported converged when its
    residual under the whole-batch ``f`` exceeds its tolerance by more than ``KAPPA eps ||f_i||``. A single check at the first sub-batch would not be: coupling between
    samples that are all still active then is invisible (found by the hypothesis test with index-based graph
    cells and weighted batch means).
  * Without batched ``args`` (a closure) every call already evaluates the whole batch with the frozen rows
    in place: the frozen rows are re-checked at every iteration at no extra call.
  * ``verified=True`` (a caller that caches verdicts: :func:`iterlayers.deq_solve` per cell and input
    signature) skips (b): the solve then costs the probe's rows only.
  * If ``f`` raises on a sub-batch (a map that cannot be evaluated on fewer rows couples them), or a check
    disagrees, the loop switches to joint stopping for the rest of the solve (the iterations left): every
    sample is re-activated at the current iterate and the solver's state restarts.

  Sample ``i`` disagrees when

      ||f_new_i - f_stored_i|| > max(TAU * tol_i, KAPPA * eps * ||f_stored_i||),   tol_i = atol + rtol ||f_i||,

  (``TAU = 1/16``, ``KAPPA = 16``), or when a converged sample fails its own test under ``f_new`` by more than
  that round-off (``> tol_i + KAPPA eps ||f_i||``). Rationale
  (derived, and measured): evaluating the same rows in a batch of another size changes them by round-off
  only; with torch's CPU BLAS we measured at most ``4.2 eps ||f_i||`` (tanh-MLP cells of width 16 to 2048 and
  a convolution, float32 and float64, sub-batches of 1 to 255 rows of 256), so ``KAPPA = 16`` leaves a 4x
  margin and round-off does not trigger the fallback (a false alarm would cost time, not correctness). A
  larger difference is coupling; the second test makes a frozen sample whose residual would cross its
  tolerance always trigger, and an undetected difference is at most ``TAU`` of a tolerance. What happened
  is ``stats.info["stopping"]``: ``"per_sample"``, ``"joint"``, ``"per_sample (verified)"``, ``"per_sample
  (no row stopped early)"`` (per-sample and joint stopping then coincide), ``"joint (coupling detected at
  iteration k)"`` or ``"joint (the map failed on a sub-batch at iteration k: ...)"``. The evaluations of
  the verification are ordinary calls of ``f`` (counted in ``nfe``; a train-mode BatchNorm updates its
  running statistics in them).

Tolerance and dtype. One evaluation of ``f`` in a dtype with machine epsilon ``eps`` is exact to about
``eps ||f(z)||``; a tolerance below that (``atol + rtol * m < eps * m``, ``m`` the mean ``||f(z0)_i||``) is
below round-off. The loop then warns once per process and (dtype, atol, rtol) with a :class:`ToleranceWarning`
naming a tolerance the dtype can reach, records it as ``stats.info["tolerance_floor"]`` (``eps * m``), and
keeps the user's tolerance.

Statistics are per sample whatever the stopping: ``nstep`` counts the iterations a sample took part in (equal
for every sample of a joint solve), residuals are those of the returned iterate, which is each sample's best
one (per-sample) or the best whole iterate (joint). ``nfe`` counts calls of ``f`` (the verification's included).
"""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from typing import Callable, Sequence

import torch

from .. import _validate
from ._base import FixedPointSolver, rows
from ._state import StateSpec, _describe, nonfinite_rows
from ..errors import (
    ConvergenceError,
    ConvergenceWarning,
    IterlayersWarning,
    NonFiniteInputError,
    OptionTypeError,
    ValidationError,
)
from .stats import CONVERGED, DIVERGED, SolverStats, is_converged

__all__ = ["run_loop", "report_failure", "ON_FAILURE", "STOPPING", "PHASES", "ToleranceWarning", "TAU", "KAPPA"]

ON_FAILURE = ("raise", "warn", "ignore")
STOPPING = ("verify", "per_sample", "joint")
PHASES = ("forward", "backward", "jvp")

#: a coupling undetected by ``stopping="verify"`` moves a residual by at most this fraction of its tolerance
TAU = 1.0 / 16
#: differences below ``KAPPA * eps * ||f_i||`` are round-off (batch-size-dependent BLAS kernels): measured <= 4.2
KAPPA = 16.0


class ToleranceWarning(IterlayersWarning):
    """The requested tolerance is below what the state's dtype can resolve (see :mod:`._loop`)."""


_TOLERANCE_WARNED: set = set()
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller) of the first frame outside iterlayers and torch,
    so that a warning points at the user's line however deep the solve was started."""
    level, frame = 1, sys._getframe(1)  # level 1 is the caller, the function that calls warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame = frame.f_back
        level += 1
    return level


def _slice_args(args: Sequence, idx: torch.Tensor | None, batch: int) -> tuple:
    if idx is None:
        return tuple(args)
    return tuple(
        a.index_select(0, idx) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a
        for a in args
    )


def _worst(r: torch.Tensor, fn: torch.Tensor | None, atol: float, rtol: float, excluded) -> torch.Tensor:
    """``max_i r_i / tol_i`` over the system (a device scalar): the joint criterion, ``<= 1`` iff all pass."""
    tol = atol + rtol * fn if fn is not None else torch.full_like(r, atol)
    ratio = torch.nan_to_num(r / tol.clamp_min(torch.finfo(r.dtype).tiny), nan=float("inf"))
    if excluded is not None:
        ratio = ratio.masked_fill(excluded, 0.0)
    return ratio.amax()


def _disagree(f_new, f_old, z, live, conv, loop) -> torch.Tensor:
    """Device bool: a ``live`` row's fresh ``f_new`` differs from its stored ``f_old`` by more than
    ``max(TAU tol_i, KAPPA eps ||f_old_i||)``, or a ``conv`` (converged) row fails its own test under ``f_new``."""
    fnorm = f_old.norm(dim=1)
    roundoff = KAPPA * loop.eps * fnorm
    threshold = torch.maximum(TAU * (loop.atol + loop.rtol * fnorm), roundoff)
    moved = live & ~((f_new - f_old).norm(dim=1) <= threshold)
    # A converged row fails when its fresh residual exceeds its tolerance by more than round-off: a row that
    # converged within round-off of its tolerance must not send an independent batch to joint stopping.
    fresh = f_new.norm(dim=1)
    limit = loop.atol + loop.rtol * fresh + roundoff
    stale = conv & ~((f_new - z).norm(dim=1) <= limit)
    return (moved | stale).any()


class _Loop:
    """The state of one solve (a class rather than closures: the joint fallback resets most of it)."""

    def __init__(self, f, z0, solver, args, kwargs, atol, rtol, max_iter, return_trace, divergence_ratio,
                 stopping, excluded, phase, verified=False, keep=()):
        self.f, self.solver, self.args, self.kwargs = f, solver, args, kwargs
        self.atol, self.rtol, self.max_iter = atol, rtol, max_iter
        self.spec = spec = StateSpec.of(z0)
        self.B = B = spec.batch_size
        self.eps = torch.finfo(spec.dtype).eps
        self.use_rel = rtol > 0
        self.phase = phase
        self.info: dict = {}
        self.nfe = 0
        self.it = 0
        self.excluded = excluded
        self.system = None if excluded is None else ~excluded
        self.sys_idx = None if excluded is None else self.system.nonzero().flatten()
        self.n_sys = B if excluded is None else int(self.sys_idx.numel())
        # Only batched args can be sliced; without them f sees the whole batch (frozen rows in place).
        self.sliceable = any(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == B for a in args)
        self.verify = stopping == "verify"
        self.pending = self.verify  # the first sub-batch step has not happened yet
        self.mode = "joint" if stopping == "joint" else "per_sample"
        self.info["stopping"] = {"joint": "joint", "per_sample": "per_sample",
                                 "verify": "per_sample (no row stopped early)"}[stopping]
        self.full_out = None  # closure path: the last whole-batch output, frozen rows included
        self.probe, self.probe_out = None, None  # sliced path: frozen rows evaluated with the first sub-batch
        self.sub_batched = False  # some step ran on a strict subset of the system
        self.final_checked = False
        self.verified = verified  # independence established by an earlier solve: no final whole-batch check
        self.keep = frozenset(keep)  # iterations whose state is kept (stats.iterates)
        self.kept: dict = {}
        self.carried_info: dict = {}  # solver counters of a state discarded by the joint fallback
        self.z = self.z0 = spec.flatten(z0)
        self.N = self.z.shape[1]
        self.return_trace = return_trace
        self.divergence_ratio = divergence_ratio

    # -- evaluations ---------------------------------------------------------------------------------------
    def evaluate(self, zr: torch.Tensor, idx: torch.Tensor | None, zfull: torch.Tensor, check: bool = False):
        """``f`` on rows ``idx`` (``None``: all) of the state whose other rows are ``zfull``'s; flat output.

        With ``self.probe`` set (rows of frozen samples, once, in the first sub-batch step of a verified
        solve), those rows are evaluated along with ``idx`` in the same call and their outputs kept in
        ``self.probe_out``: the independence probe costs rows, not a call.
        """
        self.nfe += 1
        spec, B = self.spec, self.B
        if idx is None or self.sliceable:
            probe, self.probe = self.probe, None
            if probe is not None and idx is not None:
                n = idx.numel()
                both = torch.cat([idx, probe])
                zr = torch.cat([zr, zfull.index_select(0, probe)])
                out = self.f(spec.unflatten(zr), *_slice_args(self.args, both, B), **self.kwargs)
                flat = self._flat(out, both.numel(), check)
                self.probe_out = flat[n:]
                return flat[:n]
            n = B if idx is None else idx.numel()
            out = self.f(spec.unflatten(zr), *_slice_args(self.args, idx, B), **self.kwargs)
            return self._flat(out, n, check)
        zz = zfull.index_copy(0, idx, zr)
        flat = self._flat(self.f(spec.unflatten(zz), *self.args, **self.kwargs), B, check)
        self.full_out = flat
        return flat.index_select(0, idx)

    def _flat(self, out, n: int, check: bool) -> torch.Tensor:
        spec = self.spec
        if check:
            spec.check_output(out, n)
        try:
            flat = spec.flatten(out)
        except (RuntimeError, TypeError, AttributeError):
            spec.check_output(out, n)  # a typed error naming what f returned
            raise
        if flat.shape != (n, self.N):
            spec.check_output(out, n)  # later calls: the cheap test first, the named error if it fails
        return flat

    def residual(self, zz, ff):
        # ||f(z)|| is needed per iteration only for a relative tolerance; otherwise once, at the end.
        return (ff - zz).norm(dim=1), (ff.norm(dim=1) if self.use_rel else None)

    # -- setup ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        z, B, excluded = self.z, self.B, self.excluded
        fz_sys = self.evaluate(rows(z, self.sys_idx), self.sys_idx, z, check=True)
        if self.sys_idx is None:
            fz = fz_sys
        else:  # excluded rows are never evaluated: f := 0 there (residual set to inf below)
            fz = torch.zeros_like(z).index_copy(0, self.sys_idx, fz_sys)
        self.fz = fz
        r, fn = self.residual(z, fz)
        inf = torch.full_like(r, float("inf"))
        if excluded is not None:
            r = torch.where(excluded, inf, r)
        self.last_res, self.last_fn = r, fn
        # NaN/Inf anywhere in f(z) makes the norm non-finite: such a sample is diverged from the start.
        self.diverged = ~torch.isfinite(r)
        self.converged = is_converged(r, fn, self.atol, self.rtol) & ~self.diverged
        self.best_res = torch.where(self.diverged, inf, r)
        # best_z / best_fz are the current z / fz themselves while every sample's best iterate is its current
        # one (the usual case for a converging solve), so tracking the best costs no copy.
        self.best_z, self.best_fz = z, fz
        self.best_is_last = torch.ones(B, dtype=torch.bool, device=z.device)
        self.nstep = torch.zeros(B, dtype=torch.long, device=z.device)
        self.trace = [r.clone()] if self.return_trace else None
        self.state = self.solver.init(z, fz)
        # ~(r <= limit) is true for NaN, Inf and blow-up alike: one comparison per iteration.
        self.div_limit = self.divergence_ratio * torch.clamp(self.best_res, min=self.atol)
        self._start = (r, fn, fz)  # for the joint divergence limit, built only if the solve is (or turns) joint
        self.div_limit_joint = None
        if self.rtol < self.eps:
            self.check_tolerance(fn if fn is not None else fz.norm(dim=1))
        if self.mode == "joint":
            self.best_worst = torch.tensor(float("inf"), dtype=r.dtype, device=r.device)
            self.finished = self.joint_update()
        else:
            self.done = self.converged | self.diverged
            self.n_active = B - int(self.done.sum())
            self.finished = self.n_active == 0

    def joint_limit(self) -> torch.Tensor:
        """Joint stopping's divergence limit: one for the system, from its largest initial residual or
        tolerance (a row that starts at its fixed point is moved by the others, which is not divergence)."""
        if self.div_limit_joint is None:
            r, fn, fz = self._start
            fn0 = fn if fn is not None else fz.norm(dim=1)
            tol0 = self.atol + self.rtol * fn0
            start = torch.where(torch.isfinite(r), torch.maximum(r, tol0), torch.zeros_like(r))
            self.div_limit_joint = self.divergence_ratio * start.amax()
            self._start = None
        return self.div_limit_joint

    def check_tolerance(self, fn0: torch.Tensor) -> None:
        """Warn (once per dtype and tolerance) when ``atol + rtol m < eps m``: a tolerance below round-off.
        Called only when ``rtol < eps`` (otherwise rtol alone resolves and no host sync is spent)."""
        ok = torch.isfinite(fn0) if self.system is None else torch.isfinite(fn0) & self.system
        m = float(torch.where(ok, fn0, torch.zeros_like(fn0)).sum() / ok.sum().clamp_min(1))
        floor = self.eps * m
        if self.atol + self.rtol * m >= floor:
            return
        self.info["tolerance_floor"] = floor
        key = (self.spec.dtype, self.atol, self.rtol)
        if key in _TOLERANCE_WARNED:
            return
        _TOLERANCE_WARNED.add(key)
        warnings.warn(
            f"{self.phase} solve: atol={self.atol:g}, rtol={self.rtol:g} is below what {self.spec.dtype} resolves "
            f"for this state: one evaluation of f is exact to about eps * ||f(z)|| = {floor:.2g} (eps={self.eps:.2g}, "
            f"mean ||f(z0)|| = {m:.3g}), so residuals below that are round-off. A tolerance {self.spec.dtype} can "
            f"reach: atol >= {floor:.2g} or rtol >= {self.eps:.2g} (or solve in a wider dtype). The tolerance is "
            f"kept as given; stats.info['tolerance_floor'] records {floor:.2g}. (Warned once per dtype and "
            f"tolerance.)",
            ToleranceWarning,
            stacklevel=_user_stacklevel(),
        )

    # -- iterations ----------------------------------------------------------------------------------------
    def run(self) -> None:
        self.iterate()
        # The verification of a sliced solve ends with one evaluation of the whole system at the returned
        # iterate; if it finds coupling the solve goes on jointly from there, with the iterations left.
        while self.final_check() and self.it < self.max_iter and not self.finished:
            self.iterate()

    def iterate(self) -> None:
        while self.it < self.max_iter and not self.finished:
            if self.mode == "joint" or self.n_active == self.n_sys:
                idx = self.sys_idx
            else:
                idx = (~self.done).nonzero().flatten()
            partial = self.mode == "per_sample" and self.n_active < self.n_sys
            first = partial and self.pending
            z, fz = self.z, self.fz
            if first and self.sliceable:
                # Every step so far ran on the whole system, so fz is f(z) evaluated in the whole batch.
                self.probe = self._probe_idx = self.probe_rows()
                self._probe_ref = None if self.probe is None else (rows(z, self.probe), rows(fz, self.probe))
            try:
                z_new, fz_new = self.solver.step(
                    self.state, rows(z, idx), rows(fz, idx), idx, lambda zz, _i=idx, _z=z: self.evaluate(zz, _i, _z)
                )
            except (RuntimeError, IndexError, ValueError) as err:
                if not (partial and self.verify and not self.final_checked) or isinstance(err, ConvergenceError):
                    raise
                # f cannot be evaluated on these rows alone: it couples them. Before the first sub-batch step
                # z, fz are one whole-batch evaluation; later, the one extra evaluation makes them one.
                self.probe = None
                self.final_checked = True
                if first:
                    f_sys = rows(fz, self.sys_idx)
                else:
                    self.restore_diverged()
                    f_sys = self.evaluate(rows(self.z, self.sys_idx), self.sys_idx, self.z)
                msg = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
                self.to_joint(f_sys, f"joint (the map failed on a sub-batch at iteration {self.it + 1}: "
                                     f"{type(err).__name__}: {msg})")
                continue
            self.it += 1
            r_new, fn_new = self.residual(z_new, fz_new)
            if idx is None:
                self.z, self.fz, self.last_res, self.last_fn = z_new, fz_new, r_new, fn_new
                self.nstep.add_(1)
            else:
                self.z = z.index_copy(0, idx, z_new)
                self.fz = fz.index_copy(0, idx, fz_new)
                self.last_res = self.last_res.index_copy(0, idx, r_new)
                if fn_new is not None:
                    self.last_fn = self.last_fn.index_copy(0, idx, fn_new)
                self.nstep.index_add_(0, idx, torch.ones_like(idx))
            if self.mode == "joint":
                self.finished = self.joint_update()
            else:
                self.sub_batched |= partial
                self.per_sample_update(idx, r_new, fn_new, partial, first)
            if self.it in self.keep:
                self.kept[self.it] = self.z  # never modified in place: the loop replaces, it does not write
            if self.return_trace:
                self.trace.append(self.last_res.clone())

    def probe_rows(self) -> torch.Tensor | None:
        """Up to ``max(1, n_sys // 8)`` finite samples whose stored ``f`` is re-evaluated, at their stored
        iterate, inside the first sub-batch call. Active samples first (as duplicates, at their previous
        iterate): with them the call's batch lacks every frozen sample, whereas probing all frozen samples
        would rebuild the whole batch and hide a dependence on it."""
        live = ~self.diverged
        cand = torch.cat([(~self.done).nonzero().flatten(), (self.done & live).nonzero().flatten()])
        return cand[: max(1, self.n_sys // 8)] if cand.numel() else None

    def per_sample_update(self, idx, r_new, fn_new, partial: bool, first: bool) -> None:
        conv_new = is_converged(r_new, fn_new, self.atol, self.rtol)
        if idx is None:
            # Every sample took this step (the usual early iterations): no masks, no scatter.
            improved = r_new < self.best_res
            self.best_res = torch.where(improved, r_new, self.best_res)
            self.best_is_last = improved
            self.converged = conv_new
            self.diverged = ~(r_new <= self.div_limit) & ~conv_new
        else:
            active = ~self.done
            improved = active & (self.last_res < self.best_res)
            self.best_res = torch.where(improved, self.last_res, self.best_res)
            self.best_is_last = improved | (self.best_is_last & self.done)
            bad_new = ~(r_new <= self.div_limit.index_select(0, idx)) & ~conv_new
            self.converged = self.converged.index_copy(0, idx, conv_new)
            self.diverged = self.diverged.index_copy(0, idx, bad_new)
        frozen = self.done  # the rows this step left alone (excluded rows included)
        self.done = self.converged | self.diverged
        coupled = None
        if self.verify and partial:
            if not self.sliceable:
                # The step's own evaluation saw the whole batch: re-check the frozen rows, at no evaluation.
                sel = frozen if self.excluded is None else frozen & self.system
                coupled = self.disagree(self.full_out, sel)
            elif first and self.probe_out is not None:
                # Rows re-evaluated at their stored iterate in the sub-batch's context (the active rows moved,
                # the other frozen rows absent) against their whole-batch values: equal unless f couples rows.
                zp, fp = self._probe_ref
                live = torch.ones(zp.shape[0], dtype=torch.bool, device=zp.device)
                conv = rows(frozen & self.converged, self._probe_idx)
                coupled = _disagree(self.probe_out, fp, zp, live, conv, self)
                self.probe_out = self._probe_ref = None
            self.pending = False
        # The one host sync of the iteration: counts (int64 sums), so "all"/"any" need no extra reductions.
        vals = [self.best_is_last.sum(), improved.sum(), self.done.sum()]
        if coupled is not None:
            vals.append(coupled.long())
        flags = torch.stack(vals).tolist()
        if flags[0] == self.B:
            self.best_z, self.best_fz = self.z, self.fz
        elif flags[1]:
            keep = improved.unsqueeze(1)
            self.best_z = torch.where(keep, self.z, self.best_z)
            self.best_fz = torch.where(keep, self.fz, self.best_fz)
        self.n_active = self.B - flags[2]
        self.finished = self.n_active == 0
        if coupled is not None:
            if flags[3]:
                self.restore_diverged()
                f_sys = self.evaluate(rows(self.z, self.sys_idx), self.sys_idx, self.z)
                self.final_checked = True  # the one extra evaluation is spent
                self.to_joint(f_sys, f"joint (coupling detected at iteration {self.it})")
            elif not self.sliceable:
                self.info["stopping"] = "per_sample (verified)"

    def restore_diverged(self) -> None:
        """Before a switch to joint stopping: samples that diverged go back to their best iterate."""
        keep = self.diverged.unsqueeze(1)
        self.z = torch.where(keep, self.best_z, self.z)
        self.fz = torch.where(keep, self.best_fz, self.fz)

    def final_check(self) -> bool:
        """The end of a verified sliced solve: ``f`` on the whole system at the returned iterate, compared
        with the stored rows. True if coupling was found (the solve is then joint, at that iterate)."""
        if self.final_checked or not (self.verify and self.sliceable and self.sub_batched) or self.mode == "joint":
            return False
        self.final_checked = True
        if self.verified:
            self.info["stopping"] = "per_sample (verified by an earlier solve; probe passed)"
            return False
        self.z, self.fz = self.best_z, self.best_fz
        f_sys = self.evaluate(rows(self.z, self.sys_idx), self.sys_idx, self.z)
        if not bool(self.disagree(f_sys, self.sys_idx)):
            self.info["stopping"] = "per_sample (verified)"
            return False
        self.to_joint(f_sys, f"joint (coupling detected at iteration {self.it})")
        return True

    def disagree(self, f_new: torch.Tensor, sel) -> torch.Tensor:
        """:func:`_disagree` of the fresh evaluation ``f_new`` with the stored rows ``sel`` (an index tensor,
        ``None`` for the system, or a ``[B]`` mask with ``f_new`` holding every row); diverged rows skipped."""
        if isinstance(sel, torch.Tensor) and sel.dtype == torch.bool:
            return _disagree(f_new, self.fz, self.z, sel & ~self.diverged, sel & self.converged, self)
        if sel is None:
            sel = self.sys_idx
        return _disagree(f_new, rows(self.fz, sel), rows(self.z, sel), ~rows(self.diverged, sel),
                         rows(self.converged, sel), self)

    def to_joint(self, f_sys: torch.Tensor, reason: str) -> None:
        """Switch to joint stopping at the current iterate, ``f_sys`` being ``f`` of the whole system there."""
        for k, v in self.solver.extra_info(self.state).items():
            if isinstance(v, (int, float)):
                self.carried_info[k] = self.carried_info.get(k, 0) + v
        z = self.z
        self.fz = f_sys if self.sys_idx is None else self.fz.index_copy(0, self.sys_idx, f_sys)
        r, fn = self.residual(z, self.fz)
        if self.excluded is not None:
            r = r.masked_fill(self.excluded, float("inf"))
        self.last_res, self.last_fn = r, fn
        self.state = self.solver.init(z, self.fz)
        self.nstep = torch.full_like(self.nstep, self.it)
        if self.excluded is not None:
            self.nstep.masked_fill_(self.excluded, 0)
        self.best_worst = torch.tensor(float("inf"), dtype=r.dtype, device=r.device)
        self.best_z, self.best_fz, self.best_res = z, self.fz, r
        self.mode = "joint"
        self.info["stopping"] = reason
        self.finished = self.joint_update()

    def joint_update(self) -> bool:
        """Bookkeeping after a joint step; True when the solve is finished (all pass, or one diverged)."""
        r, fn, excluded = self.last_res, self.last_fn, self.excluded
        conv = is_converged(r, fn, self.atol, self.rtol)
        bad = ~(r <= self.joint_limit()) & ~conv
        if excluded is not None:
            conv, bad = conv & ~excluded, bad & ~excluded
        worst = _worst(r, fn, self.atol, self.rtol, excluded)
        improved = worst < self.best_worst
        passed = conv if excluded is None else conv | excluded
        all_pass, any_bad, better = torch.stack([passed.all(), bad.any(), improved]).tolist()
        if better:
            self.best_z, self.best_fz, self.best_res, self.best_worst = self.z, self.fz, r, worst
        self.best_is_last = torch.full_like(self.best_is_last, bool(better))
        if excluded is not None:
            self.best_is_last |= excluded
        self.converged = conv
        self.diverged = bad if excluded is None else bad | excluded
        return bool(all_pass or any_bad)

    # -- result --------------------------------------------------------------------------------------------
    def result(self):
        out_z, best_fz, out_res = self.best_z, self.best_fz, self.best_res
        if self.solver.verify_final:
            f_sys = self.evaluate(rows(out_z, self.sys_idx), self.sys_idx, out_z)
            best_fz = f_sys if self.sys_idx is None else torch.zeros_like(out_z).index_copy(0, self.sys_idx, f_sys)
            out_res = (best_fz - out_z).norm(dim=1)
            if self.excluded is not None:
                out_res = out_res.masked_fill(self.excluded, float("inf"))
        info = dict(self.solver.extra_info(self.state))
        for k, v in self.carried_info.items():
            info[k] = info.get(k, 0) + v
        info.update(self.info)
        iterates = None
        if self.keep:
            iterates = {k: self.spec.unflatten(self.kept.get(k, out_z) if k else self.z0) for k in sorted(self.keep)}
        stats = SolverStats.of_final_iterate(
            self.solver.name, out_res, best_fz.norm(dim=1), nstep=self.nstep, diverged=self.diverged,
            best=~self.best_is_last, nfe=self.nfe, atol=self.atol, rtol=self.rtol, max_iter=self.max_iter,
            trace=self.trace, info=info, iterates=iterates,
        )
        return out_z, stats


def _screen_inputs(z0, args, kwargs, names, batch: int, on_failure: str):
    """The ``[B]`` mask of samples with NaN/Inf in ``z0`` or an input (``None`` if none); raises with "raise"."""
    parts = tuple(z0) if isinstance(z0, (tuple, list)) else (z0,)
    inputs = [(f"z0[{i}]" if len(parts) > 1 else "z0", p, True) for i, p in enumerate(parts)]
    inputs += [(n, a, True) for n, a in zip(names, args)]
    inputs += [(f"kwargs[{k!r}]", v, False) for k, v in kwargs.items()]
    found = []
    for name, t, batched in inputs:
        bad = nonfinite_rows(t, batch, batched=batched)
        if bad is not None:
            found.append((name, bad))
    if not found:
        return None, None
    note = "; ".join(f"{name} (samples {bad.nonzero().flatten().tolist()[:8]})" for name, bad in found)
    if on_failure == "raise":
        what = " and ".join(name for name, _ in found)
        raise NonFiniteInputError(f"{what} contains NaN or Inf: {note}; refusing to iterate")
    mask = found[0][1].clone()
    for _, bad in found[1:]:
        mask |= bad
    return mask, note


def _validate_keep(keep, name: str, where: str) -> tuple:
    """A tuple of distinct non-negative iteration numbers (sorted)."""
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence):
        raise OptionTypeError(f"{where}: {name} must be a tuple of iteration numbers, got {_describe(keep)}")
    return tuple(sorted({_validate.non_negative_int(k, f"{name}[{i}]", where=where) for i, k in enumerate(keep)}))


def run_loop(
    f: Callable,
    z0,
    *,
    solver: FixedPointSolver,
    args: Sequence = (),
    kwargs: Mapping | None = None,
    atol: float,
    rtol: float,
    max_iter: int,
    on_failure: str,
    return_trace: bool,
    divergence_ratio: float,
    check_inputs: bool = True,
    stopping: str = "verify",
    arg_names: Sequence[str] | None = None,
    phase: str = "forward",
    verified: bool = False,
    keep: Sequence[int] = (),
):
    """Solve ``z = f(z, *args, **kwargs)`` from ``z0``; return ``(z, stats)`` with ``z`` shaped like ``z0``.

    See the module docstring for the contract: ``args`` batched (sliced), ``kwargs`` never sliced,
    ``stopping`` in :data:`STOPPING`, ``arg_names`` (one name per arg, default ``"args[i]"``) naming inputs in
    messages, ``phase`` (``"forward"``/``"backward"``) naming the solve in messages. ``check_inputs=False``
    skips the NaN/Inf screening of ``z0`` and the inputs (for callers whose inputs are known finite).
    ``verified=True`` (with ``stopping="verify"``) says an earlier solve of the same map and input signature
    passed the full verification: the probe still runs (and falls back to joint on coupling), the final
    whole-batch check is skipped (see :mod:`iterlayers.implicit` for the cache that decides this).
    ``keep``: iterations whose state is returned in ``stats.iterates`` (``0`` is ``z0``).
    """
    _validate.choice(stopping, "stopping", STOPPING, where="run_loop")
    _validate.choice(phase, "phase", PHASES, where="run_loop")
    _validate.choice(on_failure, "on_failure", ON_FAILURE, where="run_loop")
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise OptionTypeError(
            f"kwargs must be a dict of keyword arguments for f (never sliced) or None, got {_describe(kwargs)}"
        )
    if isinstance(args, (torch.Tensor, str)) or not isinstance(args, Sequence):
        raise OptionTypeError(f"args must be a tuple of inputs of f, got {_describe(args)}; wrap one as (x,)")
    args = tuple(args)
    keep = _validate_keep(keep, "keep", "run_loop")
    if arg_names is None:
        names = [f"args[{i}]" for i in range(len(args))]
    else:
        names = list(arg_names)
        if len(names) != len(args) or not all(isinstance(n, str) for n in names):
            raise ValidationError(f"arg_names must give one name (a str) per arg: {len(args)} args, got {names!r}")

    spec = StateSpec.of(z0)
    B = spec.batch_size
    excluded, note = None, None
    if check_inputs and B > 0:
        excluded, note = _screen_inputs(z0, args, kwargs, names, B, on_failure)
    loop = _Loop(f, z0, solver, args, kwargs, float(atol), float(rtol), max_iter, return_trace,
                 float(divergence_ratio), stopping, excluded, phase, verified=bool(verified), keep=keep)
    if note is not None:
        loop.info["nonfinite_input"] = note
    if B == 0 or loop.n_sys == 0:
        # Nothing to iterate: an empty batch, or every sample excluded. f is not called.
        z = loop.z.clone()
        res = torch.full((B,), float("inf"), dtype=z.dtype, device=z.device)
        none = torch.zeros(B, dtype=torch.bool, device=z.device)
        stats = SolverStats.of_final_iterate(
            solver.name, res, torch.zeros_like(res), nstep=torch.zeros(B, dtype=torch.long, device=z.device),
            diverged=~none, best=none, nfe=0, atol=atol, rtol=rtol, max_iter=max_iter,
            trace=[res.clone()] if return_trace else None, info=loop.info,
            iterates={k: spec.unflatten(z) for k in keep} if keep else None,
        )
    else:
        loop.start()
        loop.run()
        z, stats = loop.result()
    if z.numel() and isinstance(z0, torch.Tensor) and z.data_ptr() == z0.data_ptr():
        z = z.clone()  # never hand the caller's own z0 back as the solution
    if stats.status != CONVERGED:
        report_failure(stats, on_failure, phase=phase)
    return spec.unflatten(z), stats


def report_failure(stats: SolverStats, on_failure: str, phase: str = "forward") -> None:
    """Raise, warn or do nothing (``on_failure``) about a solve that did not converge, naming the solve
    (``phase``: ``"forward"`` or ``"backward"``) and the samples; a warning points at the user's line."""
    if on_failure == "ignore":
        return
    bad = (~stats.converged).nonzero().flatten()
    shown = bad[:5].tolist()
    what = "diverged (NaN/Inf or residual blow-up)" if stats.status == DIVERGED else "did not converge"
    msg = (
        f"{phase} solve ({stats.solver}) {what}: {len(bad)} of {stats.batch_size} samples above tolerance "
        f"(atol={stats.atol:g}, rtol={stats.rtol:g}) after max_iter={stats.max_iter}; samples {shown}"
        f"{'...' if len(bad) > 5 else ''} have residuals "
        f"{[float(f'{r:.3g}') for r in stats.abs_residual[bad[:5]].tolist()]} after "
        f"{stats.nstep[bad[:5]].tolist()} iterations"
    )
    if "nonfinite_input" in stats.info:
        msg += f"; excluded from the solve for NaN/Inf in their inputs: {stats.info['nonfinite_input']}"
    if str(stats.info.get("stopping", "")).startswith("joint"):
        msg += f"; stopping: {stats.info['stopping']}"
    if on_failure == "raise":
        raise ConvergenceError(msg, stats)
    warnings.warn(msg, ConvergenceWarning, stacklevel=_user_stacklevel())
