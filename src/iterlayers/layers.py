"""Equilibrium layers as plain ``nn.Module``s."""
from __future__ import annotations

import dataclasses
import inspect
import weakref

import torch
from torch import nn

from . import _validate as V
from . import cells
from .errors import OptionTypeError, ShapeMismatchError
from .implicit import DEQOptions, deq_solve
from .unrolling import unroll

__all__ = ["DEQ", "Unrolled"]

_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(DEQOptions))
#: forward function -> (positional parameter names after z, takes *args); see DEQ._positional
_SIGNATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class DEQ(nn.Module):
    r"""Deep equilibrium layer: the output is the fixed point ``z*`` of ``z = cell(z, *inputs, **shared)``.

    ``forward(*inputs, z0=None, **shared)`` solves ``z* = cell(z*, *inputs, **shared)`` with a batched solver
    (no graph is kept for the iterations) and attaches ``z*`` to the graph of the inputs and of the cell's
    parameters with the gradient mode ``backward`` (``"implicit"``, ``"phantom"``, ``"jfb"`` or
    ``"unrolled"``; see :mod:`iterlayers.implicit`). The positional ``inputs`` are batched (first dimension =
    batch, a tensor or a tuple of tensors each): the solver slices them with the samples it still iterates.
    Keyword arguments ``shared`` are passed unsliced (an adjacency, a positional table). The initial state is
    ``z0`` if given, else ``cell.init_state(*inputs)`` if the cell defines it, else ``zeros_like(inputs[0])``
    (under ``torch.autocast``: in the dtype of the cell's output). What the layer assumes about the cell is
    in ``docs/cell_contract.md``.

    After a forward pass ``layer.stats["forward"]`` holds the solver's :class:`~iterlayers.SolverStats`;
    after ``loss.backward()`` with ``backward="implicit"``, ``layer.stats["backward"]`` holds the adjoint
    solve's (``layer.stats["jvp"]`` the tangent solve's of a forward-mode pass). Under ``torch.no_grad()``
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
    """

    def __init__(self, cell, options: DEQOptions | None = None, *, eval_max_iter: int | None = None,
                 **overrides):
        super().__init__()
        if not callable(cell):
            raise OptionTypeError(f"cell must be a module or callable cell(z, x), got {type(cell).__name__}")
        self.cell = cell
        self.options = DEQOptions.build(options, **overrides)
        self.eval_max_iter = eval_max_iter
        self.stats: dict = {"forward": None, "backward": None, "jvp": None}

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

    def forward(self, *inputs, z0=None, **shared):
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
        cell, args, arg_names = self.cell, inputs, names
        if any(isinstance(x, (tuple, list)) for x in inputs):
            # Tuple inputs travel as separate batched tensors (each sliced with the samples) and are regrouped.
            sizes = [len(x) if isinstance(x, (tuple, list)) else None for x in inputs]
            args = tuple(t for x in inputs for t in (x if isinstance(x, (tuple, list)) else (x,)))
            arg_names = tuple(f"{n}[{i}]" if s is not None else n for n, s in zip(names, sizes)
                              for i in range(s or 1))
            cell = _Regrouped(self.cell, sizes)
        if default_z0 and torch.is_autocast_enabled(_device_type(z0)):
            # Under autocast the cell's output dtype is not the input's: start in the dtype it returns.
            with torch.no_grad():
                out = cell(z0, *args, **shared)
            if isinstance(out, torch.Tensor) and out.dtype != z0.dtype:
                z0 = z0.to(out.dtype)
        options = self.options if self.training or self.eval_max_iter is None else self._eval_options
        stats: dict = {}
        # The dict is shared with the backward hook, which fills stats["backward"] later.
        self.stats = stats
        return deq_solve(cell, z0, args=args, kwargs=shared, options=options, stats=stats, arg_names=arg_names)

    def extra_repr(self) -> str:
        o = self.options
        solver = o.solver if isinstance(o.solver, str) else type(o.solver).__name__
        return (
            f"solver={solver!r}, backward={o.backward!r}, stopping={o.stopping!r}, atol={o.atol:g}, "
            f"rtol={o.rtol:g}, max_iter={o.max_iter}, on_failure={o.on_failure!r}"
        )


def _device_type(z) -> str:
    return (z[0] if isinstance(z, (tuple, list)) else z).device.type


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
        self.max_iter = V.non_negative_int(max_iter, "max_iter", where="Unrolled")
        self.damping = V.in_range(damping, "damping", where="Unrolled", low=0.0, high=1.0, low_open=True)
        self.return_all = V.boolean(return_all, "return_all", where="Unrolled")
        self.stats: dict = {"forward": None, "backward": None}

    def forward(self, x, z0=None):
        z0 = cells.initial_state(self.cell, x, z0=z0, where="Unrolled")
        out = unroll(lambda z: self.cell(z, x), z0, max_iter=self.max_iter, damping=self.damping,
                     return_iterates=self.return_all, return_trace=True)
        self.stats = {"forward": out.stats, "backward": None}
        return out.iterates[1:] if self.return_all else out.z

    def extra_repr(self) -> str:
        return f"max_iter={self.max_iter}, damping={self.damping:g}, return_all={self.return_all}"
