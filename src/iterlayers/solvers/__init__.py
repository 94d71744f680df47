"""Batched fixed-point solvers: tensors in, tensors and statistics out (no nn.Module, no autograd)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ._loop import ON_FAILURE, FixedPointSolver, LoopOptions, StateSpec, report_failure, run_loop
from .anderson import AndersonSolver
from .broyden import BroydenSolver
from .chain import make_chain, solve_chain
from .errors import (
    ConvergenceError,
    ConvergenceWarning,
    IterlayersError,
    NonFiniteInputError,
    OptionTypeError,
    ShapeMismatchError,
    ValidationError,
)
from .gmres import GMRESSolver
from .picard import PicardSolver
from ._loop import CONVERGED, DIVERGED, MAX_ITER, SolverStats, is_converged

__all__ = [
    "solve",
    "run_loop",
    "LoopOptions",
    "report_failure",
    "StateSpec",
    "is_converged",
    "ON_FAILURE",
    "solve_chain",
    "make_chain",
    "Solution",
    "make_solver",
    "register_solver",
    "SOLVERS",
    "FixedPointSolver",
    "PicardSolver",
    "AndersonSolver",
    "BroydenSolver",
    "GMRESSolver",
    "SolverStats",
    "ConvergenceError",
    "ConvergenceWarning",
    "IterlayersError",
    "NonFiniteInputError",
    "ShapeMismatchError",
    "ValidationError",
    "OptionTypeError",
    "CONVERGED",
    "DIVERGED",
    "MAX_ITER",
]

SOLVERS: dict[str, type[FixedPointSolver]] = {
    "picard": PicardSolver,
    "anderson": AndersonSolver,
    "broyden": BroydenSolver,
    "gmres": GMRESSolver,
}
from .splitting import ForwardBackwardSolver, PeacemanRachfordSolver  # noqa: E402  (monDEQ splittings)
SOLVERS.update({cls.name: cls for cls in (ForwardBackwardSolver, PeacemanRachfordSolver)})


def register_solver(cls: type[FixedPointSolver]) -> type[FixedPointSolver]:
    """Register a solver class under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, FixedPointSolver)):
        raise OptionTypeError(f"register_solver: expected a FixedPointSolver subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name or cls.name == FixedPointSolver.name:
        raise ValidationError(f"register_solver: {cls.__name__} needs its own non-empty class attribute `name`")
    SOLVERS[cls.name] = cls
    return cls


def make_solver(solver: str | FixedPointSolver, options: dict | None = None) -> FixedPointSolver:
    """A validated solver value from its name and options (or a solver instance, validated as is).

    An unknown name raises :class:`ValidationError`, an unknown option :class:`OptionTypeError`, both naming
    the valid ones; a bad option value raises the error of :meth:`FixedPointSolver.validate`.
    """
    if options is not None and not isinstance(options, dict):
        raise OptionTypeError(f"solver options must be a dict, got {type(options).__name__}")
    options = dict(options or {})
    if isinstance(solver, FixedPointSolver):
        if options:
            raise OptionTypeError(f"options {sorted(options)} given with a solver instance; set them on the instance")
        solver.validate()
        return solver
    if not isinstance(solver, str):
        raise OptionTypeError(f"solver must be a name {sorted(SOLVERS)} or a FixedPointSolver instance, "
                              f"got {type(solver).__name__}")
    if solver not in SOLVERS:
        raise ValidationError(f"unknown solver {solver!r}; valid: {sorted(SOLVERS)}")
    cls = SOLVERS[solver]
    unknown = sorted(set(options) - set(cls.option_names()))
    if unknown:
        raise OptionTypeError(
            f"unknown option(s) {unknown} for solver {solver!r}; valid options: {cls.option_names()} "
            f"plus solve()'s atol, rtol, max_iter, on_failure, return_trace, divergence_ratio"
        )
    inst = cls(**options)
    inst.validate()
    return inst


@dataclass
class Solution:
    """The result of :func:`solve`: the fixed point ``z`` (shaped like ``z0``) and its :class:`SolverStats`."""

    z: torch.Tensor | tuple
    stats: SolverStats

    def __iter__(self):
        return iter((self.z, self.stats))


def solve(
    f: Callable,
    z0,
    *,
    args: Sequence = (),
    kwargs: dict | None = None,
    stopping: str = "verify",
    solver: str | FixedPointSolver = "anderson",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    max_iter: int = 100,
    on_failure: str = "warn",
    return_trace: bool = False,
    divergence_ratio: float = 1e6,
    keep: Sequence[int] = (),
    **solver_options,
) -> Solution:
    """Solve the fixed-point problem ``z = f(z, *args, **kwargs)`` for a batch of samples (without gradients).

    Args:
        f: maps a batched state (a tensor, or a tuple of tensors, first dimension = batch) to a state of the
            same structure, shape and dtype.
        z0: the initial state (a batch of size 0 gives an empty, converged solution without calling ``f``).
        args: batched inputs passed to ``f`` after ``z``. Passing inputs here (rather than capturing them in
            a closure) lets the loop evaluate ``f`` on the unconverged samples alone. A sample with NaN/Inf in
            its row of ``z0`` or of an input is refused (``on_failure="raise"``) or excluded and reported
            diverged (``"warn"``, ``"ignore"``).
        kwargs: keyword arguments of ``f`` that are never sliced (an adjacency coupling the rows, a table).
        stopping: ``"verify"`` (per-sample stopping, checked once against a whole-batch evaluation; falls
            back to ``"joint"`` when the samples turn out coupled), ``"per_sample"`` (freeze converged samples;
            right only for maps that treat samples independently) or ``"joint"`` (the batch is one system,
            stopped when every sample passes); see :mod:`iterlayers.solvers._loop`. What ran is
            ``stats.info["stopping"]``.
        solver: ``"picard"``, ``"anderson"``, ``"broyden"``, ``"gmres"`` (affine maps), or a solver instance.
        atol, rtol: sample ``i`` has converged when ``||f(z_i) - z_i|| <= atol + rtol * ||f(z_i)||``.
        max_iter: iteration limit.
        on_failure: ``"raise"`` a :class:`ConvergenceError`, ``"warn"`` with a :class:`ConvergenceWarning`,
            or ``"ignore"``; in every case the best iterate of each sample is returned and the failure is
            visible in ``stats``.
        return_trace: record the per-sample residual after every iteration.
        divergence_ratio: a sample whose residual exceeds this multiple of its initial residual (or gets
            NaN/Inf) is declared diverged and frozen (joint stopping: the solve stops, reported diverged).
        keep: iterations whose state is returned in ``stats.iterates`` (``0`` is ``z0``; an iteration the solve
            did not reach gives the returned iterate).
        **solver_options: options of the chosen solver (e.g. ``m``, ``lam``, ``damping`` for Anderson).

    Returns:
        :class:`Solution` with ``z`` and ``stats``.
    """
    loop = LoopOptions(atol=atol, rtol=rtol, max_iter=max_iter, on_failure=on_failure,
                       divergence_ratio=divergence_ratio, return_trace=return_trace)
    s = make_solver(solver, solver_options)
    if not callable(f):
        raise OptionTypeError(f"f must be callable, got {type(f).__name__}")
    # solve() never differentiates (use iterlayers.deq_solve / DEQ for gradients): building a graph
    # through every iteration would cost memory proportional to max_iter for nothing.
    with torch.no_grad():
        z, stats = run_loop(
            f,
            z0,
            solver=s,
            args=args,
            kwargs=kwargs,
            stopping=stopping,
            options=loop,
            keep=keep,
        )
    return Solution(z, stats)
