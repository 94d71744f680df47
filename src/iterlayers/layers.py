"""Equilibrium layers as plain ``nn.Module``s."""
from __future__ import annotations

import dataclasses
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from . import _validate
from . import cells
from .analysis.regularization import jacobian_frobenius_penalty
from .analysis.spectral import spectral_radius
from .errors import OptionTypeError, ShapeMismatchError, ValidationError
from .implicit import CellTraits, DEQOptions, _frozen_statistics, _rebind, _snapshot, deq_solve
from .solvers import StateSpec
from .unrolling import unroll

__all__ = ["DEQ", "Unrolled", "JacobianPenalty", "SpectralMonitor", "FixedPointCorrection"]


@dataclass(frozen=True)
class JacobianPenalty:
    r"""Jacobian regularisation of a :class:`DEQ` (Bai, Koltun & Kolter 2021): in training mode, every
    ``every``-th forward pass, ``layer.penalty`` is the Hutchinson estimate of

        mean_b ||J_b||_F^2 / d,     J_b = d cell(z*, x)_b / d z_b   at the fixed point,  d = size of one state,

    with ``samples`` probes (``"normal"`` or ``"rademacher"``;
    :func:`iterlayers.analysis.regularization.jacobian_frobenius_penalty`), differentiable with respect to the
    cell's parameters and the inputs: add ``weight * layer.penalty`` to the loss. ``z*`` is held constant (a
    leaf), as in Bai et al. Cost: one more evaluation of the cell and one vector-Jacobian product per probe,
    both kept for the backward pass (double backward through one cell evaluation).
    """

    every: int = 1
    samples: int = 1
    distribution: str = "normal"

    def __post_init__(self):
        _validate.positive_int(self.every, "every", where="JacobianPenalty")
        _validate.positive_int(self.samples, "samples", where="JacobianPenalty")
        _validate.choice(self.distribution, "distribution", ("normal", "rademacher"), where="JacobianPenalty")


@dataclass(frozen=True)
class SpectralMonitor:
    """Spectral-radius monitor of a :class:`DEQ`: in training mode, every ``every``-th forward pass,
    ``layer.stats["spectral_radius"]`` is the per-sample estimate of ``rho(J*)`` at the fixed point
    (:func:`iterlayers.analysis.spectral.spectral_radius`, power method with Ritz values, ``tol`` and
    ``max_iter``; an :class:`~iterlayers.analysis.spectral.Estimate`), ``None`` on the other passes.
    ``rho(J*) < 1`` is the condition for local convergence of the forward iteration (and of the adjoint)."""

    every: int = 1
    tol: float = 1e-3
    max_iter: int = 50

    def __post_init__(self):
        _validate.positive_int(self.every, "every", where="SpectralMonitor")
        _validate.in_range(self.tol, "tol", where="SpectralMonitor", low=0.0, low_open=True)
        _validate.positive_int(self.max_iter, "max_iter", where="SpectralMonitor")

_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(DEQOptions))
#: forward function -> (positional parameter names after z, takes *args); see DEQ._positional
_SIGNATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


WEIGHTS = ("constant", "linear", "exponential")


@dataclass(frozen=True)
class FixedPointCorrection:
    r"""Trajectory supervision (fixed-point correction, Bai et al. 2022, "Deep Equilibrium Optical Flow
    Estimation"): a loss on intermediate states of the forward solve, not only on ``z*``.

    In training mode (with grad enabled) the layer keeps the solver's states after iterations ``k in at``, or,
    with ``count=n``, after ``n`` iterations evenly spaced over the iterations the solve took
    (``k_i = ceil(i N / n)``, ``i = 1..n``, ``N`` = iterations taken); ``layer.states`` is the list of
    ``(k, state, weight)``. Each state is attached to the graph by the layer's gradient mode, exactly as ``z*``
    is (:attr:`iterlayers.DEQOptions.gradient`: the implicit mode's gradient of a state is the
    implicit-function-theorem formula at that state, phantom and JFB take their steps from it, unrolled states
    are the differentiable iterates, from the core's ``DEQOptions.trajectory``). An iteration the solve did not
    reach gives ``z*``'s state. The iterates are kept (without a graph) and attached by the core
    (``DEQOptions.trajectory``, set for the pass: ``at`` or the count), with batch-norm statistics given back;
    ``count`` needs ``N``, known only at the end, so every iterate is kept until then (memory: up to
    ``max_iter`` states).
    A sample frozen by per-sample stopping keeps its converged value. Weights of the ``i``-th of ``n`` states:
    ``"constant"`` 1, ``"linear"`` ``i / n``, ``"exponential"`` ``gamma^(n - i)`` (the later, the heavier).
    ``layer.correction_loss(fn)`` is ``sum_i w_i fn(state_i)``; add it to the loss of ``z*``.
    """

    at: tuple | None = None
    count: int | None = None
    weights: str = "constant"
    gamma: float = 0.8

    def __post_init__(self):
        where = "FixedPointCorrection"
        if (self.at is None) == (self.count is None):
            raise ValidationError(f"{where}: give exactly one of at (iterations) and count")
        if self.at is not None:
            if not isinstance(self.at, (tuple, list)) or not self.at:
                raise OptionTypeError(f"{where}: at must be a non-empty tuple of iteration numbers, got {self.at!r}")
            at = tuple(sorted({_validate.positive_int(k, "at", where=where) for k in self.at}))
            object.__setattr__(self, "at", at)
        else:
            _validate.positive_int(self.count, "count", where=where)
        _validate.choice(self.weights, "weights", WEIGHTS, where=where)
        _validate.in_range(self.gamma, "gamma", where=where, low=0.0, high=1.0, low_open=True)

    def weight(self, i: int, n: int) -> float:
        """The weight of the ``i``-th (1-based) of ``n`` states."""
        if self.weights == "constant":
            return 1.0
        if self.weights == "linear":
            return i / n
        return self.gamma ** (n - i)


class DEQ(nn.Module):
    r"""Deep equilibrium layer: the output is the fixed point ``z*`` of ``z = cell(z, *inputs, **shared)``.

    ``forward(*inputs, z0=None, adjoint_start=None, **shared)`` solves ``z* = cell(z*, *inputs, **shared)`` with a batched solver
    (no graph is kept for the iterations) and attaches ``z*`` to the graph of the inputs and of the cell's
    parameters with the gradient mode ``backward`` (``"implicit"``, ``"phantom"``, ``"jfb"`` or
    ``"unrolled"``; see :mod:`iterlayers.implicit`). The positional ``inputs`` are batched (first dimension =
    batch, a tensor or a tuple of tensors each): the solver slices them with the samples it still iterates.
    Keyword arguments ``shared`` are passed unsliced (an adjacency, a positional table). The initial state is
    ``z0`` if given, else ``cell.init_state(*inputs)`` if the cell defines it, else ``zeros_like(inputs[0])``.
    Under ``torch.autocast`` the cell runs in the autocast dtype while the state, the solver's histories and
    the residuals stay in ``z0``'s dtype (the mixed-precision policy, ``StateSpec.autocast_output``); the
    tolerances are checked against the cell's output dtype. What the layer assumes about the cell is
    in ``docs/cell_contract.md``.

    After a forward pass ``layer.stats["forward"]`` holds the solver's :class:`~iterlayers.SolverStats`;
    after ``loss.backward()`` with ``backward="implicit"``, ``layer.stats["backward"]`` holds the adjoint
    solve's and ``layer.stats["adjoint"]`` the adjoint ``u`` of ``z*`` (``adjoint_start=`` warm-starts the next
    adjoint solve from such a ``u``, see :func:`iterlayers.deq_solve`; ``layer.stats["jvp"]`` is the tangent
    solve's of a forward-mode pass). Under ``torch.no_grad()``
    only the forward solve runs.

    Args:
        cell: a module or callable ``cell(z, *inputs, **shared) -> z_next``; parameters may live anywhere in it.
        options: a :class:`~iterlayers.DEQOptions` value (default: its defaults).
        eval_max_iter: iteration limit in eval mode (``model.eval()``), if different.
        **overrides: any field of :class:`~iterlayers.DEQOptions`: ``solver``, ``backward``, ``stopping``,
            ``atol``, ``rtol``, ``max_iter``, ``on_failure``, ``solver_options``, the ``backward_*`` options of
            the adjoint solve, ``phantom_steps``, ``phantom_damping``, ``return_trace``, ``hoist``, ...

    The options are one frozen value, ``layer.options``. Each field also reads and writes as an attribute
    (``layer.max_iter = 100`` is ``layer.options = layer.options.replace(max_iter=100)``, validated).

    Training aids (``docs/aids/``):

    - ``jacobian_penalty``: a :class:`JacobianPenalty`; in training mode ``layer.penalty`` is then the
      differentiable Hutchinson estimate of ``||J*||_F^2 / d`` every ``every``-th forward pass (else ``None``).
    - ``spectral_monitor``: a :class:`SpectralMonitor`; ``layer.stats["spectral_radius"]`` is then the
      per-sample estimate of ``rho(J*)`` every ``every``-th training forward pass (else ``None``).
    - The cell protocol: before each solve the layer calls ``deq_reset(batch)`` on every submodule of the cell
      that defines it (a new forward pass starts: :class:`~iterlayers.dropout.VariationalDropout` redraws its
      mask, :func:`~iterlayers.parametrizations.spectral_norm` updates its estimate once); a submodule that also
      defines ``deq_rows(rows)`` is told before each evaluation which samples (indices into the batch, ``None``
      for all) it holds, as the solver drops converged samples.
    - ``correction``: a :class:`FixedPointCorrection`; in training mode ``layer.states`` then holds intermediate
      solver states ``(k, state, weight)`` attached by the gradient mode, ``layer.correction_loss(fn)`` their
      weighted loss (the core's ``trajectory=`` option keeps given iterations in ``stats["trajectory"]``).
    - Warm starts: ``z0=`` starts the solve from a previous answer (e.g. the last frame's ``z*``, detached).
    """

    def __init__(self, cell, options: DEQOptions | None = None, *, eval_max_iter: int | None = None,
                 jacobian_penalty: JacobianPenalty | None = None, spectral_monitor: SpectralMonitor | None = None,
                 correction: FixedPointCorrection | None = None, **overrides):
        super().__init__()
        if not callable(cell):
            raise OptionTypeError(f"cell must be a module or callable cell(z, x), got {type(cell).__name__}")
        self.cell = cell
        self.options = DEQOptions.build(options, **overrides)
        self.eval_max_iter = eval_max_iter
        self.jacobian_penalty = jacobian_penalty
        self.spectral_monitor = spectral_monitor
        self.correction = correction
        #: the kept states of the last training forward pass: [(iteration, state with graph, weight)]; None when
        #: that pass kept none (no trajectory, eval mode, no grad)
        self.states: list | None = None
        #: training-mode forward passes so far (the schedule of the penalty and the monitor)
        self.train_forwards = 0
        #: the Jacobian penalty of the last training-mode forward pass (None when it was not computed)
        self.penalty: torch.Tensor | None = None
        self.stats: dict = {"forward": None, "backward": None, "jvp": None, "spectral_radius": None}

    def __getattr__(self, name):
        if name in _OPTION_FIELDS and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in _OPTION_FIELDS:
            self.options = self.options.replace(**{name: value})
            return
        if name == "eval_max_iter" and value is not None:
            self.options.replace(max_iter=value)  # validated now, not at the first eval forward
        for attr, kind in (("jacobian_penalty", JacobianPenalty), ("spectral_monitor", SpectralMonitor),
                           ("correction", FixedPointCorrection)):
            if name == attr and value is not None and not isinstance(value, kind):
                raise OptionTypeError(f"DEQ: {attr} must be a {kind.__name__} or None, got {type(value).__name__}")
        super().__setattr__(name, value)
        if name in ("options", "eval_max_iter"):
            # The eval-mode value, built (and its solvers validated) once, not on every eval forward.
            o, m = self.__dict__.get("options"), self.__dict__.get("eval_max_iter")
            self.__dict__["_eval_options"] = o if (o is None or m is None) else o.replace(max_iter=m)

    def initial_state(self, *inputs):
        """The initial state for ``inputs``: :func:`iterlayers.cells.initial_state` (the cell protocol)."""
        return cells.initial_state(self.cell, *inputs, where="DEQ", names=self._input_names(len(inputs)))

    def _positional(self):
        """The cell's positional parameters after ``z`` and whether it takes ``*args`` (``None``: opaque),
        read from its signature once per forward function (``inspect.signature`` costs more than a small
        cell's evaluation)."""
        fn = self.cell.forward if isinstance(self.cell, nn.Module) else self.cell
        key = getattr(fn, "__func__", fn)
        cached = _SIGNATURES.get(key)
        if cached is None:
            try:
                params = list(inspect.signature(fn).parameters.values())
            except (TypeError, ValueError):
                cached = ((), None)
            else:
                names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
                cached = (names[1:], any(p.kind == p.VAR_POSITIONAL for p in params))
            try:
                _SIGNATURES[key] = cached
            except TypeError:  # a callable that cannot be weakly referenced: not cached
                pass
        return cached

    def _arity(self) -> int | None:
        """The number of positional inputs the cell takes after ``z`` (None if it takes ``*args`` or is opaque)."""
        names, var = self._positional()
        return None if var is None or var else len(names)

    def _input_names(self, n: int) -> tuple:
        """Names of the cell's positional inputs after ``z`` (from its signature), for error messages."""
        names = list(self._positional()[0][:n])
        if len(names) < n:
            names += ["x"] if n == 1 else [f"inputs[{i}]" for i in range(len(names), n)]
        return tuple(names)

    def forward(self, *inputs, z0=None, adjoint_start=None, **shared):
        if z0 is None and len(inputs) == 2 and (inputs[1] is None or self._arity() == 1):
            # The former signature forward(x, z0): a None is never a batched input, and a cell taking one
            # input cannot mean a second one as an input (calling it would fail): it is the initial state.
            inputs, z0 = inputs[:1], inputs[1]
        names = self._input_names(len(inputs))
        for name, x in zip(names, inputs):
            if not (isinstance(x, torch.Tensor) or (isinstance(x, (tuple, list)) and x
                                                    and all(isinstance(t, torch.Tensor) for t in x))):
                raise OptionTypeError(
                    f"DEQ: input {name} is a {type(x).__name__}; positional inputs are batched tensors (or tuples "
                    "of them); pass non-batched values as keyword arguments"
                )
        default_z0 = z0 is None
        if default_z0:
            z0 = self.initial_state(*inputs)
        batch = _batch_of(z0, "z0")
        for name, x in zip(names, inputs):
            for i, t in enumerate(x if isinstance(x, (tuple, list)) else (x,)):
                what = f"{name}[{i}]" if isinstance(x, (tuple, list)) else name
                if t.dim() == 0 or t.shape[0] != batch:
                    raise ShapeMismatchError(
                        f"DEQ: {what} has shape {tuple(t.shape)} but z0 has batch size {batch}; positional inputs "
                        "are batched (first dimension = batch) - pass a non-batched value (an adjacency, a "
                        "table) as a keyword argument, which is never sliced"
                    )
        # The cell protocol: submodules with per-forward state (a dropout mask, a spectral-norm estimate) start
        # a new forward pass; those with one row per sample follow the solver's rows (docs/cell_contract.md).
        # (looked up on the class and the instance dict: hasattr on a module raises inside __getattr__ when absent)
        hooked = [m for _, m in cells.submodules(self.cell)
                  if hasattr(type(m), "deq_reset") or "deq_reset" in m.__dict__]
        for m in hooked:
            m.deq_reset(batch)
        cell, args, arg_names = self.cell, inputs, names
        if any(isinstance(x, (tuple, list)) for x in inputs):
            # Tuple inputs travel as separate batched tensors (each sliced with the samples) and are regrouped.
            sizes = [len(x) if isinstance(x, (tuple, list)) else None for x in inputs]
            args = tuple(t for x in inputs for t in (x if isinstance(x, (tuple, list)) else (x,)))
            arg_names = tuple(f"{n}[{i}]" if s is not None else n for n, s in zip(names, sizes)
                              for i in range(s or 1))
            cell = _Regrouped(self.cell, sizes)
        rowed = tuple(m for m in hooked if hasattr(m, "deq_rows"))
        if rowed:
            # The indices of the samples travel as one more batched input, sliced by the solver with them. The
            # wrapper is kept while the cell is the same, so what the solver caches per cell stays valid.
            cached = self.__dict__.get("_rows_cell")
            arity = -1 if shared else len(args)
            if cached is None or cached.cell is not cell or cached.rowed != rowed or cached.arity != arity:
                cached = self.__dict__["_rows_cell"] = _rows_cell(cell, rowed, arity)
            cell = cached
            args = (*args, torch.arange(batch, device=_device_of(z0)))
            arg_names = (*arg_names, "rows")
            if self.options.hoist and not shared and any(getattr(m, "pending", False) for m in rowed):
                # A split of the cell (hoisting) reads the mask as a tensor of the module: draw it now, by one
                # evaluation on the whole batch (a measurement: batch-norm statistics are given back).
                with torch.no_grad(), _frozen_statistics(CellTraits.of(cell).stat_modules):
                    cell(z0, *args)
        options = self.options if self.training or self.eval_max_iter is None else self._eval_options
        stats: dict = {}
        # The dict is shared with the backward hook, which fills stats["backward"] later. Plain attributes
        # (never parameters, buffers or modules) are written to __dict__: nn.Module.__setattr__'s dispatch
        # costs more than a small cell's evaluation, per forward pass.
        self.__dict__["stats"] = stats
        fc = self.correction
        self.__dict__["states"] = None
        correcting = fc is not None and self.training and torch.is_grad_enabled()
        if correcting:
            # The core keeps the iterates and attaches each by the layer's gradient mode (DEQOptions.trajectory).
            options = options.replace(trajectory=fc.at if fc.at is not None else fc.count)
        z = deq_solve(cell, z0, args=args, kwargs=shared, options=options, stats=stats, arg_names=arg_names,
                      adjoint_start=adjoint_start)
        stats["spectral_radius"] = None
        self.__dict__["penalty"] = None
        if self.training:
            self._aids(cell, z, args, shared, stats)
            if correcting:
                ks = sorted(stats.get("trajectory", {}))
                self.states = [(k, stats["trajectory"][k], fc.weight(i, len(ks))) for i, k in enumerate(ks, start=1)]
        return z

    def correction_loss(self, fn) -> torch.Tensor:
        """``sum_i w_i fn(state_i)`` over the kept states ``self.states`` of the last training forward pass (see
        :class:`FixedPointCorrection`; 0 when the solve took no iteration); raises when that pass kept none."""
        if self.states is None:
            raise ValidationError("DEQ.correction_loss: no states were kept (give correction=FixedPointCorrection("
                                  "...) and run a training-mode forward pass with grad enabled)")
        return sum((w * fn(state) for _, state, w in self.states), torch.zeros(()))

    def _aids(self, cell, z, args, shared, stats) -> None:
        """The Jacobian penalty and the spectral-radius monitor of a training-mode forward pass, at ``z*``."""
        k = self.train_forwards
        self.train_forwards += 1
        jp, sm = self.jacobian_penalty, self.spectral_monitor
        penalise = jp is not None and k % jp.every == 0 and torch.is_grad_enabled()
        monitor = sm is not None and k % sm.every == 0
        if not (penalise or monitor) or _batch_of(z, "z") == 0:
            return
        spec = StateSpec.of(z)
        traits = CellTraits.of(cell)

        def f_flat(zf, _x=None):
            return spec.flatten(cell(spec.unflatten(zf), *args, **shared))

        # These evaluations are measurements, not training steps: running statistics (batch norm) are given
        # back their values (fresh copies: the penalty's graph may have saved the old buffers).
        saved = _snapshot(traits.stat_modules)
        try:
            with traits.eager():
                if penalise:
                    zf = spec.flatten(z).detach().requires_grad_()
                    self.penalty = jacobian_frobenius_penalty(f_flat(zf), zf, samples=jp.samples,
                                                              distribution=jp.distribution)
                if monitor:
                    stats["spectral_radius"] = spectral_radius(f_flat, spec.flatten(z).detach(), None,
                                                               method="power", tol=sm.tol, max_iter=sm.max_iter,
                                                               seed=k)
        finally:
            _rebind(saved)

    def extra_repr(self) -> str:
        o = self.options
        if isinstance(o.solver, tuple):
            solver = [s if isinstance(s, str) else type(s).__name__ for s in o.solver]
        else:
            solver = o.solver if isinstance(o.solver, str) else type(o.solver).__name__
        aids = "".join(f", {name}={value}" for name, value in (("jacobian_penalty", self.jacobian_penalty),
                                                               ("spectral_monitor", self.spectral_monitor),
                                                               ("correction", self.correction))
                       if value is not None)
        return (
            f"solver={solver!r}, backward={o.backward!r}, stopping={o.stopping!r}, atol={o.atol:g}, "
            f"rtol={o.rtol:g}, max_iter={o.max_iter}, on_failure={o.on_failure!r}{aids}"
        )


def _device_of(z) -> torch.device:
    return (z[0] if isinstance(z, (tuple, list)) else z).device


def _batch_of(z0, what: str) -> int:
    parts = tuple(z0) if isinstance(z0, (tuple, list)) else (z0,)
    for i, p in enumerate(parts):
        if not isinstance(p, torch.Tensor):
            raise OptionTypeError(f"DEQ: {what} must be a tensor or a tuple of tensors, got {type(p).__name__}")
        if p.dim() == 0:
            raise ShapeMismatchError(f"DEQ: {what} is a scalar; it must have a leading batch dimension")
    return parts[0].shape[0]


class _Regrouped(nn.Module):
    """``cell(z, *flat)`` with the flat inputs regrouped into the tuples the cell takes (a module holding the
    cell, so that the solve still sees its batch norms and compiled parts)."""

    def __init__(self, cell, sizes):
        super().__init__()
        self.cell, self.sizes = cell, sizes

    def forward(self, z, *flat, **shared):
        it, grouped = iter(flat), []
        for s in self.sizes:
            grouped.append(next(it) if s is None else tuple(next(it) for _ in range(s)))
        return self.cell(z, *grouped, **shared)


class _Rows(nn.Module):
    """``cell(z, *inputs)`` called as ``(z, *inputs, rows)``: before each evaluation the modules with one row per
    sample (``deq_rows``, e.g. a variational-dropout mask) are told which samples ``rows`` it holds (the solver
    slices ``rows`` with the inputs), afterwards that it holds the whole batch again. Subclasses made by
    :func:`_rows_cell` give ``forward`` a fixed number of inputs, which ``iterlayers.hoist`` can trace."""

    arity: int = -1

    def __init__(self, cell, modules: tuple):
        super().__init__()
        self.cell = cell
        self.__dict__["rowed"] = modules  # submodules of cell, not registered twice

    def evaluate(self, z, inputs, rows, shared):
        for m in self.rowed:
            m.deq_rows(rows)
        try:
            return self.cell(z, *inputs, **shared)
        finally:
            for m in self.rowed:
                m.deq_rows(None)

    def forward(self, z, *inputs, **shared):
        *inputs, rows = inputs
        return self.evaluate(z, inputs, rows, shared)


_ROWS_CLASSES: dict = {}


def _rows_cell(cell, modules: tuple, arity: int) -> _Rows:
    """A :class:`_Rows` whose ``forward(z, x0, ..., rows)`` takes exactly ``arity`` inputs and no keywords (a
    signature that torch.fx traces, so the cell can still be hoisted; one class per arity, its two-line
    ``forward`` generated once); ``arity=-1``: the variadic :class:`_Rows`, which passes keywords on (a cell
    with keyword arguments is not hoisted anyway)."""
    if arity < 0:
        return _Rows(cell, modules)
    cls = _ROWS_CLASSES.get(arity)
    if cls is None:
        xs = "".join(f"x{i}, " for i in range(arity))
        namespace: dict = {}
        exec(f"def forward(self, z, {xs}rows):\n"  # noqa: S102 - a fixed template
             f"    return self.evaluate(z, ({xs}), rows, {{}})\n", namespace)
        cls = _ROWS_CLASSES[arity] = type(f"_Rows{arity}", (_Rows,), {"forward": namespace["forward"],
                                                                       "arity": arity, "__module__": __name__})
    return cls(cell, modules)


class Unrolled(nn.Module):
    r"""``max_iter`` damped iterations of a cell with ordinary backprop through all of them.

        z_{k+1} = z_k + d (cell(z_k, x) - z_k),    k = 0, ..., max_iter - 1,    d = ``damping`` in (0, 1],

    the finite-depth counterpart of :class:`DEQ` (a weight-tied network of depth ``max_iter``), run by the one
    engine :func:`iterlayers.unroll` (fixed steps). The initial state is ``z0`` if given, else the cell
    protocol's (:func:`iterlayers.cells.initial_state`). Returns ``z_max_iter``, or every iterate
    ``[z_1, ..., z_max_iter]`` with ``return_all=True`` (for per-step losses or the convergence-vs-depth curves
    of an unrolled algorithm layer). ``stats["forward"]`` holds the :class:`~iterlayers.SolverStats` of the
    last call, its ``trace`` the per-sample residuals ``||cell(z_k, x) - z_k||`` of ``z_0, ..., z_max_iter``
    (for the analysis toolkit's rate fit); ``stats["backward"]`` is ``None`` (plain backprop, no solve).
    """

    def __init__(self, cell, *, max_iter: int, damping: float = 1.0, return_all: bool = False):
        super().__init__()
        if not callable(cell):
            raise OptionTypeError(f"cell must be a module or callable cell(z, x), got {type(cell).__name__}")
        self.cell = cell
        self.max_iter = _validate.non_negative_int(max_iter, "max_iter", where="Unrolled")
        self.damping = _validate.in_range(damping, "damping", where="Unrolled", low=0.0, high=1.0, low_open=True)
        self.return_all = _validate.boolean(return_all, "return_all", where="Unrolled")
        self.stats: dict = {"forward": None, "backward": None}

    def forward(self, x, z0=None):
        z0 = cells.initial_state(self.cell, x, z0=z0, where="Unrolled")
        out = unroll(lambda z: self.cell(z, x), z0, max_iter=self.max_iter, damping=self.damping,
                     return_iterates=self.return_all, return_trace=True)
        self.stats = {"forward": out.stats, "backward": None}
        return out.iterates[1:] if self.return_all else out.z

    def extra_repr(self) -> str:
        return f"max_iter={self.max_iter}, damping={self.damping:g}, return_all={self.return_all}"
