"""A fallback chain of solvers as the DEQ's forward solver (DEQOptions(solver=[...])): per-sample hand-over,
true residuals measured here, and the implicit gradient against the closed form."""
import pytest
import torch

import iterlayers as il
from iterlayers.errors import UnsupportedError, ValidationError


class Scaled(torch.nn.Module):
    """z -> x - a_i z per sample (a_i > 1: Picard diverges; the fixed point z* = x / (1 + a_i) exists)."""

    def forward(self, z, x, a):
        return x - a[:, None] * z


def data():
    x = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)[:, None].repeat(1, 3)
    a = torch.tensor([0.2, 0.5, 0.8, 1.5, 2.0, 3.0], dtype=torch.float64)
    return x, a


def test_the_samples_picard_fails_on_are_finished_by_anderson():
    x, a = data()
    xg = x.clone().requires_grad_()
    layer = il.DEQ(Scaled(), solver=["picard", "anderson"], atol=1e-10, rtol=0, max_iter=200, on_failure="raise",
                   backward_solver="gmres")
    z = layer(xg, a)
    st = layer.stats["forward"]
    assert st.info["finished_by"] == ["picard"] * 3 + ["anderson"] * 3
    true = (Scaled()(z, x, a) - z).norm(dim=1)
    assert float(true.max()) <= 1e-10 + 1e-14
    torch.testing.assert_close(z.detach(), x / (1 + a[:, None]), rtol=1e-9, atol=1e-10)
    z.sum().backward()
    torch.testing.assert_close(xg.grad, (1 / (1 + a))[:, None].expand_as(x), rtol=1e-8, atol=1e-10)


def test_without_the_fallback_the_same_solve_fails():
    """Negative control: Picard alone does not solve the samples with a_i > 1."""
    x, a = data()
    layer = il.DEQ(Scaled(), solver="picard", atol=1e-10, rtol=0, max_iter=200, on_failure="ignore")
    with torch.no_grad():
        layer(x, a)
    st = layer.stats["forward"]
    assert st.converged.tolist() == [True] * 3 + [False] * 3


def test_chain_options_are_checked():
    with pytest.raises(ValidationError):
        il.DEQOptions(solver=["picard", "anderson"], solver_options={"m": 3})
    with pytest.raises(UnsupportedError):
        il.DEQOptions(solver=["picard", "anderson"], trajectory=(1,))
    with pytest.raises(ValidationError):
        il.DEQOptions(solver=[])
    assert il.DEQOptions(solver=["picard", "anderson"]).solver == ("picard", "anderson")
