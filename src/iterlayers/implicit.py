"""Differentiable fixed points: one function, four gradient modes.

:func:`deq_solve` finds ``z* = f(z*, *args)`` without building a graph, then attaches ``z*`` to the graph
of the parameters and inputs in one of four ways (``backward=``):

- ``"implicit"``: the implicit-function theorem. With ``J = d f / d z`` at ``z*`` and incoming gradient ``g``,

      dL/d(theta, x) = u^T  d f(z*, x; theta) / d(theta, x),      u = J^T u + g,

  and the adjoint fixed point ``u`` is found matrix-free with vector-Jacobian products by any solver of
  :mod:`iterlayers.solvers` (``backward_solver``; Anderson, Picard or GMRES). Memory is that of one
  evaluation of ``f``, whatever the number of forward iterations. The backward solve reports its own
  statistics and fails loudly (per ``on_failure``) rather than returning a silently wrong gradient.
- ``"phantom"``: ``k`` damped steps ``z <- (1 - lam) z + lam f(z)`` from ``z*`` with autograd through them
  (Geng et al. 2021, "On training implicit models").
- ``"jfb"``: Jacobian-free backprop, one step ``f(z*)`` (``u = g``; Fung et al. 2022).
- ``"unrolled"``: ordinary backprop through every forward iteration of the damped Picard loop (the
  reference; memory grows with the number of iterations).

The gradient of ``"implicit"`` is exact at an exact fixed point; tests compare it with the dense formula
``(I - J)^{-T}`` and with ``torch.autograd.gradcheck``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .hoist import split_cell
from .solvers import SolverStats, check_common, make_solver
from .solvers._loop import report_failure, run_loop
from .solvers._state import StateSpec
from .solvers.stats import CONVERGED, is_converged

__all__ = ["deq_solve", "DEQOptions", "BACKWARD_MODES", "implicit_backward"]

BACKWARD_MODES = ("implicit", "phantom", "jfb", "unrolled")


@dataclass(frozen=True)
class DEQOptions:
    """Every option of a differentiable fixed-point solve, with its default; validated when created.

    :func:`deq_solve` and :class:`iterlayers.DEQ` take these as keyword arguments (or a ready value as
    ``options=``), so the list, the defaults and the checks live here once.

    Attributes:
        solver: forward solver name (``"anderson"``, ``"broyden"``, ``"picard"``, ``"gmres"``) or instance.
        backward: gradient mode, one of :data:`BACKWARD_MODES`.
        atol, rtol, max_iter: forward stopping rule ``||f(z) - z|| <= atol + rtol ||f(z)||`` and iteration
            limit, per sample.
        on_failure: ``"raise"``, ``"warn"`` or ``"ignore"`` when a solve (forward or backward) fails.
        return_trace: record per-iteration residuals in ``stats["forward"].trace``.
        solver_options: options of the forward solver (e.g. ``{"m": 6}`` for Anderson).
        backward_solver, backward_atol, backward_rtol, backward_max_iter, backward_solver_options: the same
            for the adjoint solve of ``backward="implicit"``; ``None`` means the forward value. The adjoint
            tolerance is relative to the norm of each sample's incoming gradient.
        phantom_steps, phantom_damping: ``k`` and ``lambda`` of ``backward="phantom"``.
        unrolled_damping: damping of the Picard loop of ``backward="unrolled"``.
        hoist: compute the part of ``f`` that does not depend on ``z`` once per forward solve instead of once
            per iteration (:mod:`iterlayers.hoist`); results are unchanged.
    """

    solver: object = "anderson"
    backward: str = "implicit"
    atol: float = 1e-5
    rtol: float = 1e-5
    max_iter: int = 50
    on_failure: str = "warn"
    return_trace: bool = False
    solver_options: dict | None = None
    backward_solver: object = "anderson"
    backward_atol: float | None = None
    backward_rtol: float | None = None
    backward_max_iter: int | None = None
    backward_solver_options: dict | None = None
    phantom_steps: int = 5
    phantom_damping: float = 0.5
    unrolled_damping: float = 1.0
    hoist: bool = True

    def __post_init__(self):
        # Own copies: a caller's dict changed later must not change a frozen value.
        for name in ("solver_options", "backward_solver_options"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, dict(getattr(self, name)))
        check_common(self.atol, self.rtol, self.max_iter, self.on_failure, 2.0)
        check_common(self.adjoint_atol, self.adjoint_rtol, self.adjoint_max_iter, self.on_failure, 2.0)
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {list(BACKWARD_MODES)}, got {self.backward!r}")
        if not (isinstance(self.phantom_steps, int) and self.phantom_steps >= 1):
            raise ValueError(f"phantom_steps must be a positive integer, got {self.phantom_steps!r}")
        if not 0.0 < self.phantom_damping <= 1.0:
            raise ValueError(f"phantom_damping must be in (0, 1], got {self.phantom_damping!r}")
        if not 0.0 < self.unrolled_damping <= 1.0:
            raise ValueError(f"unrolled_damping must be in (0, 1], got {self.unrolled_damping!r}")
        # Solver names and options are checked now, not at the first forward pass.
        make_solver(self.solver, self.solver_options)
        make_solver(self.backward_solver, self.backward_solver_options)

    @classmethod
    def build(cls, options: "DEQOptions | None" = None, **overrides) -> "DEQOptions":
        """``options`` (default: the defaults) with ``overrides`` applied; unknown names raise a TypeError."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; valid DEQ options: {valid}")
        if options is None:
            return cls(**overrides)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a DEQOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **overrides) if overrides else options

    def replace(self, **changes) -> "DEQOptions":
        """A copy with ``changes`` applied (validated like a new value)."""
        return DEQOptions.build(self, **changes)

    @property
    def adjoint_atol(self) -> float:
        return self.atol if self.backward_atol is None else self.backward_atol

    @property
    def adjoint_rtol(self) -> float:
        return self.rtol if self.backward_rtol is None else self.backward_rtol

    @property
    def adjoint_max_iter(self) -> int:
        return self.max_iter if self.backward_max_iter is None else self.backward_max_iter


def implicit_backward(
    fz: torch.Tensor,
    z_star: torch.Tensor,
    grad: torch.Tensor,
    *,
    solver,
    atol: float,
    rtol: float,
    max_iter: int,
    on_failure: str,
) -> tuple[torch.Tensor, SolverStats]:
    """Solve the adjoint fixed point ``u = J^T u + grad`` with ``J = d fz / d z_star`` (both ``[B, N]``).

    ``fz`` must have been computed from the leaf ``z_star`` with a retained graph; only vector-Jacobian
    products are used, so ``J`` is never formed.

    The system is linear in ``(u, grad)``, so it is solved for the unit right-hand side
    ``grad_i / ||grad_i||`` per sample and rescaled: the tolerances are *relative* to the incoming gradient.
    An absolute tolerance would declare the adjoint of a small gradient (a mean-reduced loss, a nearly fitted
    model) converged at ``u = 0`` and return a silently zero gradient. The iteration starts from the
    right-hand side itself (the first Neumann term, i.e. the JFB gradient).
    """
    scale = grad.norm(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rhs = grad / scale

    def adjoint(u):
        (vjp,) = torch.autograd.grad(fz, z_star, u, retain_graph=True)
        return vjp + rhs

    u, stats = run_loop(
        adjoint,
        rhs,
        solver=solver,
        atol=atol,
        rtol=rtol,
        max_iter=max_iter,
        on_failure=on_failure,
        return_trace=False,
        divergence_ratio=1e6,
        check_inputs=False,
    )
    return u * scale, stats


def _unrolled(f_flat, z, args, *, damping, atol, rtol, max_iter, return_trace):
    """Damped Picard iteration with autograd through every step; per-sample freezing by masking."""
    B = z.shape[0]
    fz = f_flat(z, *args)
    r = (fz - z).norm(dim=1)
    fnorm = fz.norm(dim=1)
    # A sample is frozen once it has converged or its residual is no longer finite (nothing to gain).
    done = is_converged(r.detach(), fnorm.detach(), atol, rtol) | ~torch.isfinite(r.detach())
    nstep = torch.zeros(B, dtype=torch.long, device=z.device)
    trace = [r.detach().clone()] if return_trace else None
    nfe = 1
    for _ in range(max_iter):
        if bool(done.all()):
            break
        z_next = z + damping * (fz - z)
        m = (~done).unsqueeze(1)
        z = torch.where(m, z_next, z)
        fz = torch.where(m, f_flat(z, *args), fz)
        nfe += 1
        nstep += (~done).long()
        r = (fz - z).norm(dim=1).detach()
        done = done | is_converged(r, fz.norm(dim=1).detach(), atol, rtol) | ~torch.isfinite(r)
        if return_trace:
            trace.append(r.clone())
    r = (fz - z).norm(dim=1).detach()
    stats = SolverStats.of_final_iterate(
        "picard(unrolled)", r, fz.norm(dim=1).detach(), nstep=nstep, diverged=~torch.isfinite(r),
        best=torch.zeros_like(done), nfe=nfe, atol=atol, rtol=rtol, max_iter=max_iter, trace=trace,
    )
    return z, stats


def deq_solve(
    f: Callable,
    z0,
    *,
    args: Sequence = (),
    options: DEQOptions | None = None,
    stats: dict | None = None,
    **overrides,
):
    """Differentiable fixed point of ``z = f(z, *args)``; see the module docstring for the gradient modes.

    The solve is configured by ``options`` (a :class:`DEQOptions`; default: its defaults) and/or keyword
    overrides of its fields, e.g. ``deq_solve(f, z0, solver="broyden", atol=1e-6, backward="phantom")``.
    Returns ``z*`` shaped like ``z0``. If ``stats`` (a dict) is given, ``stats["forward"]`` receives the
    forward :class:`SolverStats` and, once the backward pass has run (``backward="implicit"``),
    ``stats["backward"]`` the adjoint solve's.

    With ``hoist=True`` and ``f`` an ``nn.Module``, the part of ``f`` that does not depend on ``z`` (an input
    injection ``U x``, a normalised weight) is computed once per forward solve instead of once per iteration
    (:mod:`iterlayers.hoist`; verified to reproduce ``f``, and skipped when it cannot be). The number of hoisted
    operations is ``stats["forward"].info["hoisted_ops"]``. Gradients always use ``f`` itself.
    """
    o = DEQOptions.build(options, **overrides)
    if stats is None:
        stats = {}
    stats["backward"] = None

    spec = StateSpec.of(z0)

    def f_flat(zf, *a):
        return spec.flatten(f(spec.unflatten(zf), *a))

    z0f = spec.flatten(z0).detach()
    grad_needed = torch.is_grad_enabled()

    if o.backward == "unrolled" and grad_needed:
        z, st = _unrolled(
            f_flat, z0f, args, damping=o.unrolled_damping, atol=o.atol, rtol=o.rtol, max_iter=o.max_iter,
            return_trace=o.return_trace,
        )
        stats["forward"] = st
        if st.status != CONVERGED:
            report_failure(st, o.on_failure)
        return spec.unflatten(z)

    with torch.no_grad():
        loop_f, loop_args, n_hoisted = f_flat, args, 0
        if o.hoist:
            split = split_cell(f, spec.unflatten(z0f), tuple(args), spec.batch_size)
            if split is not None:
                step_fn, loop_args, n_hoisted = split

                def loop_f(zf, *a):
                    return spec.flatten(step_fn(spec.unflatten(zf), *a))

        z_star, st = run_loop(
            loop_f,
            z0f,
            solver=make_solver(o.solver, o.solver_options),
            args=loop_args,
            atol=o.atol,
            rtol=o.rtol,
            max_iter=o.max_iter,
            on_failure=o.on_failure,
            return_trace=o.return_trace,
            divergence_ratio=1e6,
        )
    st.info["hoisted_ops"] = n_hoisted
    stats["forward"] = st
    if not grad_needed:
        return spec.unflatten(z_star)

    if o.backward == "jfb":
        return spec.unflatten(f_flat(z_star, *args))
    if o.backward == "phantom":
        z = z_star
        for _ in range(o.phantom_steps):
            z = (1 - o.phantom_damping) * z + o.phantom_damping * f_flat(z, *args)
        return spec.unflatten(z)

    # implicit
    z_leaf = z_star.detach().requires_grad_()
    fz = f_flat(z_leaf, *args)
    if not fz.requires_grad:
        # Nothing upstream needs a gradient (no parameters, no input requiring grad).
        return spec.unflatten(fz.detach())

    inside = [False]

    def hook(grad):
        # The adjoint solve backpropagates through fz itself (vector-Jacobian products), which calls this
        # hook again: those inner calls must pass the gradient through unchanged.
        if inside[0] or grad is None:
            return grad
        inside[0] = True
        try:
            u, bst = implicit_backward(
                fz, z_leaf, grad, solver=bwd_solver, atol=o.adjoint_atol, rtol=o.adjoint_rtol,
                max_iter=o.adjoint_max_iter, on_failure=o.on_failure,
            )
        finally:
            inside[0] = False
        stats["backward"] = bst
        return u

    bwd_solver = make_solver(o.backward_solver, o.backward_solver_options)
    fz.register_hook(hook)
    return spec.unflatten(fz)
