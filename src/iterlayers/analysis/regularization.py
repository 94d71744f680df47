"""Jacobian regularisation for training stable equilibrium layers.

Penalising ``||J_f||_F^2`` at the fixed point keeps the cell's Jacobian small, hence ``rho(J*) < 1`` and
well-conditioned (I - J*), which keeps forward and backward solves fast (Bai, Koltun & Kolter, "Stabilizing
Equilibrium Models by Jacobian Regularization", ICML 2021). The Frobenius norm is estimated without forming J
by Hutchinson's trick: for ``eps ~ N(0, I)`` (or Rademacher), ``E ||eps^T J||^2 = tr(J J^T) = ||J||_F^2``, one
vjp per probe. With ``create_graph=True`` the estimate is differentiable and can be added to a loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._linear import check_method
from iterlayers.errors import OptionTypeError, ValidationError


def jacobian_frobenius_penalty(f_out: Tensor, z_in: Tensor, *, samples: int = 1, distribution: str = "normal",
                               generator: torch.Generator | None = None, create_graph: bool = True) -> Tensor:
    """Unbiased estimate of ``mean_b ||J_b||_F^2 / n``, ``J_b = d f_out[b] / d z_in[b]``, n = per-sample size.

    ``f_out`` must have been computed from ``z_in`` (``requires_grad``) with grad enabled, e.g.
    ``z = z_star.detach().requires_grad_(); f = cell(z, x); loss += gamma * jacobian_frobenius_penalty(f, z)``.
    ``samples`` probes are averaged (variance ~ 1/samples). Returns a scalar Tensor.
    """
    check_method(distribution, ("normal", "rademacher"), "distribution")
    if not isinstance(samples, int) or samples < 1:
        raise ValidationError(f"samples must be a positive int, got {samples!r}")
    if not isinstance(f_out, Tensor) or not isinstance(z_in, Tensor):
        raise OptionTypeError("f_out and z_in must be Tensors")
    if not z_in.requires_grad:
        raise ValidationError("z_in must require grad and f_out must be computed from it (with grad enabled)")
    if f_out.dim() < 1 or f_out.shape[0] != z_in.shape[0]:
        raise ValidationError(f"f_out and z_in must share the batch dimension, got {tuple(f_out.shape)} and "
                         f"{tuple(z_in.shape)}")
    batch, n = z_in.shape[0], z_in[0].numel()
    if distribution == "normal":
        eps = torch.randn((samples, *f_out.shape), generator=generator, dtype=f_out.dtype, device="cpu")
    else:
        eps = torch.randint(0, 2, (samples, *f_out.shape), generator=generator, device="cpu").to(f_out.dtype) * 2 - 1
    eps = eps.to(f_out.device)
    with torch.enable_grad():
        try:  # all probes in one vmapped backward pass
            (g,) = torch.autograd.grad(f_out, z_in, eps, create_graph=create_graph, retain_graph=True,
                                       allow_unused=True, is_grads_batched=True)
            gs = None if g is None else [g]
        except (RuntimeError, NotImplementedError):  # an op without a batching rule: one probe at a time
            gs = []
            for e in eps:
                (g,) = torch.autograd.grad(f_out, z_in, e, create_graph=create_graph, retain_graph=True,
                                           allow_unused=True)
                if g is None:
                    gs = None
                    break
                gs.append(g)
    if gs is None:  # f_out does not depend on z_in: J = 0
        return f_out.new_zeros(())
    return sum(g.pow(2).sum() for g in gs) / (samples * batch * n)
