"""What goes into and comes out of the loop: empty batches, structure checks, tolerance vs dtype, messages."""
import warnings

import numpy as np
import pytest
import torch

import iterlayers as il
from iterlayers.errors import IterlayersWarning, OptionTypeError, ValidationError
from iterlayers.solvers._loop import LoopOptions, ToleranceWarning, run_loop

LOOP = dict(atol=1e-6, rtol=0.0, max_iter=20, return_trace=False, divergence_ratio=1e6)


@pytest.mark.parametrize("stopping", ["verify", "per_sample", "joint"])
@pytest.mark.parametrize("z0", [torch.zeros(0, 3), torch.zeros(0, 2, 4, 4), (torch.zeros(0, 3), torch.zeros(0, 2, 2))],
                         ids=["vector", "image", "tuple"])
def test_empty_batch_returns_an_empty_converged_solution_without_calling_f(z0, stopping):
    calls = []

    def f(z, x):
        calls.append(1)
        return z

    sol = il.solve(f, z0, args=(torch.zeros(0, 5),), stopping=stopping, on_failure="raise", return_trace=True)
    assert calls == [] and sol.stats.nfe == 0 and sol.stats.status == "converged"
    parts, ref = (sol.z, z0) if isinstance(z0, tuple) else ((sol.z,), (z0,))
    assert [p.shape for p in parts] == [r.shape for r in ref]
    assert sol.stats.nstep.shape == sol.stats.abs_residual.shape == sol.stats.converged.shape == (0,)
    s = sol.stats.summary()
    assert s["converged_fraction"] == 1.0 and s["mean_nstep"] == 0.0 and s["max_abs_residual"] == 0.0
    assert "0 converged" in str(sol.stats) or "of 0" in str(sol.stats)


def test_structure_mistakes_of_f_are_named_before_any_iteration():
    z = torch.zeros(2, 4)
    with pytest.raises(OptionTypeError, match=r"f\(z\) returned None; expected a tensor of shape \(2, 4\)"):
        il.solve(lambda z: None, z)
    with pytest.raises(il.ShapeMismatchError, match=r"returned a list of 1.*expected a tensor"):
        il.solve(lambda z: [z], z)
    with pytest.raises(il.ShapeMismatchError, match=r"returned a tuple of 1.*expected a tuple of 2 tensors"):
        il.solve(lambda z: (z[0],), (z, z))
    with pytest.raises(OptionTypeError, match=r"f\(z\)\[1\] is a float"):
        il.solve(lambda z: (z[0], 1.0), (z, z))
    with pytest.raises(il.ShapeMismatchError, match="flattened"):
        il.solve(lambda z: z.reshape(2, -1), torch.zeros(2, 2, 3, 3))
    with pytest.raises(il.ShapeMismatchError, match=r"batch size 1 instead of 2"):
        il.solve(lambda z: z[:1], z)
    with pytest.raises(il.ShapeMismatchError, match=r"dtype torch.float64 but z has dtype torch.float32.*autocast"):
        il.solve(lambda z: z.double(), z)
    with pytest.raises(il.ShapeMismatchError, match=r"is on meta but z is on cpu"):
        il.solve(lambda z: torch.empty_like(z, device="meta"), z)


def test_a_sub_batch_output_with_the_wrong_rows_is_named_not_a_torch_error():
    """f that ignores its sub-batch (returns the captured whole batch) is caught with per_sample stopping."""
    x = torch.tensor([[0.1], [0.9]], dtype=torch.float64)
    full = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(il.ShapeMismatchError, match=r"batch size 2 instead of 1"):
        il.solve(lambda z, xx: full + 0 * z.sum() if z.shape[0] == 1 else xx * z, torch.ones(2, 1, dtype=torch.float64),
                 args=(x,), solver="picard", atol=1e-8, rtol=0, stopping="per_sample")


def test_bad_state_and_options_raise_typed_errors():
    with pytest.raises(OptionTypeError, match="z0 must be a torch.Tensor, got a ndarray"):
        il.solve(lambda z: z, np.zeros((2, 3)))
    with pytest.raises(OptionTypeError, match="integer or boolean state cannot be iterated"):
        il.solve(lambda z: z, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValidationError, match=r"stopping must be one of \['verify', 'per_sample', 'joint'\]"):
        il.solve(lambda z: z, torch.zeros(2, 3), stopping="auto")
    with pytest.raises(OptionTypeError, match="kwargs must be a dict"):
        il.solve(lambda z: z, torch.zeros(2, 3), kwargs=[1])
    with pytest.raises(OptionTypeError, match=r"args must be a tuple.*wrap one as \(x,\)"):
        il.solve(lambda z, x: z, torch.zeros(2, 3), args=torch.zeros(2, 3))
    with pytest.raises(ValidationError, match="arg_names must give one name"):
        run_loop(lambda z, x: z, torch.zeros(2, 3), solver=il.PicardSolver(), args=(torch.ones(2, 3),), arg_names=('x', 'y'), options=LoopOptions(**LOOP, on_failure='raise'))
    with pytest.raises(ValidationError, match="phase must be one of"):
        run_loop(lambda z: z, torch.zeros(2, 3), solver=il.PicardSolver(), phase='sideways', options=LoopOptions(**LOOP, on_failure='raise'))


def test_tolerance_below_the_dtype_warns_once_and_is_recorded():
    x = torch.randn(3, 8)
    f = lambda z, xx: 0.5 * z + xx  # noqa: E731
    atol = 1.2345e-9  # a tolerance no other test uses: the warning is once per process and (dtype, tolerance)
    with pytest.warns(ToleranceWarning, match=r"atol=1\.2345e-09, rtol=0 is below what torch\.float32 resolves.*"
                                               r"A tolerance torch\.float32 can reach: atol >= "):
        sol = il.solve(f, torch.zeros_like(x), args=(x,), atol=atol, rtol=0, max_iter=5, on_failure="ignore")
    m = float((0.5 * torch.zeros_like(x) + x).norm(dim=1).mean())
    assert sol.stats.info["tolerance_floor"] == pytest.approx(torch.finfo(torch.float32).eps * m, rel=1e-6)
    assert sol.stats.atol == atol  # the user's tolerance is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error", IterlayersWarning)
        again = il.solve(f, torch.zeros_like(x), args=(x,), atol=atol, rtol=0, max_iter=5, on_failure="ignore")
        assert "tolerance_floor" in again.stats.info  # recorded every time, warned once
        # float64 resolves it; and a float32 tolerance above eps * ||f|| is fine
        ok64 = il.solve(f, torch.zeros(3, 8, dtype=torch.float64), args=(x.double(),), atol=atol, rtol=0)
        ok32 = il.solve(f, torch.zeros_like(x), args=(x,), atol=1e-5, rtol=0)
    assert "tolerance_floor" not in ok64.stats.info and "tolerance_floor" not in ok32.stats.info
    with pytest.warns(ToleranceWarning, match="torch.bfloat16"):
        il.solve(f, torch.zeros(3, 8, dtype=torch.bfloat16), args=(x.bfloat16(),), atol=1.2345e-5, rtol=1.2345e-5,
                 max_iter=3, on_failure="ignore")


def test_failure_messages_name_the_phase_and_point_at_the_callers_line():
    x = torch.ones(2, 3)
    with pytest.raises(il.ConvergenceError, match=r"^backward solve \(picard\) did not converge"):
        run_loop(lambda z, xx: 0.99 * z + xx, torch.zeros(2, 3), solver=il.PicardSolver(), args=(x,), phase='backward', options=LoopOptions(**LOOP, on_failure='raise'))
    with pytest.warns(il.ConvergenceWarning, match=r"^forward solve \(picard\) did not converge") as rec:
        il.solve(lambda z, xx: 0.99 * z + xx, torch.zeros(2, 3), args=(x,), solver="picard", max_iter=3)
    assert rec[0].filename == __file__
