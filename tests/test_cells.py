"""The cell protocol (iterlayers.cells): one initial-state rule for every consumer, tuple states in the
analysis toolkit, and no private copy of the rule left in src/."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers import analysis, cells
from iterlayers.errors import OptionTypeError, ShapeMismatchError
from iterlayers.operators import PicardIteration

SRC = Path(il.__file__).parent


class WithInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        with torch.no_grad():
            self.lin.weight.mul_(0.3 / torch.linalg.matrix_norm(self.lin.weight, 2))

    def init_state(self, x):
        return torch.full_like(x, 0.25)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def test_initial_state_rule():
    x = torch.randn(4, 3)
    plain = lambda z, x: z  # noqa: E731
    assert torch.equal(cells.initial_state(plain, x), torch.zeros_like(x))
    assert torch.equal(cells.initial_state(WithInit(), x), torch.full_like(x, 0.25))
    z0 = torch.ones(4, 3)
    assert cells.initial_state(WithInit(), x, z0=z0) is z0
    with pytest.raises(OptionTypeError, match="DEQ: no input"):
        cells.initial_state(plain, where="DEQ")
    with pytest.raises(OptionTypeError, match="u has dtype"):
        cells.initial_state(plain, torch.ones(2, 3, dtype=torch.long), names=["u"])
    with pytest.raises(ShapeMismatchError, match="batch dimension"):
        cells.initial_state(plain, torch.ones(3))


def test_every_consumer_uses_the_same_initial_state():
    torch.manual_seed(0)
    cell = WithInit().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    expected = il.unroll(lambda z: cell(z, x), torch.full_like(x, 0.25), max_iter=3).z
    torch.testing.assert_close(il.Unrolled(cell, max_iter=3)(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(PicardIteration(cell, alpha=0.0, max_iter=3)(x), expected, rtol=0, atol=1e-15)
    assert torch.equal(il.DEQ(cell).initial_state(x), torch.full_like(x, 0.25))


def test_the_analysis_toolkit_accepts_tuple_states():
    torch.manual_seed(1)
    A = 0.4 * torch.eye(3, dtype=torch.float64)
    B = 0.3 * torch.eye(2, dtype=torch.float64)

    def cell(z, x):
        u, v = z
        return torch.tanh(u @ A + x), torch.tanh(v @ B + 0.1 * u[:, :2])

    def flat(w, x):
        u, v = cell((w[:, :3], w[:, 3:]), x)
        return torch.cat([u, v], 1)

    x = torch.randn(2, 3, dtype=torch.float64)
    z = (torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64))
    c_tuple = analysis.certify_contraction(cell, z, x, samples=2, method="dense")
    c_flat = analysis.certify_contraction(flat, torch.cat(z, 1), x, samples=2, method="dense")
    assert c_tuple.verdict == c_flat.verdict and c_tuple.max_spectral_norm < 1  # local evidence: "unknown"
    assert c_tuple.max_spectral_norm == pytest.approx(c_flat.max_spectral_norm, rel=1e-12)
    assert c_tuple.max_spectral_radius == pytest.approx(c_flat.max_spectral_radius, rel=1e-12)
    z_star = il.solve(cell, z, args=(x,), atol=1e-12, rtol=0, max_iter=200).z
    rep = analysis.report(cell, x, z_star=z_star, z0=z, sensitivities=False, certify_samples=0)
    ref = analysis.report(flat, x, z_star=torch.cat(z_star, 1), z0=torch.cat(z, 1), sensitivities=False,
                          certify_samples=0)
    torch.testing.assert_close(rep.spectral_radius, ref.spectral_radius)
    assert float(rep.fixed_point_residual.max()) <= 1e-11


def test_a_tuple_view_keeps_the_cells_lipschitz_bound():
    class Bounded(nn.Module):
        def lipschitz_bound(self):
            return 0.5

        def forward(self, z, x):
            return tuple(0.5 * p for p in z)

    z = (torch.ones(2, 3), torch.ones(2, 1))
    view, w = cells.flattened(Bounded(), z)
    assert w.shape == (2, 4) and cells.lipschitz_bound(view) == 0.5
    plain_view, _ = cells.flattened(lambda z, x: z, z)
    assert cells.lipschitz_bound(plain_view) is None


def test_no_private_initial_state_helper_is_left():
    # the rule lives in cells.initial_state only: no other module reads init_state itself
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "cells.py"
                 and re.search(r"hasattr\([^)]*\"init_state\"|getattr\([^)]*\"init_state\"", p.read_text())]
    assert offenders == []
