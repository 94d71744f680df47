"""The mixed-precision policy: the cell under autocast, the solver's state and arithmetic in the state's dtype."""
import warnings

import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.errors import ShapeMismatchError
from iterlayers.solvers import LoopOptions, make_solver, run_loop
from iterlayers.solvers._loop import ToleranceWarning


class Cell(nn.Module):
    def __init__(self, d=16, scale=0.5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin, self.inj = nn.Linear(d, d), nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.mul_(scale / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


@pytest.mark.parametrize("solver", ["anderson", "broyden", "picard"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_state_and_histories_stay_float32_under_autocast(solver, dtype):
    cell = Cell()
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=dtype):
        assert cell(torch.zeros_like(x), x).dtype == dtype  # the cell does run in the low precision
        z, st = run_loop(cell, torch.zeros_like(x), args=(x,), solver=make_solver(solver), keep_state=True, options=LoopOptions(atol=0.05, rtol=0, max_iter=50, on_failure='raise', return_trace=False, divergence_ratio=1000000.0))
    assert z.dtype == torch.float32 and st.abs_residual.dtype == torch.float32
    assert st.info["cell_dtype"] == str(dtype)
    floats = [v for v in st.state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert all(v.dtype in (torch.float32, torch.float64) for v in floats)
    # The true residual of the returned state, with the cell as it ran (autocast), in float32:
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        r = (cell(z, x).float() - z).norm(dim=1)
    assert bool((r <= 5e-2).all()) and st.status == "converged"


def test_a_tolerance_below_the_cell_dtype_resolution_is_warned_about_by_that_dtype():
    cell = Cell(seed=1)
    x = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # rtol 1e-4 is above float32's eps (no warning for a float32 cell) but below bfloat16's 7.8e-3
            il.DEQ(cell, atol=0.0, rtol=1e-4, max_iter=5, on_failure="ignore")(x)
    msgs = [str(m.message) for m in w if issubclass(m.category, ToleranceWarning)]
    assert msgs and "torch.bfloat16 (the cell's output under autocast; the state is torch.float32)" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ToleranceWarning)
        il.DEQ(cell, atol=0.0, rtol=1e-4, max_iter=5, on_failure="ignore")(x)  # float32 cell: fine


def test_the_adjoint_tolerance_follows_the_cell_dtype():
    cell = Cell(seed=2)
    x = torch.randn(4, 16, requires_grad=True)
    deq = il.DEQ(cell, atol=3e-2, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(x)
    z.pow(2).sum().backward()
    bst = deq.stats["backward"]
    assert bst.status == "converged" and bst.atol >= torch.finfo(torch.bfloat16).eps
    # The gradient against the float32 implicit gradient, at bf16's resolution.
    x32 = x.detach().clone().requires_grad_()
    il.DEQ(cell, atol=1e-6, rtol=0)(x32).pow(2).sum().backward()
    assert (x.grad - x32.grad).norm() < 0.05 * x32.grad.norm()


def test_outside_autocast_a_dtype_change_is_still_an_error():
    z = torch.zeros(2, 4)
    with pytest.raises(ShapeMismatchError, match="bfloat16 but z has dtype torch.float32"):
        run_loop(lambda zz: zz.bfloat16(), z, solver=make_solver('picard'), options=LoopOptions(atol=0.001, rtol=0, max_iter=3, on_failure='ignore', return_trace=False, divergence_ratio=1000000.0))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ShapeMismatchError, match="float16"):
        # under bf16 autocast, a float16 output is not the autocast dtype
        run_loop(lambda zz: zz.half(), z, solver=make_solver('picard'), options=LoopOptions(atol=0.001, rtol=0, max_iter=3, on_failure='ignore', return_trace=False, divergence_ratio=1000000.0))
