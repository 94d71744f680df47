"""Loop-invariant code motion (iterlayers.hoist): the split must never change a result, must actually move
the z-independent work out of the loop, and must refuse every cell it cannot split safely."""
import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.implicit import VERDICTS
from iterlayers.hoist import split_cell


class Injected(nn.Module):
    """tanh(W z + U x + b): the input injection U x + b is loop-invariant."""

    def __init__(self, d=16, scale=0.8, din=None):
        super().__init__()
        self.W = nn.Linear(d, d, bias=False)
        self.U = nn.Linear(din or d, d)
        with torch.no_grad():
            self.W.weight.mul_(scale / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


class Counter:
    """Counts the calls of a submodule through a forward hook."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


def spread_inputs(B=12, d=16, dtype=torch.float64, seed=0):
    """Inputs of very different scales, so samples converge at different iterations (exercises slicing)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g, dtype=dtype) * torch.logspace(-3, 1, B, dtype=dtype).unsqueeze(1)


def solve_both(cell, x, z0=None, **kw):
    """Forward solve with and without hoisting; returns both outputs and stats."""
    opts = dict(solver="anderson", atol=1e-10, rtol=0, max_iter=200, on_failure="raise") | kw
    out = {}
    for hoist in (True, False):
        # Each solve verifies its stopping rule in full (a cached verdict would skip the second one's check).
        VERDICTS.clear()
        deq = il.DEQ(cell, hoist=hoist, **opts)
        with torch.no_grad():
            z = deq(x, z0)
        out[hoist] = (z, deq.stats["forward"])
    return out


def assert_same(out):
    (zh, sh), (zp, sp) = out[True], out[False]
    torch.testing.assert_close(zh, zp, rtol=0, atol=1e-12)
    assert torch.equal(sh.nstep, sp.nstep)
    assert sh.nfe == sp.nfe


def test_injection_is_hoisted_and_results_are_unchanged():
    torch.manual_seed(0)
    cell = Injected().double()
    x = spread_inputs()
    out = solve_both(cell, x)
    assert_same(out)
    assert out[True][1].info["hoisted_ops"] >= 1
    assert out[False][1].info["hoisted_ops"] == 0
    # samples stop at different iterations, so the hoisted U x was sliced along with them
    assert len(set(out[True][1].nstep.tolist())) > 1


def test_injection_runs_once_per_solve_instead_of_once_per_iteration():
    torch.manual_seed(0)
    cell = Injected().double()
    x = spread_inputs()
    calls_u, calls_w = Counter(cell.U), Counter(cell.W)
    deq = il.DEQ(cell, solver="picard", atol=1e-10, rtol=0, max_iter=200)
    with torch.no_grad():
        deq(x)  # first call builds and verifies the split
        calls_u.n = calls_w.n = 0
        deq(x)
    assert calls_u.n == 1
    assert calls_w.n == deq.stats["forward"].nfe > 5
    deq.hoist = False
    calls_u.n = 0
    with torch.no_grad():
        deq(x)
    assert calls_u.n == deq.stats["forward"].nfe


def test_gradients_are_unchanged_by_hoisting():
    torch.manual_seed(0)
    cell = Injected().double()
    x = spread_inputs().requires_grad_()
    grads = {}
    for hoist in (True, False):
        cell.zero_grad()
        x.grad = None
        deq = il.DEQ(cell, hoist=hoist, atol=1e-11, rtol=0, max_iter=300, on_failure="raise")
        deq(x).pow(2).sum().backward()
        grads[hoist] = [x.grad.clone()] + [p.grad.clone() for p in cell.parameters()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_parameter_updates_and_dtype_changes_are_followed():
    torch.manual_seed(0)
    cell = Injected()
    x = spread_inputs(dtype=torch.float32)
    deq = il.DEQ(cell, solver="picard", atol=1e-6, rtol=0, max_iter=200)
    with torch.no_grad():
        deq(x)
        cell.U.weight.mul_(-0.5)  # in-place update, as an optimiser does
        cell.U.bias.add_(1.0)
        z_h = deq(x)
    deq.hoist = False
    with torch.no_grad():
        z_p = deq(x)
    # equal up to float32 round-off: U x is computed on the whole batch once instead of on the shrinking set
    # of unconverged samples, and a matrix product's rounding depends on its batch size
    torch.testing.assert_close(z_h, z_p, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    # a new dtype (parameters and buffers replaced by .double()) gets a split of its own
    cell.double()
    assert_same(solve_both(cell, x.double()))
    # load_state_dict copies new values into the live parameters
    cell.load_state_dict({k: torch.randn_like(v) * 0.1 for k, v in cell.state_dict().items()})
    assert_same(solve_both(cell, x.double()))


class DropoutOnInput(Injected):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(self.drop(x)))


def test_random_ops_stay_in_the_loop():
    torch.manual_seed(0)
    cell = DropoutOnInput().double().train()
    calls = Counter(cell.drop)
    deq = il.DEQ(cell, solver="picard", atol=1e-8, rtol=0, max_iter=20, on_failure="ignore")
    with torch.no_grad():
        deq(spread_inputs())
        calls.n = 0
        deq(spread_inputs())
    # a fresh dropout mask at every evaluation, exactly as without hoisting
    assert calls.n == deq.stats["forward"].nfe
    # in eval mode dropout is the identity but still a random-op module: never hoisted, results unchanged
    assert_same(solve_both(cell.eval(), spread_inputs()))


class NormOnInput(Injected):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(16)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(self.bn(x)))


def test_batchnorm_in_training_mode_is_not_hoisted_but_is_in_eval_mode():
    torch.manual_seed(0)
    cell = NormOnInput().double()
    x = spread_inputs(seed=1)
    calls = Counter(cell.bn)
    deq = il.DEQ(cell, solver="picard", atol=1e-8, rtol=0, max_iter=100, on_failure="ignore")
    with torch.no_grad():
        deq(x)
        calls.n = 0
        deq(x)
    assert calls.n == deq.stats["forward"].nfe  # running statistics updated at every evaluation, as written
    cell.eval()
    with torch.no_grad():
        deq(x)
        calls.n = 0
        deq(x)
    assert calls.n == 1
    assert_same(solve_both(cell, x))


class InPlace(Injected):
    def forward(self, z, x):
        h = self.U(x)
        h.add_(self.W(z))  # mutates a value that would be hoisted (fx traces `h += ...` out of place)
        return torch.tanh(h)


class InPlaceFunction(Injected):
    def forward(self, z, x):
        h = self.U(x).abs()
        # A function-form in-place op in the loop on a value that would be hoisted: the split would carry
        # max(|U x|, W z_1, ..., W z_k) from one iteration to the next. The verification cannot see it
        # (the carried value is a no-op at z0 = 0 and at z1), so the in-place test must refuse the split.
        torch.clamp_min_(h, self.W(z))
        return torch.tanh(h + 0 * z)


class DataDependent(Injected):
    def forward(self, z, x):
        h = self.W(z) + self.U(x)
        if h.abs().max() > 100:  # control flow on a tensor value: not traceable
            h = h / 100
        return torch.tanh(h)


class Stateful(Injected):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.history = []

    def forward(self, z, x):
        self.calls += 1
        self.history.append(1)
        return torch.tanh(self.W(z) + self.U(x))


class TypeTest(Injected):
    """Traces into the wrong branch (a proxy is not a Tensor): the verification must catch it."""

    def forward(self, z, x):
        if isinstance(x, torch.Tensor):
            return torch.tanh(self.W(z) + self.U(x))
        return torch.tanh(self.W(z) - 3 * self.U(x))


class TypeTestLate(Injected):
    """Traces into the wrong branch, which agrees with the cell at z0 = 0 (W 0 = 2 W 0) and differs from the
    second iterate on: a verification of the first iterate alone would accept it."""

    def forward(self, z, x):
        if isinstance(z, torch.Tensor):
            return torch.tanh(self.W(z) + self.U(x))
        return torch.tanh(2 * self.W(z) + self.U(x))


@pytest.mark.parametrize("cls", [InPlace, InPlaceFunction, DataDependent, Stateful, TypeTest, TypeTestLate])
def test_unsafe_cells_are_used_as_written(cls):
    torch.manual_seed(0)
    cell = cls().double()
    x = spread_inputs()
    assert split_cell(cell, torch.zeros_like(x), (x,), x.shape[0]) is None
    out = solve_both(cell, x)
    assert_same(out)
    assert out[True][1].info["hoisted_ops"] == 0
    if cls is Stateful:
        # tracing must not have left proxies in the module; the counters still count real calls
        assert isinstance(cell.calls, int) and cell.calls == len(cell.history) > 0


class ShapeFromInput(Injected):
    """Uses x.shape[0] inside the loop: the batch size changes when converged samples are dropped, so that
    value must not be frozen by the split."""

    def forward(self, z, x):
        return torch.tanh(self.W(z).reshape(x.shape[0], -1) + self.U(x))


class DefaultArgument(Injected):
    def forward(self, z, x, mask=None):
        h = self.W(z) + self.U(x)
        if mask is not None:
            h = h * mask
        return torch.tanh(h)


class TupleState(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.a, self.b = Injected(d), Injected(d)

    def forward(self, z, x):
        return self.a(z[1], x), 0.5 * self.b(z[0], x)


@pytest.mark.parametrize("cls", [ShapeFromInput, DefaultArgument])
def test_splits_that_need_care_are_exact(cls):
    torch.manual_seed(0)
    cell = cls().double()
    x = spread_inputs()
    out = solve_both(cell, x)
    assert_same(out)
    assert out[True][1].info["hoisted_ops"] >= 1
    assert len(set(out[True][1].nstep.tolist())) > 1


def test_tuple_states_and_non_module_cells():
    torch.manual_seed(0)
    x = spread_inputs()
    cell = TupleState().double()
    z0 = (torch.zeros_like(x), torch.zeros_like(x))
    out = solve_both(cell, x, z0)
    for a, b in zip(out[True][0], out[False][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert out[True][1].info["hoisted_ops"] >= 2
    inner = Injected().double()
    out = solve_both(lambda z, xx: inner(z, xx), x)
    assert_same(out)
    assert out[True][1].info["hoisted_ops"] == 0


def test_train_and_eval_modes_get_separate_splits():
    torch.manual_seed(0)
    cell = DropoutOnInput().double()
    x = spread_inputs()
    for mode in (True, False, True):
        cell.train(mode)
        deq = il.DEQ(cell, solver="picard", atol=1e-8, rtol=0, max_iter=20, on_failure="ignore")
        with torch.no_grad():
            deq(x)
        assert deq.stats["forward"].info["hoisted_ops"] == 0  # dropout feeds U: nothing safe to hoist
    cell = NormOnInput().double()
    for mode, hoisted in ((True, 0), (False, 2), (True, 0)):
        cell.train(mode)
        deq = il.DEQ(cell, solver="picard", atol=1e-8, rtol=0, max_iter=100, on_failure="ignore")
        with torch.no_grad():
            deq(x)
        # training: bn updates its statistics, so bn and the U that consumes it stay in the loop
        assert deq.stats["forward"].info["hoisted_ops"] == hoisted


class DropoutOnState(Injected):
    """Dropout on the z path: the injection can still be hoisted in training mode."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, z, x):
        return torch.tanh(self.drop(self.W(z)) + self.U(x))


def test_training_mode_dropout_elsewhere_does_not_block_hoisting():
    torch.manual_seed(0)
    cell = DropoutOnState().double().train()
    calls_u, calls_drop = Counter(cell.U), Counter(cell.drop)
    deq = il.DEQ(cell, solver="picard", atol=1e-8, rtol=0, max_iter=15, on_failure="ignore")
    with torch.no_grad():
        deq(spread_inputs())
        calls_u.n = calls_drop.n = 0
        deq(spread_inputs())
    assert deq.stats["forward"].info["hoisted_ops"] == 1
    assert calls_u.n == 1 and calls_drop.n == deq.stats["forward"].nfe


class NormOnState(Injected):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(16)

    def forward(self, z, x):
        return torch.tanh(self.bn(self.W(z)) + self.U(x))


def test_building_the_split_leaves_no_trace_in_buffers_or_the_random_stream():
    x = spread_inputs(seed=2)
    states, draws, hoisted = {}, {}, {}
    for hoist in (True, False):
        torch.manual_seed(0)
        cell = NormOnState().double()
        deq = il.DEQ(cell, solver="picard", atol=1e-8, rtol=0, max_iter=30, on_failure="ignore", hoist=hoist)
        torch.manual_seed(7)
        with torch.no_grad():
            deq(x)
        hoisted[hoist] = deq.stats["forward"].info["hoisted_ops"]
        draws[hoist] = torch.rand(3)
        states[hoist] = {k: v.clone() for k, v in cell.state_dict().items()}
    assert hoisted == {True: 1, False: 0}
    # the verification's extra evaluations neither moved the batch-norm statistics nor consumed random numbers
    torch.testing.assert_close(draws[True], draws[False], rtol=0, atol=0)
    for k in states[True]:
        torch.testing.assert_close(states[True][k], states[False][k], rtol=0, atol=1e-12)
