"""Run an algorithm's update map to its fixed point with implicit gradients.

Uses the core's differentiable solver ``iterlayers.deq_solve`` when it is importable.  If the core is
not available (it is developed concurrently), a small local fallback is used: Picard iteration without
autograd, then one differentiable application ``z = f(z*)`` whose backward solves the adjoint equation
``g = dL/dz + J_f(z*)^T g`` by fixed-point iteration (implicit function theorem, as in DEQs).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["equilibrium"]


def _core_deq_solve():
    try:
        from iterlayers import deq_solve  # type: ignore[attr-defined]
    except ImportError:
        return None
    return deq_solve


def equilibrium(f: Callable[[Tensor], Tensor], z0: Tensor, *, solver: str = "anderson",
                backward: str = "implicit", atol: float = 1e-8, rtol: float = 0.0, max_iter: int = 500,
                use_core: bool = True, **options) -> Tensor:
    """Fixed point ``z* = f(z*)`` carrying gradients per ``backward`` (implicit by default)."""
    deq_solve = _core_deq_solve() if use_core else None
    if deq_solve is not None:
        return deq_solve(f, z0, solver=solver, backward=backward, atol=atol, rtol=rtol, max_iter=max_iter,
                         **options)
    if backward not in ("implicit", "unrolled"):
        raise ValueError(f"backward must be 'implicit' or 'unrolled' without the core, got {backward!r}")
    if backward == "unrolled":
        z = z0
        for _ in range(max_iter):
            z = f(z)
        return z
    with torch.no_grad():
        z = z0.detach()
        for _ in range(max_iter):
            z_next = f(z)
            done = (z_next - z).norm(dim=-1).max() <= atol
            z = z_next
            if done:
                break
    z_star = z.detach()
    out = f(z_star)
    if not (torch.is_grad_enabled() and out.requires_grad):
        return out
    z_in = z_star.clone().requires_grad_(True)
    with torch.enable_grad():
        f_in = f(z_in)

    def adjoint(grad: Tensor) -> Tensor:
        g = grad
        for _ in range(max_iter):
            (jtg,) = torch.autograd.grad(f_in, z_in, g, retain_graph=True)
            g_next = grad + jtg
            done = (g_next - g).abs().max() <= atol * (1 + grad.abs().max())
            g = g_next
            if done:
                break
        return g

    out.register_hook(adjoint)
    return out
