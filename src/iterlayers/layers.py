"""Equilibrium layers as plain ``nn.Module``s."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .implicit import DEQOptions, deq_solve

__all__ = ["DEQ", "Unrolled"]

_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(DEQOptions))


class DEQ(nn.Module):
    r"""Deep equilibrium layer: the output is the fixed point ``z*`` of ``z = cell(z, x)``.

    ``forward(x, z0=None)`` solves ``z* = cell(z*, x)`` per sample with a batched solver (no graph is kept
    for the iterations) and attaches ``z*`` to the graph of ``x`` and of the cell's parameters with the
    gradient mode ``backward`` (``"implicit"``, ``"phantom"``, ``"jfb"`` or ``"unrolled"``; see
    :mod:`iterlayers.implicit`). The initial state is ``z0`` if given, else ``cell.init_state(x)`` if the
    cell defines it, else ``zeros_like(x)``.

    After a forward pass ``layer.stats["forward"]`` holds the solver's :class:`~iterlayers.SolverStats`;
    after ``loss.backward()`` with ``backward="implicit"``, ``layer.stats["backward"]`` holds the adjoint
    solve's. Under ``torch.no_grad()`` only the forward solve runs.

    Args:
        cell: a module or callable ``cell(z, x) -> z_next``; parameters may live anywhere inside it.
        options: a :class:`~iterlayers.DEQOptions` value (default: its defaults).
        eval_max_iter: iteration limit in eval mode (``model.eval()``), if different.
        **overrides: any field of :class:`~iterlayers.DEQOptions`: ``solver``, ``backward``, ``atol``,
            ``rtol``, ``max_iter``, ``on_failure``, ``solver_options``, the ``backward_*`` options of the
            adjoint solve, ``phantom_steps``, ``phantom_damping``, ``return_trace``, ``hoist``, ...

    The options are one frozen value, ``layer.options``. Each field also reads and writes as an attribute
    (``layer.max_iter = 100`` is ``layer.options = layer.options.replace(max_iter=100)``, validated).
    """

    def __init__(self, cell, options: DEQOptions | None = None, *, eval_max_iter: int | None = None,
                 **overrides):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be a module or callable cell(z, x), got {type(cell).__name__}")
        self.cell = cell
        self.options = DEQOptions.build(options, **overrides)
        if eval_max_iter is not None:
            self.options.replace(max_iter=eval_max_iter)  # validate it now
        self.eval_max_iter = eval_max_iter
        self.stats: dict = {"forward": None, "backward": None}

    def __getattr__(self, name):
        if name in _OPTION_FIELDS and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in _OPTION_FIELDS:
            self.options = self.options.replace(**{name: value})
        else:
            super().__setattr__(name, value)

    def initial_state(self, x):
        if hasattr(self.cell, "init_state"):
            return self.cell.init_state(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError("x is not a tensor: pass z0, or give the cell an init_state(x) method")
        return torch.zeros_like(x)

    def forward(self, x, z0=None):
        if z0 is None:
            z0 = self.initial_state(x)
        options = self.options
        if not self.training and self.eval_max_iter is not None:
            options = options.replace(max_iter=self.eval_max_iter)
        stats: dict = {}
        # The dict is shared with the backward hook, which fills stats["backward"] later.
        self.stats = stats
        return deq_solve(self.cell, z0, args=(x,), options=options, stats=stats)

    def extra_repr(self) -> str:
        o = self.options
        solver = o.solver if isinstance(o.solver, str) else type(o.solver).__name__
        return (
            f"solver={solver!r}, backward={o.backward!r}, atol={o.atol:g}, rtol={o.rtol:g}, "
            f"max_iter={o.max_iter}, on_failure={o.on_failure!r}"
        )


class Unrolled(nn.Module):
    r"""``steps`` damped iterations of a cell with ordinary backprop through all of them.

        z_{k+1} = (1 - beta) z_k + beta cell(z_k, x),    k = 0, ..., steps - 1,

    the finite-depth counterpart of :class:`DEQ` (a weight-tied network of depth ``steps``). Returns
    ``z_steps``, or every iterate ``[z_1, ..., z_steps]`` with ``return_all=True`` (for per-step losses or
    the convergence-vs-depth curves of an unrolled algorithm layer). ``residuals`` holds the per-sample
    ``||cell(z_k, x) - z_k||`` of the last call, so the analysis toolkit can fit its rate.
    """

    def __init__(self, cell, *, steps: int, damping: float = 1.0, return_all: bool = False):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be a module or callable cell(z, x), got {type(cell).__name__}")
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {damping!r}")
        self.cell = cell
        self.steps = steps
        self.damping = float(damping)
        self.return_all = return_all
        self.residuals: list[torch.Tensor] = []

    def forward(self, x, z0=None):
        z = (self.cell.init_state(x) if hasattr(self.cell, "init_state") else torch.zeros_like(x)) if z0 is None else z0
        out, self.residuals = [], []
        for _ in range(self.steps):
            fz = self.cell(z, x)
            self.residuals.append((fz - z).detach().flatten(1).norm(dim=1))
            z = fz if self.damping == 1.0 else z + self.damping * (fz - z)
            if self.return_all:
                out.append(z)
        return out if self.return_all else z

    def extra_repr(self) -> str:
        return f"steps={self.steps}, damping={self.damping:g}, return_all={self.return_all}"
