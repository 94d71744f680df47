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

from typing import Callable, Sequence

import torch

from .hoist import split_cell
from .solvers import SolverStats, check_common, make_solver
from .solvers._loop import run_loop
from .solvers._state import StateSpec
from .solvers.stats import CONVERGED, DIVERGED, MAX_ITER

__all__ = ["deq_solve", "BACKWARD_MODES", "implicit_backward"]

BACKWARD_MODES = ("implicit", "phantom", "jfb", "unrolled")


def _check_backward(backward, phantom_steps, phantom_damping):
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {list(BACKWARD_MODES)}, got {backward!r}")
    if not (isinstance(phantom_steps, int) and phantom_steps >= 1):
        raise ValueError(f"phantom_steps must be a positive integer, got {phantom_steps!r}")
    if not 0.0 < phantom_damping <= 1.0:
        raise ValueError(f"phantom_damping must be in (0, 1], got {phantom_damping!r}")


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
    conv = r <= atol + rtol * fnorm
    nstep = torch.zeros(B, dtype=torch.long, device=z.device)
    trace = [r.detach().clone()] if return_trace else None
    nfe = 1
    for _ in range(max_iter):
        if bool(conv.all()):
            break
        z_next = z + damping * (fz - z)
        m = (~conv).unsqueeze(1)
        z = torch.where(m, z_next, z)
        fz = torch.where(m, f_flat(z, *args), fz)
        nfe += 1
        nstep += (~conv).long()
        r = (fz - z).norm(dim=1).detach()
        fnorm = fz.norm(dim=1).detach()
        conv = conv | (r <= atol + rtol * fnorm)
        if return_trace:
            trace.append(r.clone())
    r = (fz - z).norm(dim=1).detach()
    fnorm = fz.norm(dim=1).detach()
    converged = r <= atol + rtol * fnorm
    finite = torch.isfinite(r)
    status = CONVERGED if bool(converged.all()) else (DIVERGED if not bool(finite.all()) else MAX_ITER)
    stats = SolverStats(
        solver="picard(unrolled)",
        nstep=nstep,
        abs_residual=r,
        rel_residual=r / fnorm.clamp_min(torch.finfo(fnorm.dtype).tiny),
        converged=converged,
        diverged=~finite,
        best=torch.zeros_like(converged),
        nfe=nfe,
        status=status,
        atol=atol,
        rtol=rtol,
        max_iter=max_iter,
        trace=trace,
    )
    return z, stats


def deq_solve(
    f: Callable,
    z0,
    *,
    args: Sequence = (),
    solver="anderson",
    backward: str = "implicit",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    max_iter: int = 50,
    on_failure: str = "warn",
    return_trace: bool = False,
    solver_options: dict | None = None,
    backward_solver="anderson",
    backward_atol: float | None = None,
    backward_rtol: float | None = None,
    backward_max_iter: int | None = None,
    backward_solver_options: dict | None = None,
    phantom_steps: int = 5,
    phantom_damping: float = 0.5,
    unrolled_damping: float = 1.0,
    hoist: bool = True,
    stats: dict | None = None,
):
    """Differentiable fixed point of ``z = f(z, *args)``; see the module docstring for the gradient modes.

    Returns ``z*`` shaped like ``z0``. If ``stats`` (a dict) is given, ``stats["forward"]`` receives the
    forward :class:`SolverStats` and, once the backward pass has run (``backward="implicit"``),
    ``stats["backward"]`` the adjoint solve's.

    With ``hoist=True`` and ``f`` an ``nn.Module``, the part of ``f`` that does not depend on ``z`` (an input
    injection ``U x``, a normalised weight) is computed once per forward solve instead of once per iteration
    (:mod:`iterlayers.hoist`; verified to reproduce ``f``, and skipped when it cannot be). The number of hoisted
    operations is ``stats["forward"].info["hoisted_ops"]``. Gradients always use ``f`` itself.
    """
    check_common(atol, rtol, max_iter, on_failure, 2.0)
    _check_backward(backward, phantom_steps, phantom_damping)
    fwd_solver = make_solver(solver, solver_options)
    bwd_solver = make_solver(backward_solver, backward_solver_options)
    b_atol = atol if backward_atol is None else backward_atol
    b_rtol = rtol if backward_rtol is None else backward_rtol
    b_max = max_iter if backward_max_iter is None else backward_max_iter
    check_common(b_atol, b_rtol, b_max, on_failure, 2.0)
    if stats is None:
        stats = {}
    stats["backward"] = None

    spec = StateSpec.of(z0)

    def f_flat(zf, *a):
        return spec.flatten(f(spec.unflatten(zf), *a))

    z0f = spec.flatten(z0).detach()
    grad_needed = torch.is_grad_enabled()

    if backward == "unrolled" and grad_needed:
        z, st = _unrolled(
            f_flat, z0f, args, damping=unrolled_damping, atol=atol, rtol=rtol, max_iter=max_iter,
            return_trace=return_trace,
        )
        stats["forward"] = st
        if st.status != CONVERGED:
            from .solvers._loop import _report_failure

            _report_failure(st, on_failure)
        return spec.unflatten(z)

    with torch.no_grad():
        loop_f, loop_args, n_hoisted = f_flat, args, 0
        if hoist:
            split = split_cell(f, spec.unflatten(z0f), tuple(args), spec.batch_size)
            if split is not None:
                step_fn, loop_args, n_hoisted = split

                def loop_f(zf, *a):
                    return spec.flatten(step_fn(spec.unflatten(zf), *a))

        z_star, st = run_loop(
            loop_f,
            z0f,
            solver=fwd_solver,
            args=loop_args,
            atol=atol,
            rtol=rtol,
            max_iter=max_iter,
            on_failure=on_failure,
            return_trace=return_trace,
            divergence_ratio=1e6,
        )
    st.info["hoisted_ops"] = n_hoisted
    stats["forward"] = st
    if not grad_needed:
        return spec.unflatten(z_star)

    if backward == "jfb":
        return spec.unflatten(f_flat(z_star, *args))
    if backward == "phantom":
        z = z_star
        for _ in range(phantom_steps):
            z = (1 - phantom_damping) * z + phantom_damping * f_flat(z, *args)
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
                fz, z_leaf, grad, solver=bwd_solver, atol=b_atol, rtol=b_rtol, max_iter=b_max,
                on_failure=on_failure,
            )
        finally:
            inside[0] = False
        stats["backward"] = bst
        return u

    fz.register_hook(hook)
    return spec.unflatten(fz)
