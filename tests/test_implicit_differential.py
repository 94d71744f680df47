"""Differential tests over a zoo of cells: every DEQ answer against a dense reference computed here.

For each cell, the reference treats the whole batch as one vector (so cells that couple samples are handled
exactly): the fixed point by many damped iterations in float64, and the dense implicit-function theorem with
the full Jacobian ``J = dF/dZ`` of the batched map:

    VJP:  dL/dx = (dF/dx)^T (I - J)^{-T} g            JVP:  dz*/dx v = (I - J)^{-1} (dF/dx) v

The forward residual is measured here, never taken from the solver's statistics; second order through
``backward="implicit"`` must be refused with :class:`UnsupportedError`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import iterlayers as il
from iterlayers.errors import UnsupportedError
from problems import TanhCell, random_matrix

D = torch.float64
TIGHT = dict(atol=1e-11, rtol=0.0, max_iter=500, backward_atol=1e-11, backward_rtol=0.0, on_failure="raise")


@dataclass
class Case:
    """``F(z, x)``: the batched map on flat ``[B, N]`` states; ``layer(x)``: the DEQ answer, flat ``[B, N]``."""

    F: Callable
    layer: Callable
    x: torch.Tensor
    n: int  # state width
    tol: float = 1e-9  # forward residual / gradient tolerance
    setup: Callable | None = None  # run before each call (e.g. set a Python attribute)


def reference(case: Case):
    x = case.x.detach()
    B, n = x.shape[0], case.n
    z = torch.zeros(B, n, dtype=x.dtype)
    with torch.no_grad():
        for _ in range(4000):
            z = 0.5 * z + 0.5 * case.F(z, x)
    assert (case.F(z, x) - z).norm() < 1e-13, "the reference fixed point itself did not converge"
    J = torch.autograd.functional.jacobian(lambda zz: case.F(zz, x), z).reshape(B * n, B * n)
    Jx = torch.autograd.functional.jacobian(lambda xx: case.F(z, xx), x).reshape(B * n, x.numel())
    return z, J, Jx


def zoo() -> dict[str, Callable[[], Case]]:
    def independent():
        cell = TanhCell(5, norm=0.8, seed=41)
        x = torch.randn(4, 5, dtype=D)
        deq = il.DEQ(cell, **TIGHT)
        return Case(cell, deq, x, 5)

    def batchnorm():
        class BN(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(42)
                self.lin = nn.Linear(5, 5).double()
                self.bn = nn.BatchNorm1d(5, eps=1.0).double()
                with torch.no_grad():
                    self.lin.weight.mul_(0.2 / torch.linalg.matrix_norm(self.lin.weight, 2))

            def forward(self, z, x):
                return torch.tanh(0.3 * self.bn(z) + self.lin(z) + x)

        cell = BN()
        return Case(cell, il.DEQ(cell, **TIGHT), 0.5 * torch.randn(6, 5, dtype=D), 5)

    def batch_mean():
        cell = TanhCell(5, norm=0.5, seed=43)

        class Mean(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = cell

            def forward(self, z, x):
                return self.inner(z - 0.8 * z.mean(0, keepdim=True), x - x.mean(0, keepdim=True))

        m = Mean()
        x = torch.randn(5, 5, dtype=D) * torch.logspace(-2, 0, 5, dtype=D)[:, None]
        return Case(m, il.DEQ(m, **TIGHT), x, 5)

    def graph(kind):
        def make():
            g = torch.Generator().manual_seed(44)
            A = (torch.rand(6, 6, generator=g) < 0.4).double()
            A = ((A + A.T) > 0).double() + torch.eye(6, dtype=D)
            d = A.sum(1).rsqrt()
            adj = d[:, None] * A * d[None, :]
            W, U = random_matrix(4, 0.8, seed=45), random_matrix(4, 1.0, seed=46)

            def F(z, x, adj=adj):
                return torch.tanh(adj @ z @ W + x @ U)

            x = torch.randn(6, 4, dtype=D) * torch.logspace(-2, 0, 6, dtype=D)[:, None]
            if kind == "closure":
                deq = il.DEQ(lambda z, x: F(z, x), **TIGHT)
                return Case(F, deq, x, 4)
            deq = il.DEQ(F, **TIGHT)
            return Case(F, lambda xx: deq(xx, adj=adj), x, 4)
        return make

    def attribute():
        class Temp(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = TanhCell(5, norm=0.7, seed=47)
                self.temp = 0.3

            def forward(self, z, x):
                return self.inner(self.temp * z, x)

        cell = Temp()
        deq = il.DEQ(cell, hoist=False, **TIGHT)
        deq(torch.randn(3, 5, dtype=D))  # a first call at another value of the attribute

        def setup():
            cell.temp = 1.0

        return Case(cell, deq, torch.randn(3, 5, dtype=D), 5, setup=setup)

    def dropout_mask():
        cell = TanhCell(5, norm=0.8, seed=48)
        mask = (torch.rand(4, 5, generator=torch.Generator().manual_seed(49)) > 0.3).double() / 0.7

        def F(z, x, mask=mask):
            return cell(z * mask, x)

        deq = il.DEQ(F, **TIGHT)
        return Case(F, lambda xx: deq(xx, mask), torch.randn(4, 5, dtype=D), 5)

    def tuple_state():
        a, b = TanhCell(3, 4, norm=0.6, seed=50), TanhCell(2, 4, norm=0.6, seed=51)
        Wab = random_matrix(3, 0.3, seed=52)[:, :2]

        def cell(z, x):
            za, zb = z
            return a(za, x) + 0.0 * za, b(zb, x) + (za @ Wab)[:, :2]

        def F(zf, x):
            return torch.cat(cell((zf[:, :3], zf[:, 3:]), x), 1)

        deq = il.DEQ(cell, **TIGHT)

        def layer(x):
            za, zb = deq(x, z0=(x.new_zeros(x.shape[0], 3), x.new_zeros(x.shape[0], 2)))
            return torch.cat([za, zb], 1)

        return Case(F, layer, torch.randn(4, 4, dtype=D), 5)

    def two_inputs():
        W = random_matrix(5, 0.8, seed=53)
        A, Bm = random_matrix(5, 1.0, seed=54), random_matrix(5, 1.0, seed=55)[:, :3]

        def cell(z, a, b):
            return torch.tanh(z @ W.T + a @ A.T + b @ Bm.T)

        deq = il.DEQ(cell, **TIGHT)
        return Case(lambda z, x: cell(z, x[:, :5], x[:, 5:]), lambda x: deq(x[:, :5], x[:, 5:]),
                    torch.randn(4, 8, dtype=D), 5)

    def compiled():
        class Relu(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(56)
                self.lin = nn.Linear(6, 6).double()
                with torch.no_grad():
                    self.lin.weight.mul_(0.6 / torch.linalg.matrix_norm(self.lin.weight, 2))

            def forward(self, z, x):
                return torch.relu(self.lin(z)) + x

        eager = Relu()
        return Case(eager, il.DEQ(torch.compile(eager), **TIGHT), torch.randn(4, 6, dtype=D), 6)

    return {
        "independent": independent, "batchnorm": batchnorm, "batch_mean": batch_mean,
        "graph_closure": graph("closure"), "graph_kwargs": graph("kwargs"), "attribute": attribute,
        "dropout_mask": dropout_mask, "tuple_state": tuple_state, "two_inputs": two_inputs,
        "compiled": compiled,
    }


ZOO = zoo()


def needs(name):
    if name == "compiled" and shutil.which("cc") is None:
        pytest.skip("inductor needs a C compiler")


@pytest.mark.parametrize("name", list(ZOO))
def test_forward_vjp_jvp_and_hvp_against_the_dense_reference(name):
    needs(name)
    case = ZOO[name]()
    if case.setup:
        case.setup()
    z_ref, J, Jx = reference(case)
    B, n = z_ref.shape
    I = torch.eye(B * n, dtype=D)

    # forward: the true residual, measured here, and the distance to the reference fixed point
    with torch.no_grad():
        z = case.layer(case.x)
    assert (case.F(z, case.x) - z).norm(dim=1).max() < case.tol
    torch.testing.assert_close(z, z_ref, atol=10 * case.tol, rtol=0)

    # VJP
    g = torch.randn(B, n, dtype=D)
    x = case.x.detach().clone().requires_grad_()
    (case.layer(x) * g).sum().backward()
    u = torch.linalg.solve((I - J).T, g.reshape(-1))
    torch.testing.assert_close(x.grad.reshape(-1), Jx.T @ u, atol=10 * case.tol, rtol=1e-8)

    # JVP (forward mode)
    v = torch.randn_like(case.x)
    with fwAD.dual_level():
        t = fwAD.unpack_dual(case.layer(fwAD.make_dual(case.x.detach(), v))).tangent
    ref = torch.linalg.solve(I - J, Jx @ v.reshape(-1))
    torch.testing.assert_close(t.reshape(-1), ref, atol=10 * case.tol, rtol=1e-8)

    # HVP: refused, never a wrong value
    x = case.x.detach().clone().requires_grad_()
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad((case.layer(x) * g).sum(), x, create_graph=True)


def test_autocast_bf16_forward_and_vjp_within_bf16_resolution():
    """bf16 cannot resolve 1e-10: the forward residual and the gradient are checked at bf16's resolution
    (eps = 7.8e-3) against the float64 reference of the same cell."""
    torch.manual_seed(57)
    lin, inj = nn.Linear(8, 8), nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))

    def cell(z, x):
        return torch.tanh(lin(z) + inj(x))

    x = torch.randn(6, 8)
    deq = il.DEQ(cell, atol=3e-2, rtol=0)
    v = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), fwAD.dual_level():
        t = fwAD.unpack_dual(deq(fwAD.make_dual(x, v))).tangent
    assert t.dtype == torch.float32 and deq.stats["jvp"].status == "converged"  # the state's dtype
    xb = x.clone().requires_grad_()
    g = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(xb)
    assert z.dtype == torch.float32 and deq.stats["forward"].info["cell_dtype"] == "torch.bfloat16"
    (z.float() * g).sum().backward()
    with torch.no_grad():
        assert (cell(z.float(), x) - z.float()).norm(dim=1).max() < 5e-2
    lin64, inj64 = lin.double(), inj.double()
    case = Case(lambda zz, xx: torch.tanh(lin64(zz) + inj64(xx)), None, x.double(), 8)
    z_ref, J, Jx = reference(case)
    u = torch.linalg.solve((torch.eye(48, dtype=D) - J).T, g.double().reshape(-1))
    gx = (Jx.T @ u).reshape(6, 8)
    assert (z.double() - z_ref).norm() < 3e-2 * z_ref.norm()
    assert (xb.grad.double() - gx).norm() < 5e-2 * gx.norm()
    t_ref = torch.linalg.solve(torch.eye(48, dtype=D) - J, Jx @ v.double().reshape(-1)).reshape(6, 8)
    assert (t.double() - t_ref).norm() < 5e-2 * t_ref.norm()
