"""Fixed-point correction (trajectory supervision): the kept states against hand-unrolled Picard iterates, each
attached by the layer's gradient mode (JFB: one step; phantom: its damped steps; implicit: the dense
implicit-function-theorem gradient at the state), weights, count spacing, every solver, refusals."""
import math

import pytest
import torch

import iterlayers as il
from iterlayers.layers import FixedPointCorrection
from problems import BatchNormCell, PairCell, TanhCell


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


def reference_grads(cell, x, zk, w, backward, phantom=(5, 0.5)):
    """Gradient of ``w * ||state(zk)||^2`` for x and the cell's parameters, by hand, for each mode."""
    x = x.detach().requires_grad_()
    params = list(cell.parameters())
    if backward == "jfb":
        state = cell(zk, x)
        return state, torch.autograd.grad(w * state.square().sum(), [x, *params])
    if backward == "phantom":
        steps, lam = phantom
        state = zk
        for _ in range(steps):
            state = (1 - lam) * state + lam * cell(state, x)
        return state, torch.autograd.grad(w * state.square().sum(), [x, *params])
    # implicit: dL/dtheta = u^T df/dtheta at zk, u = (I - J^T)^{-1} g with J = df/dz at zk (dense, per sample)
    state = cell(zk, x)
    g = 2 * w * state.detach()
    J = torch.stack([torch.autograd.functional.jacobian(lambda zb: cell(zb[None], x[b:b + 1].detach())[0], zk[b])
                     for b in range(len(zk))])
    eye = torch.eye(zk.shape[1], dtype=zk.dtype)
    u = torch.linalg.solve(eye - J.transpose(1, 2), g[..., None])[..., 0]
    return state, torch.autograd.grad(state, [x, *params], u)


@pytest.mark.parametrize("backward", ["jfb", "phantom", "implicit"])
@pytest.mark.parametrize("how", ["at", "count"])
def test_states_and_gradients_against_hand_unrolled_picard(backward, how):
    cell = TanhCell(4, norm=0.9)
    correction = (FixedPointCorrection(at=(1, 2, 5, 9, 45), weights="exponential", gamma=0.5) if how == "at"
                  else FixedPointCorrection(count=5, weights="exponential", gamma=0.5))
    layer = il.DEQ(cell, solver="picard", backward=backward, stopping="per_sample", atol=1e-9, rtol=0,
                   max_iter=300, backward_atol=1e-12, backward_rtol=0, backward_max_iter=500, correction=correction)
    x = spread_inputs()
    layer(x)
    nstep = layer.stats["forward"].nstep
    ks = [k for k, _, _ in layer.states]
    if how == "at":
        assert ks == [1, 2, 5, 9, 45]
        assert int(nstep.min()) < 45 < int(nstep.max())  # some samples are frozen before iteration 45, some not
    else:
        N = int(nstep.max())
        assert ks == [math.ceil(i * N / 5) for i in range(1, 6)]
    assert [w for _, _, w in layer.states] == [0.5 ** 4, 0.5 ** 3, 0.25, 0.5, 1.0]
    ref = hand_iterates(cell, x, nstep, ks)
    for k, state, w in layer.states:
        # each state alone: its gradient is that of its mode at its iterate
        layer.states = [(k, state, w)]
        got = torch.autograd.grad(layer.correction_loss(lambda s: s.square().sum()), [*cell.parameters()],
                                  retain_graph=True)
        ref_state, ref_g = reference_grads(cell, x, ref[k], w, backward)
        torch.testing.assert_close(state, ref_state, atol=1e-12, rtol=0)
        for g, r in zip(got, ref_g[1:]):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)


def test_input_gradient_flows_through_the_states():
    cell = TanhCell(4, norm=0.9)
    layer = il.DEQ(cell, solver="picard", backward="jfb", correction=FixedPointCorrection(at=(2,)))
    x = spread_inputs().requires_grad_()
    layer(x)
    (gx,) = torch.autograd.grad(layer.correction_loss(lambda s: s.square().sum()), x)
    ref = hand_iterates(cell, x.detach(), layer.stats["forward"].nstep, [2])[2]
    x2 = x.detach().requires_grad_()
    (rx,) = torch.autograd.grad(cell(ref, x2).square().sum(), x2)
    torch.testing.assert_close(gx, rx, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
@pytest.mark.parametrize("backward", ["implicit", "phantom", "jfb", "unrolled"])
@pytest.mark.parametrize("how", ["at", "count"])
def test_every_solver_and_gradient_mode(solver, backward, how):
    cell = TanhCell(4, norm=0.9)
    correction = FixedPointCorrection(at=(1, 3)) if how == "at" else FixedPointCorrection(count=3)
    layer = il.DEQ(cell, solver=solver, backward=backward, atol=1e-10, rtol=0, max_iter=200, correction=correction)
    x = spread_inputs(seed=2)
    z = layer(x)
    assert len(layer.states) in (2, 3)
    if how == "at":  # an iteration past the solve's end (none here) would give z*'s state
        assert [k for k, _, _ in layer.states] == [1, 3]
    (z.sum() + layer.correction_loss(lambda s: s.square().mean())).backward()
    assert all(float(p.grad.abs().max()) > 0 for p in cell.parameters())
    # the first state is one iteration (plus its mode's steps) from z0: further from z* than the answer
    first = layer.states[0][1].detach()
    assert float((first - z.detach()).norm()) > 1e-6


def test_tuple_states_eval_mode_and_refusals():
    x = torch.randn(3, 2, dtype=torch.float64)
    z0 = (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
    for correction in (FixedPointCorrection(at=(1, 2)), FixedPointCorrection(count=40)):
        layer = il.DEQ(PairCell(), solver="picard", backward="jfb", atol=1e-12, rtol=0, correction=correction)
        layer(x, z0=z0)
        k1, (u1, v1), _ = layer.states[0]
        assert k1 == 1
        # z_1 = f(z_0) = (tanh(x), 0); the JFB state is f(z_1) = (tanh(x), tanh(a tanh(x)))
        torch.testing.assert_close(u1, torch.tanh(x))
        torch.testing.assert_close(v1, torch.tanh(0.5 * torch.tanh(x)))
    layer.eval()
    layer(x, z0=z0)
    assert layer.states is None
    with pytest.raises(il.ValidationError, match="no states"):
        layer.correction_loss(lambda s: s[0].sum())
    with pytest.raises(il.ValidationError, match="exactly one"):
        FixedPointCorrection()
    with pytest.raises(il.ValidationError, match="weights"):
        FixedPointCorrection(count=2, weights="quadratic")
    with pytest.raises(il.ValidationError, match="at"):
        FixedPointCorrection(at=(0, 2))
    with pytest.raises(il.OptionTypeError, match="correction"):
        il.DEQ(PairCell(), correction=(1, 2))


@pytest.mark.parametrize("correction", [FixedPointCorrection(count=3), FixedPointCorrection(at=(1, 2, 3, 500))])
def test_batch_norm_statistics_updated_once_per_solve(correction):
    torch.manual_seed(0)
    cell = BatchNormCell()
    layer = il.DEQ(cell, correction=correction, on_failure="ignore")
    z = layer(torch.randn(8, 4))
    assert int(cell.bn.num_batches_tracked) == 1
    (z.sum() + layer.correction_loss(lambda s: s.sum())).backward()


def test_a_solve_without_iterations_gives_a_zero_loss():
    cell = TanhCell(4)
    layer = il.DEQ(cell, solver="picard", correction=FixedPointCorrection(count=3))
    x = torch.randn(2, 4, dtype=torch.float64)
    z_star = il.DEQ(cell, atol=1e-12, rtol=0)(x).detach()
    layer(x, z0=z_star)  # already converged: no iteration
    assert layer.states == [] and float(layer.correction_loss(lambda s: s.sum())) == 0.0


def test_an_iteration_past_the_end_gives_the_state_of_z_star():
    cell = TanhCell(4, norm=0.5)
    layer = il.DEQ(cell, backward="jfb", atol=1e-10, rtol=0, correction=FixedPointCorrection(at=(1, 1000)))
    x = spread_inputs(seed=3)
    z = layer(x)
    (_, first, _), (k, last, _) = layer.states
    assert k == 1000  # the state of z*, attached by the mode again: the layer's output, as a value
    torch.testing.assert_close(last, z, rtol=1e-12, atol=1e-12)
    assert last.grad_fn is not None
