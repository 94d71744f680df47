"""Variational dropout in a DEQ: one mask per forward pass, fixed for the solve and the backward, redrawn at the
next forward, sliced with the samples under per-sample stopping (iterlayers.dropout)."""
import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.dropout import VariationalDropout
from iterlayers.errors import ShapeMismatchError, ValidationError
from problems import random_matrix


class DropCell(nn.Module):
    """``tanh(W drop(z) + s * x)``: the input scale ``s`` spreads the samples' convergence iterations."""

    def __init__(self, n=6, p=0.3, *, record=False, dropout=None):
        super().__init__()
        self.W = nn.Parameter(random_matrix(n, 0.9, seed=3))
        self.drop = VariationalDropout(p) if dropout is None else dropout
        self.record = record
        self.calls = []  # (rows seen, mask applied) per evaluation

    def forward(self, z, x):
        if self.record:
            applied = self.drop(torch.ones_like(z)).detach()
            self.calls.append((None if self.drop.rows is None else self.drop.rows.clone(), applied))
        return torch.tanh(self.drop(z) @ self.W.T + x)


def spread_inputs(batch=8, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-4, 0.5, batch, dtype=torch.float64)[:, None]
    return scale * torch.randn(batch, n, generator=g, dtype=torch.float64)


def masked_reference(cell, x, mask):
    """The fixed point of the deterministic cell with the given mask, all rows solved jointly and tightly."""
    W = cell.W.detach()
    sol = il.solve(lambda z, x: torch.tanh((z * mask) @ W.T + x), torch.zeros_like(x), args=(x,),
                   stopping="joint", atol=1e-13, rtol=0, max_iter=500)
    assert sol.stats.status == "converged"
    return sol.z


def test_mask_is_constant_over_the_solve_and_rows_follow_the_samples():
    torch.manual_seed(0)
    cell = DropCell(record=True)
    layer = il.DEQ(cell, atol=1e-11, rtol=0, max_iter=200, stopping="per_sample", hoist=False)
    x = spread_inputs()
    layer(x)
    mask = cell.drop.mask
    assert len(cell.calls) > 5
    sub_batch = 0
    for rows, applied in cell.calls:
        expected = mask if rows is None else mask[rows]
        assert torch.equal(applied, expected)
        sub_batch += rows is not None and len(rows) < len(x)
    assert sub_batch > 0  # some evaluations held only the unconverged samples


@pytest.mark.parametrize("stopping", ["auto", "per_sample"])
def test_per_sample_fixed_point_is_the_one_of_the_masked_map(stopping):
    torch.manual_seed(1)
    cell = DropCell()
    layer = il.DEQ(cell, atol=1e-12, rtol=0, max_iter=300, stopping=stopping)
    x = spread_inputs()
    z = layer(x)
    st = layer.stats["forward"]
    assert st.info["stopping"].startswith("per_sample")
    assert int(st.nstep.max()) > int(st.nstep.min()) + 3  # samples converged at different iterations
    ref = masked_reference(cell, x, cell.drop.mask)
    torch.testing.assert_close(z, ref, atol=1e-11, rtol=0)
    # and the true residual of the masked map, measured independently of the solver's statistics
    W = cell.W.detach()
    z = z.detach()
    r = (torch.tanh((z * cell.drop.mask) @ W.T + x) - z).norm(dim=1)
    assert float(r.max()) < 1e-11


def test_a_mask_not_sliced_with_the_rows_is_caught():
    # Negative control of the row mechanism: a module that ignores the rows would apply the first mask rows to
    # whatever samples remain; the shape check refuses it instead of solving a mixed-up map.
    class Unsliced(VariationalDropout):
        def deq_rows(self, rows):
            pass

    torch.manual_seed(1)
    cell = DropCell(dropout=Unsliced(0.3))
    layer = il.DEQ(cell, atol=1e-12, rtol=0, max_iter=300, stopping="per_sample")
    with pytest.raises(ShapeMismatchError, match="mask"):
        layer(spread_inputs())


def test_mask_redrawn_per_forward_scaled_and_identity_in_eval():
    torch.manual_seed(2)
    p = 0.25
    cell = DropCell(n=64, p=p)
    layer = il.DEQ(cell, atol=1e-8, rtol=0, max_iter=100)
    x = 0.1 * torch.randn(32, 64, dtype=torch.float64)
    layer(x)
    first = cell.drop.mask
    layer(x)
    second = cell.drop.mask
    assert first.shape == second.shape == (32, 64)
    assert not torch.equal(first, second)
    values = torch.unique(torch.cat([first.flatten(), second.flatten()]))
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / (1 - p)], dtype=torch.float64))
    kept = float((first > 0).double().mean())
    assert abs(kept - (1 - p)) < 0.05  # 2048 Bernoulli draws: 5 sigma is 0.048
    layer.eval()
    z_eval = layer(x)
    W = cell.W.detach()
    torch.testing.assert_close(z_eval, torch.tanh(z_eval @ W.T + x), atol=1e-7, rtol=0)
    assert cell.drop(x) is x


def test_outside_a_deq_a_new_mask_per_call():
    torch.manual_seed(3)
    d = VariationalDropout(0.5)
    x = torch.ones(4, 10)
    assert not torch.equal(d(x), d(x))


@pytest.mark.parametrize("kind,shape,mask_shape", [
    ("features", (4, 5), (4, 5)),
    ("features", (4, 3, 5), (4, 3, 5)),
    ("channels", (4, 3, 6, 6), (4, 3, 1, 1)),
    ("tokens", (4, 7, 5), (4, 1, 5)),
])
def test_mask_shapes(kind, shape, mask_shape):
    d = VariationalDropout(0.5, kind=kind)
    d.deq_reset(shape[0])
    out = d(torch.ones(shape))
    assert d.mask.shape == mask_shape
    torch.testing.assert_close(out, d.mask.expand(shape))


def test_bad_options_and_shapes():
    with pytest.raises(ValidationError, match="p"):
        VariationalDropout(1.0)
    with pytest.raises(ValidationError, match="kind"):
        VariationalDropout(0.1, kind="pixels")
    d = VariationalDropout(0.1, kind="tokens")
    d.deq_reset(2)
    with pytest.raises(ShapeMismatchError, match="tokens"):
        d(torch.ones(2, 5))


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jfb", "unrolled"])
def test_backward_uses_the_forward_mask(backward):
    """The gradient of every mode is that of the deterministic cell with the forward pass's mask."""
    torch.manual_seed(4)
    cell = DropCell()
    layer = il.DEQ(cell, backward=backward, atol=1e-12, rtol=0, max_iter=300, phantom_steps=3,
                   backward_atol=1e-12, backward_rtol=0)
    x = spread_inputs(seed=1).requires_grad_()
    layer(x).sum().backward()
    mask = cell.drop.mask
    got_W, got_x = cell.W.grad.clone(), x.grad.clone()

    ref_cell = DropCell()
    ref_cell.W.data.copy_(cell.W.data)
    ref_cell.drop = nn.Identity()
    masked = il.DEQ(lambda z, x: ref_cell(z * mask, x), backward=backward, atol=1e-12, rtol=0, max_iter=300,
                    phantom_steps=3, backward_atol=1e-12, backward_rtol=0, stopping="joint")
    x2 = x.detach().clone().requires_grad_()
    masked(x2).sum().backward()
    torch.testing.assert_close(got_W, ref_cell.W.grad, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(got_x, x2.grad, atol=1e-9, rtol=1e-7)
    assert cell.drop.mask is mask  # the backward pass drew nothing


class InjectionDropCell(DropCell):
    """Dropout on the input injection, a part of the cell that hoisting computes once per solve."""

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + self.drop(x))


@pytest.mark.parametrize("solver", ["anderson", "broyden", "picard"])
@pytest.mark.parametrize("where", ["state", "injection"])
def test_every_solver_and_hoist_setting_solves_the_masked_map(solver, where):
    x = spread_inputs(seed=2)
    out = {}
    for hoist in (True, False):
        torch.manual_seed(5)
        cell = DropCell() if where == "state" else InjectionDropCell()
        layer = il.DEQ(cell, solver=solver, atol=1e-11, rtol=0, max_iter=400, hoist=hoist, stopping="per_sample")
        for _ in range(2):  # a second forward pass: a new mask, read by the same split
            z = layer(x)
            st = layer.stats["forward"]
            assert int(st.nstep.max()) > int(st.nstep.min())  # sub-batches were evaluated
            assert (st.info["hoisted_ops"] > 0) == hoist
            mask = cell.drop.mask
            W = cell.W.detach()
            if where == "state":
                ref = masked_reference(cell, x, mask)
            else:
                ref = il.solve(lambda z, x: torch.tanh(z @ W.T + x * mask), torch.zeros_like(x), args=(x,),
                               stopping="joint", atol=1e-13, rtol=0, max_iter=500).z
            torch.testing.assert_close(z, ref, atol=1e-9, rtol=0)
        out[hoist] = z
    torch.testing.assert_close(out[True], out[False], atol=1e-9, rtol=0)  # same seed: same masks, same points


class ShapedCell(nn.Module):
    """``tanh(a * conv-free mixing of drop(z) + x)`` on images ``[B, C, H, W]`` or sequences ``[B, T, C]``."""

    def __init__(self, kind, channels=3):
        super().__init__()
        self.M = nn.Parameter(random_matrix(channels, 0.8, seed=5))
        self.drop = VariationalDropout(0.4, kind=kind)
        self.channel_dim = 1 if kind == "channels" else -1

    def forward(self, z, x, mask=None):
        h = self.drop(z) if mask is None else z * mask
        mixed = torch.movedim(torch.movedim(h, self.channel_dim, -1) @ self.M.T, -1, self.channel_dim)
        return torch.tanh(mixed + x)


@pytest.mark.parametrize("kind,shape", [("channels", (6, 3, 4, 4)), ("tokens", (6, 5, 3))])
def test_channel_and_token_masks_under_per_sample_stopping(kind, shape):
    torch.manual_seed(6)
    cell = ShapedCell(kind)
    scale = torch.logspace(-4, 0.5, shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))
    x = scale * torch.randn(shape, dtype=torch.float64)
    layer = il.DEQ(cell, atol=1e-12, rtol=0, max_iter=300, stopping="per_sample")
    z = layer(x)
    assert int(layer.stats["forward"].nstep.max()) > int(layer.stats["forward"].nstep.min())
    mask = cell.drop.mask
    assert mask.shape == ((6, 3, 1, 1) if kind == "channels" else (6, 1, 3))
    ref = il.solve(lambda z, x: cell(z, x, mask), torch.zeros_like(x), args=(x,), stopping="joint", atol=1e-13,
                   rtol=0, max_iter=500)
    torch.testing.assert_close(z.detach(), ref.z.detach(), atol=1e-11, rtol=0)
