"""The DEQ module: dtypes, modes, stats, options, compile, DistributedDataParallel."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import iterlayers as il
from problems import TanhCell


class Nested(nn.Module):
    """Parameters deep inside submodules and a custom initial state of a different shape than x."""

    def __init__(self):
        super().__init__()
        self.inject = nn.Sequential(nn.Linear(3, 8))
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        with torch.no_grad():
            self.body[0].weight.mul_(0.5 / torch.linalg.matrix_norm(self.body[0].weight, 2))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], 8)

    def forward(self, z, x):
        return self.body[1](self.body[0](z) + self.inject(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_custom_state(dtype):
    cell = Nested().to(dtype)
    deq = il.DEQ(cell, atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)
    x = torch.randn(5, 3, dtype=dtype)
    z = deq(x)
    assert z.shape == (5, 8) and z.dtype == dtype
    z.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())
    assert deq.stats["forward"].status == "converged" and deq.stats["backward"].status == "converged"


def test_eval_max_iter_and_repr():
    deq = il.DEQ(TanhCell(4, norm=0.99), max_iter=50, eval_max_iter=2, atol=1e-12, rtol=0, on_failure="ignore")
    x = torch.randn(2, 4, dtype=torch.float64)
    deq.eval()
    deq(x)
    assert int(deq.stats["forward"].nstep.max()) == 2
    assert "solver='anderson'" in repr(deq) and "backward='implicit'" in repr(deq)


def test_torch_compile_of_the_cell():
    cell = TanhCell(4, norm=0.5)
    compiled = torch.compile(cell, backend="aot_eager", dynamic=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z = il.DEQ(compiled, atol=1e-10, rtol=0)(x)
    z.sum().backward()
    g1 = x.grad.clone()
    x.grad = None
    il.DEQ(cell, atol=1e-10, rtol=0)(x).sum().backward()
    torch.testing.assert_close(g1, x.grad)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    from ddp_worker import make_model, run_worker

    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 2, dtype=torch.float64)
    torch.save({"state": model.state_dict(), "x": x, "y": y}, tmp_path / "inputs.pt")
    nn.functional.mse_loss(model(x), y).backward()
    single = {k: p.grad.clone() for k, p in model.named_parameters()}
    mp.spawn(run_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    for k in single:
        torch.testing.assert_close(grads[k], single[k], atol=1e-10, rtol=1e-8)


def test_unrolled_layer_matches_plain_loop_and_converges_to_deq():
    cell = TanhCell(5, norm=0.5, seed=3)
    x = torch.randn(3, 5, dtype=torch.float64)
    layer = il.Unrolled(cell, max_iter=4, damping=0.5, return_all=True)
    zs = layer(x)
    z = torch.zeros_like(x)
    for k in range(4):
        z = 0.5 * z + 0.5 * cell(z, x)
        torch.testing.assert_close(zs[k], z)
    st = layer.stats["forward"]
    assert len(st.trace) == 5 and st.nstep.tolist() == [4, 4, 4] and "max_iter=4" in repr(layer)
    torch.testing.assert_close(st.trace[-1], (cell(zs[-1], x) - zs[-1]).norm(dim=1), rtol=1e-14, atol=0)
    assert layer.stats["backward"] is None
    deep = il.Unrolled(cell, max_iter=80)(x)
    torch.testing.assert_close(deep, il.DEQ(cell, atol=1e-13, rtol=0)(x), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="max_iter must be"):
        il.Unrolled(cell, max_iter=-1)


def test_options_are_one_validated_value_shared_by_layer_and_function():
    opts = il.DEQOptions(solver="broyden", atol=1e-9, rtol=0, solver_options={"memory": 7})
    deq = il.DEQ(TanhCell(4, norm=0.5), opts, max_iter=33)
    # The layer's value is the given one with the override; the given one is unchanged (frozen).
    assert deq.options.max_iter == 33 and deq.options.solver == "broyden" and opts.max_iter == 50
    # A caller's dict changed afterwards does not reach the frozen value.
    raw = {"m": 3}
    held = il.DEQOptions(solver_options=raw)
    raw["m"] = 99
    assert held.solver_options == {"m": 3}
    # Attribute access reads and writes the value; writes are validated and leave it intact on error.
    assert deq.max_iter == 33 and deq.backward == "implicit"
    deq.max_iter = 12
    assert deq.options.max_iter == 12
    with pytest.raises(ValueError, match="max_iter must be"):
        deq.max_iter = -1
    assert deq.options.max_iter == 12
    with pytest.raises(ValueError, match="backward must be one of"):
        deq.options = deq.options.replace(backward="adjoint")
    # Unknown names fail where they are given, naming the valid ones; layer and function share the list.
    for make in (lambda: il.DEQ(TanhCell(4), maxiter=3),
                 lambda: il.deq_solve(TanhCell(4), torch.zeros(2, 4), args=(torch.zeros(2, 4),), maxiter=3),
                 lambda: il.DEQOptions.build(None, maxiter=3)):
        with pytest.raises(TypeError, match=r"unknown option\(s\) \['maxiter'\]; valid DEQ options: .*'max_iter'"):
            make()
    with pytest.raises(TypeError, match="options must be a DEQOptions"):
        il.DEQ(TanhCell(4), {"max_iter": 3})
    with pytest.raises(ValueError, match="unrolled_damping must be in"):
        il.DEQOptions(unrolled_damping=1.5)
    with pytest.raises(ValueError, match="unknown solver"):
        il.DEQ(TanhCell(4), backward_solver="newton")
    with pytest.raises(ValueError, match="max_iter must be"):
        il.DEQ(TanhCell(4), eval_max_iter=-3)
    # The layer's result is deq_solve's with the same value.
    x = torch.randn(3, 4, dtype=torch.float64)
    cell = TanhCell(4, norm=0.5, dtype=torch.float64)
    torch.testing.assert_close(il.DEQ(cell, opts)(x), il.deq_solve(cell, torch.zeros_like(x), args=(x,), options=opts),
                               atol=0, rtol=0)
