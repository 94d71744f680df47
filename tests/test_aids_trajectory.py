"""Trajectory supervision (fixed-point correction): the kept states against hand-unrolled Picard iterates, their
one-step gradients, weights, count spacing, every solver and gradient mode, refusals."""
import math

import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.layers import Trajectory
from problems import TanhCell


def spread_inputs(batch=6, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-5, 0, batch, dtype=torch.float64)[:, None]
    return scale * torch.randn(batch, n, generator=g, dtype=torch.float64)


def hand_iterates(cell, x, nstep, ks):
    """Picard iterates z_k = f(z_{k-1}) from 0, each sample frozen after its own nstep iterations."""
    z, out = torch.zeros_like(x), {}
    with torch.no_grad():
        for k in range(1, max(ks) + 1):
            z = torch.where((k <= nstep)[:, None], cell(z, x), z)
            if k in ks:
                out[k] = z.clone()
    return out


@pytest.mark.parametrize("backward,lam", [("jfb", 1.0), ("implicit", 1.0), ("phantom", 0.5)])
def test_states_and_gradients_against_hand_unrolled_picard(backward, lam):
    cell = TanhCell(4, norm=0.9)
    at = (1, 2, 5, 9, 45)
    layer = il.DEQ(cell, solver="picard", backward=backward, stopping="per_sample", atol=1e-9, rtol=0,
                   max_iter=300, phantom_damping=0.5, trajectory=Trajectory(at=at, weights="exponential", gamma=0.5))
    x = spread_inputs().requires_grad_()
    layer(x)
    nstep = layer.stats["forward"].nstep
    assert int(nstep.min()) < 45 < int(nstep.max())  # some samples are frozen before iteration 45, some not
    assert [k for k, _, _ in layer.states] == list(at)
    assert [w for _, _, w in layer.states] == [0.5 ** 4, 0.5 ** 3, 0.25, 0.5, 1.0]
    loss = layer.trajectory_loss(lambda s: s.square().sum())
    grads = torch.autograd.grad(loss, [x, *cell.parameters()])

    ref = hand_iterates(cell, x.detach(), nstep, at)
    x2 = x.detach().requires_grad_()
    ref_loss = 0
    for (k, state, w), i in zip(layer.states, range(len(at))):
        zk = ref[k]
        ref_state = (1 - lam) * zk + lam * cell(zk, x2)
        torch.testing.assert_close(state, ref_state, atol=1e-12, rtol=0)
        ref_loss = ref_loss + w * ref_state.square().sum()
    ref_grads = torch.autograd.grad(ref_loss, [x2, *cell.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_count_spaces_states_over_the_iterations_taken():
    cell = TanhCell(4, norm=0.9)
    layer = il.DEQ(cell, solver="picard", stopping="per_sample", atol=1e-9, rtol=0, max_iter=300,
                   trajectory=Trajectory(count=4, weights="linear"))
    x = spread_inputs(seed=1)
    layer(x)
    nstep = layer.stats["forward"].nstep
    N = int(nstep.max())
    ks = [math.ceil(i * N / 4) for i in range(1, 5)]
    assert [k for k, _, _ in layer.states] == ks
    assert [w for _, _, w in layer.states] == [0.25, 0.5, 0.75, 1.0]
    ref = hand_iterates(cell, x, nstep, ks)
    for k, state, _ in layer.states:
        torch.testing.assert_close(state.detach(), cell(ref[k], x).detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
@pytest.mark.parametrize("backward", ["implicit", "phantom", "jfb"])
def test_every_solver_and_gradient_mode(solver, backward):
    cell = TanhCell(4, norm=0.9)
    layer = il.DEQ(cell, solver=solver, backward=backward, atol=1e-10, rtol=0, max_iter=200,
                   trajectory=Trajectory(at=(1, 3, 100)))
    x = spread_inputs(seed=2)
    z = layer(x)
    ks = [k for k, _, _ in layer.states]
    assert ks[:2] == [1, 3] and 100 not in ks  # a solve shorter than 100 iterations keeps no state there
    (z.sum() + layer.trajectory_loss(lambda s: s.square().mean())).backward()
    assert all(float(p.grad.abs().max()) > 0 for p in cell.parameters())
    # the first state is one step from the solver's first iterate: further from z* than the answer
    first = layer.states[0][1].detach()
    assert float((first - z.detach()).norm()) > 1e-6


def test_tuple_states_and_eval_mode_and_refusals():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, z, x):
            u, v = z
            return torch.tanh(self.a * v + x), torch.tanh(self.a * u)

    layer = il.DEQ(Two(), solver="picard", trajectory=Trajectory(at=(1, 2)))
    x = torch.randn(3, 2, dtype=torch.float64)
    z0 = (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
    layer(x, z0=z0)
    (k1, (u1, v1), _), _ = layer.states
    # z_1 = f(z_0) = (tanh(x), 0); the state is f(z_1) = (tanh(a * 0 + x), tanh(a tanh(x)))
    torch.testing.assert_close(u1, torch.tanh(x))
    torch.testing.assert_close(v1, torch.tanh(0.5 * torch.tanh(x)))
    layer.eval()
    layer(x, z0=z0)
    assert layer.states is None
    with pytest.raises(il.ValidationError, match="no states"):
        layer.trajectory_loss(lambda s: s[0].sum())
    layer.train()
    layer.backward = "unrolled"
    with pytest.raises(il.UnsupportedError, match="Unrolled"):
        layer(x, z0=z0)
    with pytest.raises(il.ValidationError, match="exactly one"):
        Trajectory()
    with pytest.raises(il.ValidationError, match="weights"):
        Trajectory(count=2, weights="quadratic")
    with pytest.raises(il.ValidationError, match="at"):
        Trajectory(at=(0, 2))


def test_batch_norm_statistics_untouched_by_the_states():
    class BNCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, z, x):
            return torch.tanh(0.5 * self.bn(self.lin(z)) + x)

    torch.manual_seed(0)
    cell = BNCell()
    layer = il.DEQ(cell, trajectory=Trajectory(count=3), on_failure="ignore")
    z = layer(torch.randn(8, 4))
    assert int(cell.bn.num_batches_tracked) == 1
    (z.sum() + layer.trajectory_loss(lambda s: s.sum())).backward()


def test_a_solve_without_iterations_gives_a_zero_loss():
    cell = TanhCell(4)
    layer = il.DEQ(cell, solver="picard", trajectory=Trajectory(count=3))
    x = torch.randn(2, 4, dtype=torch.float64)
    z_star = il.DEQ(cell, atol=1e-12, rtol=0)(x).detach()
    layer(x, z0=z_star)  # already converged: no iteration
    assert layer.states == [] and float(layer.trajectory_loss(lambda s: s.sum())) == 0.0
