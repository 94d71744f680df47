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

The solver protocol and the states (this module holds both, so that the loop, the one thing that iterates, owns
the structure of what it iterates). The solver protocol: a solver is a value (its options) with an explicit, full-batch state.

A solver never loops by itself; :func:`~iterlayers.solvers._loop.run_loop` owns the loop, the per-sample
stopping, residuals, divergence checks and statistics. A solver supplies

- ``init(z, fz) -> state``: a dict of full-batch tensors (first dimension = batch) and plain counters,
- ``step(state, z, fz, idx, fn) -> (z_new, fz_new)``: one iteration for the *active* samples. ``z`` and
  ``fz`` are the active rows, ``idx`` their row indices in the batch (``None`` when every sample is active),
  ``fn`` evaluates ``f`` on active rows. The step may call ``fn`` several times (line search).

Options are dataclass fields, so unknown options are caught by name (see ``make_solver``).

Flattening of batched states (a tensor or a tuple of tensors) to one ``[B, N]`` matrix, and the checks of
what goes into and comes out of a fixed-point map.

Solvers work on flat per-sample vectors; users work with whatever structure their cell has. Every check here
runs before the first iteration (on ``z0``, the inputs and the first evaluation of ``f``) and raises a typed
error of the one family (:mod:`iterlayers.errors`) naming what was received and what was expected, so that a
mistake never surfaces as a torch error from inside a solver.
"""
from __future__ import annotations

import cmath
import contextlib

import dataclasses
import functools
import math
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch

from .. import _validate
from ..errors import (
    ConvergenceError,
    ConvergenceWarning,
    IterlayersWarning,
    NonFiniteInputError,
    OptionTypeError,
    ShapeMismatchError,
    ValidationError,
)

__all__ = ["run_loop", "LoopOptions", "SolverStats", "is_converged", "CONVERGED", "MAX_ITER", "DIVERGED",
           "report_failure", "ON_FAILURE", "STOPPING", "PHASES", "ToleranceWarning", "TAU", "KAPPA",
           "FixedPointSolver", "rows", "set_rows", "StateSpec", "nonfinite_rows", "check_finite"]

# ----------------------------------------------------------------------------------------------------------
# What a solve returns: the convergence test and the statistics every solve reports, per sample and in total
# (here with the loop that produces them, so that one module holds the loop's whole contract: the options that
# go in, LoopOptions, and the statistics that come out).

CONVERGED = "converged"
MAX_ITER = "max_iter"
DIVERGED = "diverged"


def is_converged(residual: torch.Tensor, fnorm: torch.Tensor | None, atol: float, rtol: float) -> torch.Tensor:
    """``residual <= atol + rtol * fnorm`` per sample, where a non-finite residual never passes.

    Without the finiteness test an infinite ``f(z)`` would pass any relative tolerance (``inf <= inf``), and a
    blown-up sample would be reported converged. ``fnorm`` may be ``None`` when ``rtol == 0``.
    """
    if rtol == 0 or fnorm is None:
        return residual <= atol  # NaN and inf fail this already
    tol = rtol * fnorm if atol == 0 else rtol * fnorm + atol
    # The tolerance capped at the largest finite value: an infinite ||f|| then leaves a finite bound that an
    # infinite residual fails, a NaN one stays NaN (fails), and a NaN residual fails any bound; three kernels
    # instead of a separate finiteness test's two more.
    return residual <= tol.clamp_max_(torch.finfo(tol.dtype).max)


@dataclass
class SolverStats:
    """What happened during one batched solve.

    Per-sample tensors have shape ``[B]``:

    - ``nstep``: iterations the sample took part in (per-sample stopping: it stops counting once the sample
      has converged; joint stopping: the same for every sample),
    - ``abs_residual``: ``||f(z) - z||_2`` of the returned iterate (2-norm over all non-batch dimensions),
    - ``rel_residual``: ``abs_residual / ||f(z)||_2``,
    - ``converged``: ``abs_residual <= atol + rtol * ||f(z)||``,
    - ``diverged``: NaN/Inf met or the residual grew past ``divergence_ratio`` times its initial value,
    - ``best``: the returned iterate is an earlier, better one, not the sample's last iterate (joint stopping:
      the best whole iterate is not the last one).

    ``nfe`` counts batched evaluations of ``f``; ``status`` is ``"converged"`` when every sample converged,
    ``"diverged"`` when some sample diverged, ``"max_iter"`` otherwise (an empty batch is ``"converged"``).
    ``trace`` (with ``return_trace=True``) lists the per-sample absolute residual after each iteration, ``trace[0]`` being the
    initial one. ``info`` holds solver-specific counters (e.g. Anderson safeguard fallbacks). ``iterates``
    (with ``keep=`` iterations requested) maps each requested iteration ``k`` to the state after iteration ``k``
    (shaped like ``z0``, no graph; a sample frozen earlier holds its iterate from when it stopped, and an
    iteration the solve did not reach holds the returned iterate). ``state`` (with ``keep_state=True``) is the
    solver's final state (e.g. Broyden's inverse-Jacobian factors, for :class:`iterlayers.ShineGradient`).
    """

    solver: str
    nstep: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    best: torch.Tensor
    nfe: int
    status: str
    atol: float
    rtol: float
    max_iter: int
    trace: list[torch.Tensor] | None = None
    info: dict = field(default_factory=dict)
    iterates: dict | None = None
    state: dict | None = None

    @classmethod
    def of_final_iterate(
        cls,
        solver: str,
        abs_residual: torch.Tensor,
        fnorm: torch.Tensor,
        *,
        nstep: torch.Tensor,
        diverged: torch.Tensor,
        best: torch.Tensor,
        nfe: int,
        atol: float,
        rtol: float,
        max_iter: int,
        trace: list[torch.Tensor] | None = None,
        info: dict | None = None,
        iterates: dict | None = None,
    ) -> "SolverStats":
        """Statistics of a finished solve from its returned iterate's ``||f(z) - z||`` and ``||f(z)||``.

        The convergence test, the relative residual and the status are derived here, so that every loop that
        reports a solve (the generic solver loop, the unrolled one) applies the same rule. A non-finite
        residual is reported as ``inf``; ``diverged`` is what the loop saw during the iterations.
        """
        res = abs_residual.nan_to_num(nan=math.inf, posinf=math.inf)  # (a norm: never -inf)
        converged = is_converged(res, fnorm, atol, rtol)
        if converged.numel() == 0:
            status = CONVERGED
        else:  # one host read for both tests
            all_converged, any_diverged = torch.stack([converged.all(), diverged.any()]).tolist()
            status = CONVERGED if all_converged else (DIVERGED if any_diverged else MAX_ITER)
        return cls(
            solver=solver,
            nstep=nstep,
            abs_residual=res,
            rel_residual=res / fnorm.clamp_min(torch.finfo(fnorm.dtype).tiny),
            converged=converged,
            diverged=diverged & ~converged,
            best=best,
            nfe=int(nfe),
            status=status,
            atol=float(atol),
            rtol=float(rtol),
            max_iter=int(max_iter),
            trace=trace,
            info=dict(info or {}),
            iterates=iterates,
        )

    @property
    def residual(self) -> torch.Tensor:
        """Alias of ``abs_residual``."""
        return self.abs_residual

    @property
    def batch_size(self) -> int:
        return int(self.nstep.shape[0])

    def trace_tensor(self) -> torch.Tensor:
        """The residual trace as a ``[iterations + 1, B]`` tensor (requires ``return_trace=True``)."""
        if self.trace is None:
            raise ValidationError("no residual trace was recorded; pass return_trace=True to the solve")
        return torch.stack(self.trace)

    def summary(self) -> dict:
        """Plain-Python scalars, for logs and metrics files (an empty batch: zero work, all converged)."""
        empty = self.batch_size == 0
        return {
            "solver": self.solver,
            "status": self.status,
            "mean_nstep": 0.0 if empty else float(self.nstep.float().mean()),
            "max_nstep": 0 if empty else int(self.nstep.max()),
            "nfe": int(self.nfe),
            "mean_abs_residual": 0.0 if empty else float(self.abs_residual.mean()),
            "max_abs_residual": 0.0 if empty else float(self.abs_residual.max()),
            "mean_rel_residual": 0.0 if empty else float(self.rel_residual.mean()),
            "converged_fraction": 1.0 if empty else float(self.converged.float().mean()),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str))},
        }

    def __str__(self) -> str:
        s = self.summary()
        return (
            f"{self.solver}: {s['status']}, {s['converged_fraction']:.0%} of {self.batch_size} converged, "
            f"steps mean {s['mean_nstep']:.1f} max {s['max_nstep']}, nfe {s['nfe']}, "
            f"residual mean {s['mean_abs_residual']:.2e} max {s['max_abs_residual']:.2e}"
        )


# ----------------------------------------------------------------------------------------------------------
# The solver protocol.

#: per-sample 2-norms, called directly (``Tensor.norm`` adds a Python wrapper, ``torch.functional.norm``, per call)
_vnorm = torch.linalg.vector_norm


def rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows ``idx`` of a full-batch tensor (a copy), or the tensor itself when ``idx`` is None."""
    return t if idx is None else t.index_select(0, idx)


def set_rows(t: torch.Tensor, idx: torch.Tensor | None, value: torch.Tensor) -> None:
    """Write ``value`` into rows ``idx`` of ``t`` in place."""
    if idx is None:
        if value is not t:
            t.copy_(value)
    else:
        t.index_copy_(0, idx, value)


@dataclasses.dataclass
class FixedPointSolver:
    """Base class of the solvers of ``z = f(z)``. Subclasses are dataclasses whose fields are options.

    ``init`` returns the solver's state (a dict); ``step`` updates it. The loop sets ``state["sync_free"] =
    True`` in its device mode (``check_every`` > 1): a step must then not read tensor values on the host
    (``bool``, ``int``, ``.item()``), which a CPU step may do where it saves work.
    """

    name: ClassVar[str] = "base"
    #: evaluate f once more at the end to report true residuals (for solvers that model f, e.g. GMRES)
    verify_final: ClassVar[bool] = False

    def init(self, z: torch.Tensor, fz: torch.Tensor) -> dict:
        return {}

    def step(
        self,
        state: dict,
        z: torch.Tensor,
        fz: torch.Tensor,
        idx: torch.Tensor | None,
        fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement step()")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def validate(self) -> None:
        """Check (and normalise) option values through :mod:`iterlayers._validate`; subclasses extend.

        A wrong type raises :class:`~iterlayers.errors.OptionTypeError`, a bad value
        :class:`~iterlayers.errors.ValidationError`; both name the solver and the option.
        """

    def extra_info(self, state: dict) -> dict:
        """Solver-specific counters copied into ``SolverStats.info``."""
        return {}


# ----------------------------------------------------------------------------------------------------------
# Structured states: flattening and the checks of what goes in and out of f.

def _describe(x) -> str:
    """A short description of a value ``f`` returned or a caller passed, for error messages."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}: ({', '.join(_describe(p) for p in x)})"
    return "None" if x is None else f"a {type(x).__name__}"


@dataclass(frozen=True)
class StateSpec:
    """Shapes (without the batch dimension) of the parts of a state, and whether it was a tuple."""

    shapes: tuple[tuple[int, ...], ...]
    is_tuple: bool
    batch_size: int
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(z, what: str = "z0") -> "StateSpec":
        """The spec of a state; a batch of size 0 is valid (the solve of an empty batch is empty)."""
        parts = tuple(z) if isinstance(z, (tuple, list)) else (z,)
        if len(parts) == 0:
            raise ShapeMismatchError(f"{what} is an empty tuple; pass at least one tensor")
        for i, p in enumerate(parts):
            name = f"{what}[{i}]" if len(parts) > 1 else what
            if not isinstance(p, torch.Tensor):
                raise OptionTypeError(f"{name} must be a torch.Tensor, got {_describe(p)}")
            if not p.is_floating_point():
                raise OptionTypeError(
                    f"{name} must be a floating-point tensor, got dtype {p.dtype}: an integer or boolean state "
                    f"cannot be iterated (create it with dtype=torch.float32 or the cell's dtype)"
                )
            if p.dim() < 1:
                raise ShapeMismatchError(
                    f"{name} must have a leading batch dimension, got a 0-d tensor (shape {tuple(p.shape)})"
                )
        b = parts[0].shape[0]
        for i, p in enumerate(parts[1:], 1):
            if p.shape[0] != b:
                raise ShapeMismatchError(f"{what}[{i}] has batch size {p.shape[0]} but {what}[0] has {b}")
            if p.dtype != parts[0].dtype:
                raise OptionTypeError(f"{what}[{i}] has dtype {p.dtype} but {what}[0] has {parts[0].dtype}")
            if p.device != parts[0].device:
                raise ShapeMismatchError(f"{what}[{i}] is on {p.device} but {what}[0] is on {parts[0].device}")
        return StateSpec(
            tuple(tuple(p.shape[1:]) for p in parts),
            isinstance(z, (tuple, list)),
            b,
            parts[0].dtype,
            parts[0].device,
        )

    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        # cached in the instance's __dict__ (not a field): flatten and unflatten run once per evaluation
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Elements per sample: the width ``N`` of the flat state."""
        return sum(self.sizes)

    def autocast_output(self, dtype: torch.dtype, autocast: torch.dtype | None = None) -> bool:
        """Whether ``f`` may return ``dtype`` for this state: the mixed-precision policy. Under
        ``torch.autocast`` the cell computes in the autocast dtype (bfloat16 / float16) while the solver's
        state, histories, Gram matrices and residual norms stay in the state's wider dtype; the output is cast
        up on flattening. Outside autocast a dtype change is a mistake."""
        if autocast is None:  # ``autocast``: the autocast dtype the caller's solve started under, if any
            kind = self.device.type
            autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return (autocast is not None and dtype == autocast and self.dtype.is_floating_point
                and torch.finfo(dtype).bits < torch.finfo(self.dtype).bits)

    def flatten(self, z) -> torch.Tensor:
        parts = tuple(z) if self.is_tuple else (z,)
        # Explicit sizes, not -1: a batch of size 0 has no inferable trailing dimension. A part in another
        # dtype (the autocast dtype, see autocast_output) is cast to the state's.
        if len(parts) == 1:
            p = parts[0].reshape(parts[0].shape[0], self.sizes[0])
            return p if p.dtype == self.dtype else p.to(self.dtype)
        return torch.cat([p.reshape(p.shape[0], n).to(self.dtype) for p, n in zip(parts, self.sizes)], dim=1)

    def unflatten(self, flat: torch.Tensor):
        b = flat.shape[0]
        if not self.is_tuple:
            return flat.reshape(b, *self.shapes[0])
        chunks = torch.split(flat, self.sizes, dim=1)
        return tuple(c.reshape(b, *s) for c, s in zip(chunks, self.shapes))

    def expected(self, batch: int) -> str:
        shapes = [f"({', '.join(str(d) for d in (batch, *s))})" for s in self.shapes]
        kind = f"a tuple of {len(shapes)} tensors of shapes {', '.join(shapes)}" if self.is_tuple else (
            f"a tensor of shape {shapes[0]}")
        return f"{kind}, dtype {self.dtype}, on {self.device} (the structure of z)"

    def check_output(self, fz, batch: int, what: str = "f(z)", autocast: torch.dtype | None = None) -> None:
        """Raise a typed error if ``f(z)`` does not have the structure, shape, dtype and device of ``z``.

        ``None`` or a non-tensor is an :class:`OptionTypeError`; a wrong structure (tuple vs tensor, number of
        parts), shape (batch size, a flattened state), dtype or device is a :class:`ShapeMismatchError`. Each
        message names what ``f`` returned and what was expected.
        """
        if fz is None or not isinstance(fz, (torch.Tensor, tuple, list)):
            raise OptionTypeError(f"{what} returned {_describe(fz)}; expected {self.expected(batch)}")
        parts = tuple(fz) if isinstance(fz, (tuple, list)) else (fz,)
        if isinstance(fz, (tuple, list)) != self.is_tuple or len(parts) != len(self.shapes):
            raise ShapeMismatchError(f"{what} returned {_describe(fz)}; expected {self.expected(batch)}")
        for i, (p, s) in enumerate(zip(parts, self.shapes)):
            name = f"{what}[{i}]" if self.is_tuple else what
            if not isinstance(p, torch.Tensor):
                raise OptionTypeError(f"{name} is {_describe(p)}; expected {self.expected(batch)}")
            if tuple(p.shape) != (batch, *s):
                hint = ""
                if p.dim() >= 1 and p.shape[0] != batch:
                    hint = f": batch size {p.shape[0]} instead of {batch}"
                elif p.numel() == batch * math.prod(s):
                    hint = ": the right number of elements in another shape (a flattened state?); reshape it"
                raise ShapeMismatchError(
                    f"{name} has shape {tuple(p.shape)} but z has shape {(batch, *s)}{hint}; a fixed-point map "
                    f"must preserve the shape of its state (expected {self.expected(batch)})"
                )
            if p.dtype != self.dtype and not self.autocast_output(p.dtype, autocast):
                raise ShapeMismatchError(
                    f"{name} has dtype {p.dtype} but z has dtype {self.dtype}; a fixed-point map must preserve "
                    f"the dtype of its state (only under torch.autocast may it return the autocast dtype, "
                    f"the state staying in z0's)"
                )
            if p.device != self.device:
                raise ShapeMismatchError(f"{name} is on {p.device} but z is on {self.device}")


def nonfinite_rows(t: torch.Tensor, batch: int, *, batched: bool = True) -> torch.Tensor | None:
    """The ``[batch]`` mask of samples of ``t`` holding NaN or Inf, or ``None`` when every value is finite.

    A tensor whose first dimension is ``batch`` is batched (one row per sample) unless ``batched=False``; any
    other tensor (an adjacency, a table, a scalar) concerns every sample, so one non-finite value marks them
    all. One
    reduction screens the tensor (NaN and Inf propagate through a sum); only if the sum is not finite (a real
    NaN/Inf, or an overflow of large finite values) is the element-wise test run.
    """
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    # cmath.isfinite on the host (real or complex): torch.isfinite is three kernels, and the value must come to the host anyway
    if cmath.isfinite(t.sum().item()) or bool(torch.isfinite(t).all()):
        return None
    if batched and t.dim() > 0 and t.shape[0] == batch:
        return (~torch.isfinite(t.reshape(batch, -1))).any(-1)
    return torch.ones(batch, dtype=torch.bool, device=t.device)


def check_finite(t, what: str) -> None:
    """Raise :class:`NonFiniteInputError` naming ``what`` if a floating tensor holds NaN or Inf."""
    parts = tuple(t) if isinstance(t, (tuple, list)) else (t,)
    for i, p in enumerate(parts):
        if not isinstance(p, torch.Tensor) or p.numel() == 0:
            continue
        bad = nonfinite_rows(p, p.shape[0] if p.dim() else 1)
        if bad is not None:
            name = f"{what}[{i}]" if len(parts) > 1 else what
            raise NonFiniteInputError(
                f"{name} contains NaN or Inf (samples {bad.nonzero().flatten().tolist()[:8]}); refusing to iterate"
            )


# ----------------------------------------------------------------------------------------------------------
# The loop.

ON_FAILURE = ("raise", "warn", "ignore")
STOPPING = ("verify", "per_sample", "joint")
PHASES = ("forward", "backward", "jvp")

#: a coupling undetected by ``stopping="verify"`` moves a residual by at most this fraction of its tolerance
TAU = 1.0 / 16
#: differences below ``KAPPA * eps * ||f_i||`` are round-off (batch-size-dependent BLAS kernels): measured <= 4.2
KAPPA = 16.0


@dataclass(frozen=True)
class LoopOptions:
    """How one solve stops and what it does on failure: the options every solve shares (forward, adjoint,
    tangent, each stage of a chain), as one value, validated once when it is built.

    Sample ``i`` has converged when ``||f(z_i) - z_i|| <= atol + rtol ||f(z_i)||`` (finite numbers >= 0, not
    both 0), within ``max_iter`` iterations (an integer >= 0). ``on_failure``: ``"raise"`` a
    :class:`ConvergenceError`, ``"warn"`` or ``"ignore"`` when some sample did not converge (the statistics say
    so either way). ``divergence_ratio`` (> 1; ``inf`` disables the test): a residual above that multiple of the
    initial one is divergence. ``return_trace``: record the per-sample residual after every iteration.
    ``check_every``: the host reads convergence once every that many iterations (1: every iteration; > 1: the
    device mode of :meth:`_Loop.iterate_device`). ``where`` prefixes error messages (who built the value).
    """

    atol: float = 1e-5
    rtol: float = 1e-5
    max_iter: int = 100
    on_failure: str = "warn"
    divergence_ratio: float = 1e6
    return_trace: bool = False
    check_every: int = 1
    where: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        w = self.where
        atol = _validate.in_range(self.atol, "atol", where=w, low=0.0)
        rtol = _validate.in_range(self.rtol, "rtol", where=w, low=0.0)
        if atol == 0 and rtol == 0:
            raise ValidationError(f"{w + ': ' if w else ''}atol and rtol are both 0: "
                                  "no sample could ever be declared converged")
        for name, value in (("atol", atol), ("rtol", rtol),
                            ("max_iter", _validate.non_negative_int(self.max_iter, "max_iter", where=w)),
                            ("on_failure", _validate.choice(self.on_failure, "on_failure", ON_FAILURE, where=w)),
                            ("divergence_ratio", _validate.in_range(self.divergence_ratio, "divergence_ratio",
                                                                    where=w, low=1.0, low_open=True,
                                                                    allow_inf=True)),
                            ("return_trace", _validate.boolean(self.return_trace, "return_trace", where=w)),
                            ("check_every", _validate.positive_int(self.check_every, "check_every", where=w))):
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> "LoopOptions":
        """A copy with ``changes`` applied (validated like a new value)."""
        return dataclasses.replace(self, **changes)


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
    tiny = torch.finfo(r.dtype).tiny
    # (an absolute tolerance alone: one division by a number, not a tensor of tolerances)
    ratio = r / max(atol, tiny) if fn is None else r / (atol + rtol * fn).clamp_min(tiny)
    ratio = torch.nan_to_num(ratio, nan=float("inf"))
    if excluded is not None:
        ratio = ratio.masked_fill(excluded, 0.0)
    return ratio.amax()


def _disagree(f_new, f_old, z, live, conv, loop) -> torch.Tensor:
    """Device bool: a ``live`` row's fresh ``f_new`` differs from its stored ``f_old`` by more than
    ``max(TAU tol_i, KAPPA eps ||f_old_i||)``, or a ``conv`` (converged) row fails its own test under ``f_new``."""
    fnorm = _vnorm(f_old, dim=1)
    roundoff = KAPPA * loop.eps * fnorm
    threshold = torch.maximum(TAU * (loop.atol + loop.rtol * fnorm), roundoff)
    moved = live & ~(_vnorm(f_new - f_old, dim=1) <= threshold)
    # A converged row fails when its fresh residual exceeds its tolerance by more than round-off: a row that
    # converged within round-off of its tolerance must not send an independent batch to joint stopping.
    fresh = _vnorm(f_new, dim=1)
    limit = loop.atol + loop.rtol * fresh + roundoff
    stale = conv & ~(_vnorm(f_new - z, dim=1) <= limit)
    return (moved | stale).any()


class _Loop:
    """The state of one solve (a class rather than closures: the joint fallback resets most of it)."""

    def __init__(self, f, z0, solver, args, kwargs, options: "LoopOptions", stopping, excluded, phase,
                 verified=False, keep=(), spec=None):
        self.f, self.solver, self.args, self.kwargs = f, solver, args, kwargs
        self.atol, self.rtol, self.max_iter = options.atol, options.rtol, options.max_iter
        return_trace, divergence_ratio, check_every = options.return_trace, options.divergence_ratio, options.check_every
        self.spec = spec = StateSpec.of(z0) if spec is None else spec
        kind = spec.device.type
        # Mixed precision: under autocast only f runs in the autocast dtype; the loop and the solver's
        # arithmetic (histories, Gram matrices, mixing) run with autocast off, in the state's dtype (run_loop).
        self.autocast = (kind, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else None
        if self.autocast is not None:
            def f_autocast(*a, _f=f, _kind=kind, _dtype=self.autocast[1], **k):
                with torch.autocast(_kind, dtype=_dtype):
                    return _f(*a, **k)

            self.f = f_autocast
        self.B = B = spec.batch_size
        self.eps = torch.finfo(spec.dtype).eps  # raised to the cell's output dtype's under autocast (_flat)
        self.cell_dtype = spec.dtype
        self.use_rel = self.rtol > 0
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
        self._sliced = None  # (idx, args at idx) of the last sub-batch evaluation
        self._stepped = None  # (idx, z rows, z, f(z), f rows) stored by the last sub-batch step
        self._idx = None  # the stepping rows of per-sample stopping, recomputed when samples freeze
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
        self.check_every = check_every
        if check_every > 1:
            # The device mode: every row evaluated each iteration, converged rows held in place by a mask,
            # convergence re-read from fresh residuals; it needs no verification (nothing is sliced).
            self.verify = self.pending = False
            if self.mode != "joint":
                self.info["stopping"] = f"per_sample (whole batch, masked; host check every {check_every})"
            else:
                self.info["stopping"] = f"joint (host check every {check_every})"

    # -- evaluations ---------------------------------------------------------------------------------------
    def evaluate(self, zr: torch.Tensor, idx: torch.Tensor | None, zfull: torch.Tensor, check: bool = False):
        """``f`` on rows ``idx`` (``None``: all) of the state whose other rows are ``zfull``'s; flat output.

        With ``self.probe`` set (rows of frozen samples, once, in the first sub-batch step of a verified
        solve), those rows are evaluated along with ``idx`` in the same call and their outputs kept in
        ``self.probe_out``: the independence probe costs rows, not a call.
        """
        self.nfe += 1
        spec, B = self.spec, self.B
        if idx is None:  # the whole batch (the usual case): no slicing, no probe (probes join sub-batch steps)
            self.probe = None
            return self._flat(self.f(spec.unflatten(zr), *self.args, **self.kwargs), B, check)
        if self.sliceable:
            probe, self.probe = self.probe, None
            if probe is not None:
                n = idx.numel()
                both = torch.cat([idx, probe])
                zr = torch.cat([zr, zfull.index_select(0, probe)])
                out = self.f(spec.unflatten(zr), *_slice_args(self.args, both, B), **self.kwargs)
                flat = self._flat(out, both.numel(), check)
                self.probe_out = flat[n:]
                return flat[:n]
            out = self.f(spec.unflatten(zr), *self.sliced_args(idx), **self.kwargs)
            return self._flat(out, idx.numel(), check)
        zz = zfull.index_copy(0, idx, zr)
        flat = self._flat(self.f(spec.unflatten(zz), *self.args, **self.kwargs), B, check)
        self.full_out = flat
        return flat.index_select(0, idx)

    def sliced_args(self, idx: torch.Tensor) -> tuple:
        """The batched args at rows ``idx``, gathered once per stepping set: the set changes only when samples
        freeze, so most iterations reuse the last gather (the loop passes the same index object while the
        set is unchanged; see iterate)."""
        last = self._sliced
        if last is not None and last[0] is idx:
            return last[1]
        sliced = _slice_args(self.args, idx, self.B)
        self._sliced = (idx, sliced)
        return sliced

    def _flat(self, out, n: int, check: bool) -> torch.Tensor:
        spec = self.spec
        if check:
            spec.check_output(out, n, autocast=self._autocast_dtype())
            first = out[0] if isinstance(out, (tuple, list)) else out
            if first.dtype != spec.dtype:
                # Mixed precision: the cell's output dtype bounds what a residual can resolve.
                self.cell_dtype = first.dtype
                self.eps = max(self.eps, torch.finfo(first.dtype).eps)
                self.info["cell_dtype"] = str(first.dtype)
        try:
            flat = spec.flatten(out)
        except (RuntimeError, TypeError, AttributeError):
            spec.check_output(out, n, autocast=self._autocast_dtype())  # a typed error naming what f returned
            raise
        if flat.shape[0] != n or flat.shape[1] != self.N:
            # later calls: the cheap test first, then the named error
            spec.check_output(out, n, autocast=self._autocast_dtype())
        return flat

    def _autocast_dtype(self):
        return None if self.autocast is None else self.autocast[1]

    def residual(self, zz, ff):
        # ||f(z)|| is needed per iteration only for a relative tolerance; otherwise once, at the end.
        return _vnorm(ff - zz, dim=1), (_vnorm(ff, dim=1) if self.use_rel else None)

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
        self.diverged = ~(r < math.inf)  # a norm is finite iff below inf (NaN fails); one kernel, not isfinite's three
        self.converged = is_converged(r, fn, self.atol, self.rtol) & ~self.diverged
        self.best_res = torch.where(self.diverged, inf, r)
        # best_z / best_fz are the current z / fz themselves while every sample's best iterate is its current
        # one (the usual case for a converging solve), so tracking the best costs no copy. Per-sample stopping
        # keeps them lazily (None): row i's best is z[i] where best_is_last[i], else saved_z[i], a private
        # buffer into which a row is copied at the step it stops being its best (see best()).
        self.best_z, self.best_fz = z, fz
        self.saved_z = self.saved_fz = None
        self.best_is_last = torch.ones(B, dtype=torch.bool, device=z.device)
        self.nstep = torch.zeros(B, dtype=torch.long, device=z.device)
        self.trace = [r.clone()] if self.return_trace else None
        self.state = self.solver.init(z, fz)
        if self.check_every > 1:
            self.state["sync_free"] = True
        # ~(r <= limit) is true for NaN, Inf and blow-up alike: one comparison per iteration.
        self.div_limit = self.divergence_ratio * torch.clamp(self.best_res, min=self.atol)
        self._start = (r, fn, fz)  # for the joint divergence limit, built only if the solve is (or turns) joint
        self.div_limit_joint = None
        if self.rtol < self.eps:
            self.check_tolerance(fn if fn is not None else _vnorm(fz, dim=1))
        if self.mode == "joint":
            self.best_worst = torch.tensor(float("inf"), dtype=r.dtype, device=r.device)
            self.finished = self.joint_update()
            if self.check_every > 1:
                self.best_worst = _worst(r, fn, self.atol, self.rtol, excluded)
        else:
            self.done = self.converged | self.diverged
            self.n_active = B - int(self.done.sum())
            self.finished = self.n_active == 0

    def joint_limit(self) -> torch.Tensor:
        """Joint stopping's divergence limit: one for the system, from its largest initial residual or
        tolerance (a row that starts at its fixed point is moved by the others, which is not divergence)."""
        if self.div_limit_joint is None:
            r, fn, fz = self._start
            fn0 = fn if fn is not None else _vnorm(fz, dim=1)
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
        key = (self.cell_dtype, self.atol, self.rtol)
        if key in _TOLERANCE_WARNED:
            return
        _TOLERANCE_WARNED.add(key)
        what = str(self.spec.dtype) if self.cell_dtype == self.spec.dtype else (
            f"{self.cell_dtype} (the cell's output under autocast; the state is {self.spec.dtype})")
        warnings.warn(
            f"{self.phase} solve: atol={self.atol:g}, rtol={self.rtol:g} is below what {what} resolves "
            f"for this state: one evaluation of f is exact to about eps * ||f(z)|| = {floor:.2g} (eps={self.eps:.2g}, "
            f"mean ||f(z0)|| = {m:.3g}), so residuals below that are round-off. A tolerance {what} can "
            f"reach: atol >= {floor:.2g} or rtol >= {self.eps:.2g} (or solve in a wider dtype). The tolerance is "
            f"kept as given; stats.info['tolerance_floor'] records {floor:.2g}. (Warned once per dtype and "
            f"tolerance.)",
            ToleranceWarning,
            stacklevel=_user_stacklevel(),
        )

    # -- iterations ----------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.check_every > 1:
            self.iterate_device()
            return
        self.iterate()
        # The verification of a sliced solve ends with one evaluation of the whole system at the returned
        # iterate; if it finds coupling the solve goes on jointly from there, with the iterations left.
        while self.final_check() and self.it < self.max_iter and not self.finished:
            self.iterate()

    def iterate(self) -> None:
        while self.it < self.max_iter and not self.finished:
            if self.mode == "joint" or self.n_active == self.n_sys:
                idx = self.sys_idx
            elif self._idx is None or self._idx.numel() != self.n_active:
                idx = self._idx = (~self.done).nonzero().flatten()
            else:
                # done only grows under per-sample stopping (a frozen row's flags are never rewritten), so the
                # same count is the same set: the same index object, which the reuse below tests by identity.
                idx = self._idx
            partial = self.mode == "per_sample" and self.n_active < self.n_sys
            first = partial and self.pending
            z, fz = self.z, self.fz
            if first and self.sliceable:
                # Every step so far ran on the whole system, so fz is f(z) evaluated in the whole batch.
                self.probe = self._probe_idx = self.probe_rows()
                self._probe_ref = None if self.probe is None else (rows(z, self.probe), rows(fz, self.probe))
            zr, fr = self.stepping_rows(idx)
            try:
                z_new, fz_new = self.solver.step(
                    self.state, zr, fr, idx, lambda zz, _i=idx, _z=z: self.evaluate(zz, _i, _z)
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
            r_new, fn_new = self.store(z, fz, idx, z_new, fz_new)
            if idx is None:
                self.nstep.add_(1)
            else:
                self.nstep.index_add_(0, idx, torch.ones_like(idx))
            if self.mode == "joint":
                self.finished = self.joint_update()
            else:
                self.sub_batched |= partial
                self.per_sample_update(idx, r_new, fn_new, partial, first, z, fz)
            if self.it in self.keep:
                self.kept[self.it] = self.z  # never modified in place: the loop replaces, it does not write
            if self.return_trace:
                self.trace.append(self.last_res.clone())

    def stepping_rows(self, idx):
        """Rows ``idx`` of ``z`` and ``f(z)``: the last step's own outputs when it stepped the same rows and the
        state is the one it stored (the usual case between two freezes; nothing replaced z since), else a
        gather."""
        if idx is None:
            return self.z, self.fz
        last = self._stepped
        if last is not None and last[0] is idx and last[2] is self.z and last[3] is self.fz:
            return last[1], last[4]
        return rows(self.z, idx), rows(self.fz, idx)

    def store(self, z, fz, idx, z_new, fz_new):
        """Put a step's rows ``idx`` (``None``: all) of ``z_new, f(z_new)`` and their residuals into the state;
        returns the step's ``(r, ||f||)``."""
        r_new, fn_new = self.residual(z_new, fz_new)
        if idx is None:
            self.z, self.fz, self.last_res, self.last_fn = z_new, fz_new, r_new, fn_new
        else:
            self.z = z.index_copy(0, idx, z_new)
            self.fz = fz.index_copy(0, idx, fz_new)
            self._stepped = (idx, z_new, self.z, self.fz, fz_new)  # (never written in place: see stepping_rows)
            self.last_res = self.last_res.index_copy(0, idx, r_new)
            if fn_new is not None:
                self.last_fn = self.last_fn.index_copy(0, idx, fn_new)
        return r_new, fn_new

    def iterate_device(self) -> None:
        """Iterations without a host synchronisation: the host reads whether the solve is finished once every
        ``check_every`` iterations (and at ``max_iter``); everything else stays on the device.

        Every row of the system is evaluated at every iteration; a row that meets the tolerance is held in
        place (``torch.where``, before the evaluation, so ``f`` sees it where it is) and stops counting
        iterations, so ``nstep``, the residuals and the returned iterates are those of per-sample stopping.
        Its residual is re-read from each fresh evaluation: a row moved by others (a cell coupling rows) fails
        the test again and iterates again, so the solve ends only when every row passes in one evaluation of
        the whole batch (no verification is needed). Divergence is sticky. The cost: up to ``check_every - 1``
        iterations past the last convergence, in which no row moves. A held row's solver state (e.g. Anderson's
        history) receives that row's discarded proposal; it is never used unless the row is moved again by a
        coupled cell, in which case the iteration stays correct (the residual is always the true one) but may
        be slower."""
        idx, joint = self.sys_idx, self.mode == "joint"
        while not self.finished and self.it < self.max_iter:
            for _ in range(min(self.check_every, self.max_iter - self.it)):
                z, fz = self.z, self.fz
                zs, fs = rows(z, idx), rows(fz, idx)
                hold = None if joint else rows(self.done, idx).unsqueeze(1)

                def evaluate(zz, _z=z, _zs=zs, _hold=hold):
                    return self.evaluate(zz if _hold is None else torch.where(_hold, _zs, zz), idx, _z)

                z_new, fz_new = self.solver.step(self.state, zs, fs, idx, evaluate)
                if hold is not None:
                    z_new = torch.where(hold, zs, z_new)  # what f was evaluated at
                self.it += 1
                self.store(z, fz, idx, z_new, fz_new)
                if joint:
                    self.nstep.add_(1 if self.excluded is None else self.system.long())
                    self.device_joint_update()
                else:
                    self.nstep.add_((~self.done).long())
                    self.device_update()
                if self.it in self.keep:
                    self.kept[self.it] = self.z
                if self.return_trace:
                    self.trace.append(self.last_res.clone())
            # The host check: one synchronisation per check_every iterations.
            self.finished = bool(self.finished_flag)

    def device_update(self) -> None:
        r, fn = self.last_res, self.last_fn
        conv = is_converged(r, fn, self.atol, self.rtol)
        if self.excluded is not None:
            conv = conv & self.system
        improved = r < self.best_res
        self.best_res = torch.where(improved, r, self.best_res)
        keep = improved.unsqueeze(1)
        self.best_z = torch.where(keep, self.z, self.best_z)
        self.best_fz = torch.where(keep, self.fz, self.best_fz)
        self.best_is_last = r <= self.best_res  # the current iterate is the sample's best (NaN: not)
        self.diverged = self.diverged | (~(r <= self.div_limit) & ~conv)
        self.converged = conv
        self.done = conv | self.diverged
        self.finished_flag = self.done.all()

    def joint_measures(self):
        """Joint stopping's per-step quantities at the current iterate: ``(r, conv, bad, worst, passed)`` (all on
        the device): residuals, converged and diverged rows, the worst scaled residual, rows that pass."""
        r, fn, excluded = self.last_res, self.last_fn, self.excluded
        conv = is_converged(r, fn, self.atol, self.rtol)
        bad = ~(r <= self.joint_limit()) & ~conv
        if excluded is not None:
            conv, bad = conv & ~excluded, bad & ~excluded
        worst = _worst(r, fn, self.atol, self.rtol, excluded)
        return r, conv, bad, worst, (conv if excluded is None else conv | excluded)

    def device_joint_update(self) -> None:
        excluded = self.excluded
        r, conv, bad, worst, passed = self.joint_measures()
        better = worst < self.best_worst
        self.best_worst = torch.where(better, worst, self.best_worst)
        self.best_z = torch.where(better, self.z, self.best_z)
        self.best_fz = torch.where(better, self.fz, self.best_fz)
        self.best_res = torch.where(better, r, self.best_res)
        self.best_is_last = better.expand_as(self.best_is_last).clone()
        if excluded is not None:
            self.best_is_last |= excluded
        self.converged = conv
        self.diverged = bad if excluded is None else bad | excluded
        self.finished_flag = passed.all() | bad.any()

    def probe_rows(self) -> torch.Tensor | None:
        """Up to ``max(1, n_sys // 8)`` finite samples whose stored ``f`` is re-evaluated, at their stored
        iterate, inside the first sub-batch call. Active samples first (as duplicates, at their previous
        iterate): with them the call's batch lacks every frozen sample, whereas probing all frozen samples
        would rebuild the whole batch and hide a dependence on it."""
        live = ~self.diverged
        cand = torch.cat([(~self.done).nonzero().flatten(), (self.done & live).nonzero().flatten()])
        return cand[: max(1, self.n_sys // 8)] if cand.numel() else None

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The best iterate of every sample and ``f`` there (materialised from the lazy form if needed)."""
        if self.best_z is None:
            keep = self.best_is_last.unsqueeze(1)
            # (every row that is not its own best has been written into saved_z / saved_fz)
            self.best_z = torch.where(keep, self.z, self.saved_z)
            self.best_fz = torch.where(keep, self.fz, self.saved_fz)
        return self.best_z, self.best_fz

    def per_sample_update(self, idx, r_new, fn_new, partial: bool, first: bool, z_prev, fz_prev) -> None:
        conv_new = is_converged(r_new, fn_new, self.atol, self.rtol)
        was_best = self.best_is_last
        if idx is None:
            # Every sample took this step (the usual early iterations): no masks, no scatter.
            improved = r_new < self.best_res
            self.best_res = torch.where(improved, r_new, self.best_res)
            self.best_is_last = improved
            self.converged = conv_new
            self.diverged = ~((r_new <= self.div_limit) | conv_new)  # NaN fails <=: diverged unless converged
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
        # Rows whose best iterate is the one this step moved away from: copied into the saved buffers (a few
        # rows, usually none), instead of two whole-batch selects of the best iterate per step.
        lost = was_best & ~self.best_is_last
        # The one host sync of the iteration: counts of one stacked reduction, so "all"/"any" need no extra
        # reductions.
        counts = torch.stack([self.best_is_last, lost, self.done]).sum(1)
        if coupled is not None:
            counts = torch.cat([counts, coupled.reshape(1).long()])
        flags = counts.tolist()
        if flags[1]:
            rows_lost = lost.nonzero().flatten()
            if self.saved_z is None:
                # Uninitialised: a row is read only where best_is_last is false, i.e. after it was written here.
                self.saved_z, self.saved_fz = torch.empty_like(z_prev), torch.empty_like(fz_prev)
            self.saved_z.index_copy_(0, rows_lost, z_prev.index_select(0, rows_lost))
            self.saved_fz.index_copy_(0, rows_lost, fz_prev.index_select(0, rows_lost))
        if flags[0] == self.B:
            self.best_z, self.best_fz = self.z, self.fz
        else:
            self.best_z = self.best_fz = None  # lazy: best() materialises them when asked
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
        best_z, best_fz = self.best()
        self.z = torch.where(keep, best_z, self.z)
        self.fz = torch.where(keep, best_fz, self.fz)

    def final_check(self) -> bool:
        """The end of a verified sliced solve: ``f`` on the whole system at the returned iterate, compared
        with the stored rows. True if coupling was found (the solve is then joint, at that iterate)."""
        if self.final_checked or not (self.verify and self.sliceable and self.sub_batched) or self.mode == "joint":
            return False
        self.final_checked = True
        if self.verified:
            self.info["stopping"] = "per_sample (verified by an earlier solve; probe passed)"
            return False
        self.z, self.fz = self.best()
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
        if self.check_every > 1:
            self.state["sync_free"] = True
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
        excluded = self.excluded
        r, conv, bad, worst, passed = self.joint_measures()
        improved = worst < self.best_worst
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
        (out_z, best_fz), out_res = self.best(), self.best_res
        if self.solver.verify_final:
            f_sys = self.evaluate(rows(out_z, self.sys_idx), self.sys_idx, out_z)
            best_fz = f_sys if self.sys_idx is None else torch.zeros_like(out_z).index_copy(0, self.sys_idx, f_sys)
            out_res = _vnorm(best_fz - out_z, dim=1)
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
            self.solver.name, out_res, _vnorm(best_fz, dim=1), nstep=self.nstep, diverged=self.diverged,
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
    options: LoopOptions,
    args: Sequence = (),
    kwargs: Mapping | None = None,
    check_inputs: bool = True,
    stopping: str = "verify",
    arg_names: Sequence[str] | None = None,
    phase: str = "forward",
    verified: bool = False,
    keep: Sequence[int] = (),
    keep_state: bool = False,
):
    """Solve ``z = f(z, *args, **kwargs)`` from ``z0``; return ``(z, stats)`` with ``z`` shaped like ``z0``.

    ``options`` (a :class:`LoopOptions`) is the stopping rule and failure policy. See the module docstring
    for the contract: ``args`` batched (sliced), ``kwargs`` never sliced,
    ``stopping`` in :data:`STOPPING`, ``arg_names`` (one name per arg, default ``"args[i]"``) naming inputs in
    messages, ``phase`` (``"forward"``/``"backward"``) naming the solve in messages. ``check_inputs=False``
    skips the NaN/Inf screening of ``z0`` and the inputs (for callers whose inputs are known finite).
    ``verified=True`` (with ``stopping="verify"``) says an earlier solve of the same map and input signature
    passed the full verification: the probe still runs (and falls back to joint on coupling), the final
    whole-batch check is skipped (see :mod:`iterlayers.implicit` for the cache that decides this).
    ``keep``: iterations whose state is returned in ``stats.iterates`` (``0`` is ``z0``). ``keep_state``: the
    solver's final state is returned in ``stats.state`` (rows of samples frozen early hold their state then).
    ``options.check_every`` > 1: the host reads convergence once every that many iterations, not every iteration
    (the device mode of :meth:`_Loop.iterate_device`: the whole batch each iteration, converged rows held by a
    mask, per-sample statistics unchanged; ``stopping="verify"`` needs no verification there).
    """
    if not isinstance(options, LoopOptions):
        raise OptionTypeError(f"run_loop: options must be a LoopOptions, got {_describe(options)}")
    on_failure = options.on_failure
    # The checks name the mistake through the one vocabulary, entered only when a value is not valid (a solve
    # with valid options runs no validation code outside this module).
    for value, name, allowed in ((stopping, "stopping", STOPPING), (phase, "phase", PHASES)):
        if not (isinstance(value, str) and value in allowed):
            _validate.choice(value, name, allowed, where="run_loop")
    # (exact-type tests first: the abstract-class checks cost microseconds per solve)
    if kwargs is None:
        kwargs = {}
    elif type(kwargs) is not dict and not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise OptionTypeError(
            f"kwargs must be a dict of keyword arguments for f (never sliced) or None, got {_describe(kwargs)}"
        )
    if type(args) is not tuple and (isinstance(args, (torch.Tensor, str)) or not isinstance(args, Sequence)):
        raise OptionTypeError(f"args must be a tuple of inputs of f, got {_describe(args)}; wrap one as (x,)")
    args = tuple(args)
    if keep:
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
    loop = _Loop(f, z0, solver, args, kwargs, options, stopping, excluded, phase, verified=bool(verified), keep=keep,
                 spec=spec)
    if note is not None:
        loop.info["nonfinite_input"] = note
    if B == 0 or loop.n_sys == 0:
        # Nothing to iterate: an empty batch, or every sample excluded. f is not called.
        z = loop.z.clone()
        res = torch.full((B,), float("inf"), dtype=z.dtype, device=z.device)
        none = torch.zeros(B, dtype=torch.bool, device=z.device)
        stats = SolverStats.of_final_iterate(
            solver.name, res, torch.zeros_like(res), nstep=torch.zeros(B, dtype=torch.long, device=z.device),
            diverged=~none, best=none, nfe=0, atol=options.atol, rtol=options.rtol, max_iter=options.max_iter,
            trace=[res.clone()] if options.return_trace else None, info=loop.info,
            iterates={k: spec.unflatten(z) for k in keep} if keep else None,
        )
    else:
        with (torch.autocast(spec.device.type, enabled=False) if loop.autocast else contextlib.nullcontext()):
            loop.start()
            loop.run()
            z, stats = loop.result()
        if keep_state:
            stats.state = loop.state
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
