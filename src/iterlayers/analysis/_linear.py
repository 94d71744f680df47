"""Matrix-free linearisations of a cell: Jacobian-vector and vector-Jacobian products.

Every analysis routine reduces to products with a Jacobian of a cell ``f(z, x)`` at a point. Batch elements
are assumed independent (the batched Jacobian is block diagonal), so one batched vjp/jvp computes all
per-sample products ``J_b v_b`` at once; vectors live in ``[B, n]`` with ``n`` the per-sample size.

The vjp is one reverse-mode pass. The jvp uses the double-vjp identity
``J v = d/du <J^T u, v>``: ``g(u) = J^T u`` is linear in a dummy ``u``, and differentiating ``<g(u), v>``
with respect to ``u`` gives ``J v``. It costs two reverse passes but only needs ordinary (double) backward
support, which every PyTorch op that trains a network has, unlike forward-mode AD.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor
from iterlayers.errors import OptionTypeError, ValidationError


def call_cell(cell: Callable, z: Tensor, x: Tensor | None) -> Tensor:
    """Evaluate ``cell(z, x)``; with ``x is None`` a one-argument ``cell(z)`` is accepted too."""
    if x is None:
        try:
            inspect.signature(cell).bind(z)
        except TypeError:
            return cell(z, None)
        except ValueError:  # no signature available (builtins): use the documented convention
            return cell(z, None)
        return cell(z)
    return cell(z, x)


def check_state(z: Tensor, name: str = "z") -> None:
    if not isinstance(z, Tensor):
        raise OptionTypeError(f"{name} must be a torch.Tensor of shape [B, ...], got {type(z).__name__}")
    if z.dim() < 1 or z.shape[0] == 0:
        raise ValidationError(f"{name} must have a non-empty batch dimension, got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise OptionTypeError(f"{name} must be floating point (float32/float64), got {z.dtype}")


def check_method(method: str, valid: Sequence[str], name: str = "method") -> None:
    if method not in valid:
        raise ValidationError(f"{name} must be one of {tuple(valid)}, got {method!r}")


def check_positive(value, name: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValidationError(f"{name} must be a positive number, got {value!r}")


def bdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of ``[B, n]`` tensors -> ``[B]``."""
    return (a * b).sum(-1)


def bnorm(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a, dim=-1)


def random_unit(batch: int, n: int, *, seed: int, dtype: torch.dtype, device) -> Tensor:
    """Seeded standard-normal start vectors, normalised per sample (generated on CPU for reproducibility)."""
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(batch, n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return v / bnorm(v).clamp_min(torch.finfo(dtype).tiny)[:, None]


class LinearMap:
    """Derivative of ``out`` with respect to ``inp`` (both ``[B, ...]``, per-sample block diagonal).

    ``out`` must have been computed from ``inp`` with grad enabled. ``vjp`` maps ``[B, n_out] -> [B, n_in]``
    and ``jvp`` maps ``[B, n_in] -> [B, n_out]``.
    """

    def __init__(self, out: Tensor, inp: Tensor):
        self.out = out
        self.inp = inp
        self.batch = out.shape[0]
        self.n_out = out[0].numel()
        self.n_in = inp[0].numel()
        self._dual: tuple[Tensor, Tensor | None] | None = None

    def _zeros_in(self) -> Tensor:
        return torch.zeros(self.batch, self.n_in, dtype=self.inp.dtype, device=self.inp.device)

    def vjp(self, u: Tensor) -> Tensor:
        if not self.out.requires_grad:  # the output depends on nothing differentiable: J = 0
            return self._zeros_in()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.out, self.inp, u.reshape(self.out.shape).to(self.out.dtype),
                                       retain_graph=True, allow_unused=True)
        if g is None:
            return self._zeros_in()
        return g.detach().reshape(self.batch, self.n_in)

    def jvp(self, v: Tensor) -> Tensor:
        if not self.out.requires_grad:
            return torch.zeros(self.batch, self.n_out, dtype=self.out.dtype, device=self.out.device)
        with torch.enable_grad():
            if self._dual is None:
                dummy = torch.zeros_like(self.out, requires_grad=True)
                (g,) = torch.autograd.grad(self.out, self.inp, dummy, create_graph=True, retain_graph=True,
                                           allow_unused=True)
                self._dual = (dummy, g)
            dummy, g = self._dual
            if g is None or not g.requires_grad:  # output does not depend on the input at all
                return torch.zeros(self.batch, self.n_out, dtype=self.out.dtype, device=self.out.device)
            (r,) = torch.autograd.grad(g, dummy, v.reshape(self.inp.shape).to(g.dtype), retain_graph=True,
                                       allow_unused=True)
        if r is None:
            return torch.zeros(self.batch, self.n_out, dtype=self.out.dtype, device=self.out.device)
        return r.detach().reshape(self.batch, self.n_out)


class CellLinearization:
    """One evaluation ``f = cell(z, x)`` with the graph kept, exposing ``J_z`` and (if x given) ``J_x``."""

    def __init__(self, cell: Callable, z: Tensor, x: Tensor | None = None, *, need_x: bool = False):
        check_state(z, "z")
        if x is not None and not isinstance(x, Tensor):
            raise OptionTypeError(f"x must be a torch.Tensor or None, got {type(x).__name__}")
        if need_x and x is None:
            raise ValidationError("x must be given: this quantity differentiates with respect to the input x")
        if need_x and not x.is_floating_point():
            raise OptionTypeError(f"x must be floating point to differentiate with respect to it, got {x.dtype}")
        with torch.enable_grad():
            self.z = z.detach().requires_grad_(True)
            self.x = None if x is None else x.detach().requires_grad_(need_x)
            self.f = call_cell(cell, self.z, self.x)
        if not isinstance(self.f, Tensor):
            raise OptionTypeError(f"cell(z, x) must return a Tensor, got {type(self.f).__name__}")
        if self.f.shape != z.shape:
            raise ValidationError(f"cell(z, x) must return the shape of z {tuple(z.shape)}, got {tuple(self.f.shape)}")
        self.Jz = LinearMap(self.f, self.z)
        self.Jx = LinearMap(self.f, self.x) if need_x else None
        self.batch, self.n = z.shape[0], z[0].numel()
        self.dtype, self.device = z.dtype, z.device


def dense_from_vjp(lin: LinearMap) -> Tensor:
    """Dense per-sample Jacobian ``[B, n_out, n_in]`` from ``n_out`` batched vjps (row by row)."""
    eye = torch.eye(lin.n_out, dtype=lin.out.dtype, device=lin.out.device)
    basis = eye[:, None, :].expand(lin.n_out, lin.batch, lin.n_out)
    if not lin.out.requires_grad:
        return torch.zeros(lin.batch, lin.n_out, lin.n_in, dtype=lin.inp.dtype, device=lin.inp.device)
    try:
        with torch.enable_grad():
            (g,) = torch.autograd.grad(lin.out, lin.inp, basis.reshape(lin.n_out, *lin.out.shape),
                                       retain_graph=True, allow_unused=True, is_grads_batched=True)
        if g is None:
            return torch.zeros(lin.batch, lin.n_out, lin.n_in, dtype=lin.inp.dtype, device=lin.inp.device)
        rows = g.detach().reshape(lin.n_out, lin.batch, lin.n_in)
    except (RuntimeError, NotImplementedError):  # some ops have no batching rule: fall back to a loop
        rows = torch.stack([lin.vjp(basis[i]) for i in range(lin.n_out)])
    return rows.permute(1, 0, 2).contiguous()
