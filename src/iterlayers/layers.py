"""Equilibrium layers as plain ``nn.Module``s."""
from __future__ import annotations

import torch
from torch import nn

from .implicit import BACKWARD_MODES, _check_backward, deq_solve
from .solvers import check_common, make_solver

__all__ = ["DEQ", "Unrolled"]


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
        solver: forward solver name (``"anderson"``, ``"broyden"``, ``"picard"``) or instance.
        backward: gradient mode.
        atol, rtol, max_iter: forward tolerance and iteration limit (per sample).
        on_failure: ``"raise"``, ``"warn"`` or ``"ignore"`` when a solve (forward or backward) fails.
        solver_options: options of the forward solver (e.g. ``{"m": 6}`` for Anderson).
        backward_solver, backward_atol, backward_rtol, backward_max_iter, backward_solver_options: the
            same for the adjoint solve of ``backward="implicit"`` (defaults: the forward tolerances; the
            adjoint tolerance is relative to the norm of each sample's incoming gradient).
        phantom_steps, phantom_damping: ``k`` and ``lambda`` of the phantom gradient.
        eval_max_iter: iteration limit in eval mode (``model.eval()``), if different.
        return_trace: record residual traces in ``stats["forward"].trace``.
        hoist: compute the part of ``cell`` that does not depend on ``z`` once per forward solve rather than
            once per iteration (:mod:`iterlayers.hoist`); results are unchanged.
    """

    def __init__(
        self,
        cell,
        *,
        solver="anderson",
        backward: str = "implicit",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        max_iter: int = 50,
        on_failure: str = "warn",
        solver_options: dict | None = None,
        backward_solver="anderson",
        backward_atol: float | None = None,
        backward_rtol: float | None = None,
        backward_max_iter: int | None = None,
        backward_solver_options: dict | None = None,
        phantom_steps: int = 5,
        phantom_damping: float = 0.5,
        eval_max_iter: int | None = None,
        return_trace: bool = False,
        hoist: bool = True,
    ):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be a module or callable cell(z, x), got {type(cell).__name__}")
        check_common(atol, rtol, max_iter, on_failure, 2.0)
        _check_backward(backward, phantom_steps, phantom_damping)
        # Validate solver names and options now, not at the first forward pass.
        make_solver(solver, solver_options)
        make_solver(backward_solver, backward_solver_options)
        if eval_max_iter is not None:
            check_common(atol, rtol, eval_max_iter, on_failure, 2.0)
        self.cell = cell
        self.solver = solver
        self.backward_mode = backward
        self.atol, self.rtol, self.max_iter = float(atol), float(rtol), int(max_iter)
        self.on_failure = on_failure
        self.solver_options = dict(solver_options or {})
        self.backward_solver = backward_solver
        self.backward_atol = backward_atol
        self.backward_rtol = backward_rtol
        self.backward_max_iter = backward_max_iter
        self.backward_solver_options = dict(backward_solver_options or {})
        self.phantom_steps = phantom_steps
        self.phantom_damping = phantom_damping
        self.eval_max_iter = eval_max_iter
        self.return_trace = return_trace
        self.hoist = bool(hoist)
        self.stats: dict = {"forward": None, "backward": None}

    def initial_state(self, x):
        if hasattr(self.cell, "init_state"):
            return self.cell.init_state(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError("x is not a tensor: pass z0, or give the cell an init_state(x) method")
        return torch.zeros_like(x)

    def forward(self, x, z0=None):
        if z0 is None:
            z0 = self.initial_state(x)
        max_iter = self.max_iter if (self.training or self.eval_max_iter is None) else self.eval_max_iter
        stats: dict = {}
        # The dict is shared with the backward hook, which fills stats["backward"] later.
        self.stats = stats
        return deq_solve(
            self.cell,
            z0,
            args=(x,),
            solver=self.solver,
            backward=self.backward_mode,
            atol=self.atol,
            rtol=self.rtol,
            max_iter=max_iter,
            on_failure=self.on_failure,
            return_trace=self.return_trace,
            solver_options=self.solver_options,
            backward_solver=self.backward_solver,
            backward_atol=self.backward_atol,
            backward_rtol=self.backward_rtol,
            backward_max_iter=self.backward_max_iter,
            backward_solver_options=self.backward_solver_options,
            phantom_steps=self.phantom_steps,
            phantom_damping=self.phantom_damping,
            hoist=self.hoist,
            stats=stats,
        )

    def extra_repr(self) -> str:
        solver = self.solver if isinstance(self.solver, str) else type(self.solver).__name__
        return (
            f"solver={solver!r}, backward={self.backward_mode!r}, atol={self.atol:g}, rtol={self.rtol:g}, "
            f"max_iter={self.max_iter}, on_failure={self.on_failure!r}"
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
