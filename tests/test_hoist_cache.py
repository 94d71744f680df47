"""Hoisting must never be silently wrong: a cached split follows every change of what its trace baked in
(Python attributes, flags, training mode, submodules, parameters), and forward hooks fire once per real
evaluation or hoisting is refused. Fixed points are checked by calling the cell independently of the
solver's statistics; gradients against the dense implicit-function-theorem formula."""
import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers import hoist
from iterlayers.hoist import split_cell

D, B = 6, 3
TOL = 1e-10


def contraction(d, norm, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return norm * A / torch.linalg.matrix_norm(A, 2)


class Inner(nn.Module):
    """A custom submodule (fx inlines it): ``gain * (A x) + shift``, halved in training mode."""

    def __init__(self, d=D, gain=1.0, seed=1):
        super().__init__()
        self.A = nn.Parameter(contraction(d, 1.0, seed))
        self.gain = gain
        self.shift = 0.0

    def forward(self, x):
        h = self.gain * (x @ self.A.T) + self.shift
        return 0.5 * h if self.training else h


class Knobs(nn.Module):
    """``scale * tanh((W z + inner(x)) / temp + 0.3 flag)``: Python values a trace freezes."""

    def __init__(self, d=D):
        super().__init__()
        self.W = nn.Parameter(contraction(d, 0.3, 0))
        self.inner = Inner(d)
        self.temp = 1.0
        self.scale = 1
        self.flag = False
        self.cfg = {"offset": 0.0}

    def forward(self, z, x):
        h = (z @ self.W.T + self.inner(x)) / self.temp + self.cfg["offset"]
        if self.flag:
            h = h + 0.3
        return self.scale * torch.tanh(h)


def data(seed=3):
    return torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def dense_grad(cell, z, x, c):
    """d(sum c * z*)/dx by the implicit-function theorem, per sample, with dense Jacobians."""
    out = []
    for i in range(x.shape[0]):
        zi, xi = z[i:i + 1].detach(), x[i:i + 1].detach()
        J = torch.autograd.functional.jacobian(lambda zz: cell(zz, xi), zi).reshape(D, D)
        Jx = torch.autograd.functional.jacobian(lambda xx: cell(zi, xx), xi).reshape(D, D)
        u = torch.linalg.solve((torch.eye(D, dtype=J.dtype) - J).T, c[i])
        out.append(u @ Jx)
    return torch.stack(out)


def check_current_cell(deq, cell, x):
    """The returned z is the fixed point of the cell as it is now (its residual measured by calling the cell
    equals the reported one and meets the tolerance), and the gradient is the implicit gradient of that cell."""
    with torch.no_grad():
        z = deq(x)
        true_res = (cell(z, x) - z).norm(dim=1)
    assert float(true_res.max()) <= TOL, f"true residual {true_res.max():.3g}"
    torch.testing.assert_close(deq.stats["forward"].abs_residual, true_res, rtol=1e-6, atol=1e-14)
    stats = deq.stats["forward"]
    xg = x.clone().requires_grad_()
    z = deq(xg)  # f(z*) with the implicit backward attached
    c = torch.linspace(-1, 1, D, dtype=torch.float64).expand(B, D)
    (z * c).sum().backward()
    torch.testing.assert_close(xg.grad, dense_grad(cell, z, x, c), rtol=1e-7, atol=1e-9)
    return stats


def _set(path, value):
    def change(cell):
        obj = cell
        *head, last = path.split(".")
        for h in head:
            obj = getattr(obj, h)
        setattr(obj, last, value)
    return change


CHANGES = {
    "temp": _set("temp", 3.0),
    "scale": _set("scale", 2),
    "flag": _set("flag", True),
    "dict_entry": lambda cell: cell.cfg.update(offset=0.5),
    "submodule_float": _set("inner.gain", -2.0),
    "submodule_shift": _set("inner.shift", 0.4),
    "submodule_training": lambda cell: cell.inner.train(False),
    "replaced_submodule": _set("inner", Inner(D, gain=0.5, seed=7).double()),
    "replaced_by_leaf": _set("inner", nn.Linear(D, D).double()),
    "replaced_parameter": _set("W", nn.Parameter(contraction(D, 0.5, 9))),
    "in_place_parameter": lambda cell: cell.W.data.mul_(-1.5),
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_changed_cell_is_solved_and_differentiated_as_it_is_now(name):
    cell = Knobs()
    x = data()
    deq = il.DEQ(cell, solver="anderson", atol=TOL, rtol=0, max_iter=200, on_failure="raise",
                 backward_atol=1e-12, backward_rtol=0, backward_max_iter=200)
    with torch.no_grad():
        z_before = deq(x)
    first = check_current_cell(deq, cell, x)
    assert first.info["hoisted_ops"] >= 1  # inner(x) is hoisted
    CHANGES[name](cell)
    after = check_current_cell(deq, cell, x)
    # the split was rebuilt for the new cell (not just dropped): the injection is still hoisted
    assert after.info["hoisted_ops"] >= 1
    with torch.no_grad():
        z_after = deq(x)
    # the change moves the fixed point: a stale split would have been caught by check_current_cell
    assert float((z_after - z_before).abs().max()) > 1e-3


def test_a_cell_whose_attributes_keep_changing_stops_being_hoisted_and_stays_right():
    cell = Knobs()
    x = data()
    deq = il.DEQ(cell, solver="picard", atol=TOL, rtol=0, max_iter=300, on_failure="raise")
    hoisted = []
    for step in range(hoist._MAX_REBUILDS + 3):
        cell.temp = 1.0 + 0.5 * step  # an annealed temperature
        with torch.no_grad():
            z = deq(x)
            assert float((cell(z, x) - z).norm(dim=1).max()) <= TOL
        hoisted.append(deq.stats["forward"].info["hoisted_ops"])
    assert all(h >= 1 for h in hoisted[:hoist._MAX_REBUILDS + 1])
    assert hoisted[-1] == 0


def test_toggling_train_and_eval_keeps_one_split_per_mode_without_rebuilds():
    cell = Knobs()
    x = data()
    deq = il.DEQ(cell, solver="picard", atol=TOL, rtol=0, max_iter=300, on_failure="raise")
    for _ in range(hoist._MAX_REBUILDS + 2):
        for mode in (True, False):
            cell.train(mode)
            with torch.no_grad():
                z = deq(x)
                assert float((cell(z, x) - z).norm(dim=1).max()) <= TOL
            assert deq.stats["forward"].info["hoisted_ops"] >= 1
    assert hoist._CACHE[cell].get(hoist._REBUILDS, 0) == 0


class Count:
    def __init__(self):
        self.n = 0

    def __call__(self, *_):
        self.n += 1


@pytest.mark.parametrize("where", ["cell", "inlined_submodule", "cell_pre_hook"])
def test_a_forward_hook_fires_once_per_evaluation(where):
    cell = Knobs()
    x = data()
    deq = il.DEQ(cell, solver="anderson", atol=TOL, rtol=0, max_iter=200, on_failure="raise")
    with torch.no_grad():
        deq(x)  # the split exists before the hook is added: it must be dropped then
    count = Count()
    target = cell.inner if where == "inlined_submodule" else cell
    handle = (target.register_forward_pre_hook(count) if where == "cell_pre_hook"
              else target.register_forward_hook(count))
    try:
        with torch.no_grad():
            deq(x)
        assert count.n == deq.stats["forward"].nfe > 2
        assert deq.stats["forward"].info["hoisted_ops"] == 0
        count.n = 0
        deq(x.clone().requires_grad_()).sum().backward()
        # the forward solve's evaluations plus the one differentiable evaluation at z*
        assert count.n == deq.stats["forward"].nfe + 1
        assert split_cell(cell, torch.zeros_like(x), (x,), B) is None
    finally:
        handle.remove()
    with torch.no_grad():
        deq(x)
    assert deq.stats["forward"].info["hoisted_ops"] >= 1  # hoisting comes back once the hook is gone


def test_a_global_forward_hook_refuses_hoisting():
    cell = Knobs()
    x = data()
    deq = il.DEQ(cell, solver="picard", atol=TOL, rtol=0, max_iter=300, on_failure="raise")
    count = Count()

    def on_cell(module, *_):
        if module is cell:
            count(module)

    handle = torch.nn.modules.module.register_module_forward_hook(on_cell)
    try:
        with torch.no_grad():
            deq(x)
    finally:
        handle.remove()
    assert count.n == deq.stats["forward"].nfe
    assert deq.stats["forward"].info["hoisted_ops"] == 0


def test_a_hook_on_a_leaf_submodule_keeps_hoisting_and_fires_once_per_real_call():
    cell = Knobs()
    cell.inner = nn.Linear(D, D).double()  # a torch.nn leaf: the split still calls it
    x = data()
    count = Count()
    cell.inner.register_forward_hook(count)
    deq = il.DEQ(cell, solver="picard", atol=TOL, rtol=0, max_iter=300, on_failure="raise")
    with torch.no_grad():
        deq(x)
        count.n = 0
        z = deq(x)
        assert count.n == 1  # inner(x) really runs once per solve
        assert float((cell(z, x) - z).norm(dim=1).max()) <= TOL
    assert deq.stats["forward"].info["hoisted_ops"] >= 1


class LeafKnobs(Knobs):
    """Knobs with W z computed by a leaf module, so a hook on it counts the loop's evaluations."""

    def __init__(self):
        super().__init__()
        self.Wl = nn.Linear(D, D, bias=False).double()
        with torch.no_grad():
            self.Wl.weight.copy_(self.W)

    def forward(self, z, x):
        return self.scale * torch.tanh((self.Wl(z) + self.inner(x)) / self.temp)


def test_the_per_solve_check_costs_no_cell_evaluation():
    cell = LeafKnobs()
    x = data()
    deq = il.DEQ(cell, solver="picard", atol=TOL, rtol=0, max_iter=300, on_failure="raise")
    count = Count()
    cell.Wl.register_forward_hook(count)
    with torch.no_grad():
        deq(x)
        assert count.n > deq.stats["forward"].nfe  # building the split: trace verification evaluations
        count.n = 0
        deq(x)
    assert deq.stats["forward"].info["hoisted_ops"] >= 1
    # a cache hit: the loop's evaluations only, no verification and no trace
    assert count.n == deq.stats["forward"].nfe


def test_the_mlp_models_cell_keeps_its_hoisted_weight_and_trains_between_solves():
    # DEQMLP's cell computes W = gamma V / ||V||_2 (an SVD) from parameters alone: hoisted once per solve.
    # Optimiser steps between solves change V in place: no rebuild, and the solve follows the new weight.
    from iterlayers.models.deq_mlp import DEQMLP

    torch.manual_seed(0)
    model = DEQMLP(5, 3, width=8, atol=1e-9, max_iter=200).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        assert model.deq.stats["forward"].info["hoisted_ops"] >= 2
        with torch.no_grad():
            u = model.inject(x)
            z = model.deq(u)
            assert float((model.cell(z, u) - z).norm(dim=1).max()) <= 1e-9
    assert hoist._CACHE[model.cell].get(hoist._REBUILDS, 0) == 0
