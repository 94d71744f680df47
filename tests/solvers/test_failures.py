"""Every failure mode has a clear, typed outcome."""
import warnings

import pytest
import torch

import iterlayers as il
from iterlayers.errors import OptionTypeError
from problems import LinearCell, ShiftCell, TanhCell, expanding_cell


def test_divergent_map_raises_with_details():
    cell = expanding_cell(5, 1.5)
    x = torch.ones(3, 5, dtype=torch.float64)
    with pytest.raises(il.ConvergenceError, match="diverged") as info:
        il.solve(cell, torch.zeros_like(x), args=(x,), solver="picard", max_iter=100, on_failure="raise")
    st = info.value.stats
    assert st.status == "diverged" and bool(st.diverged.all())
    assert "samples [0, 1, 2]" in str(info.value)


def test_divergence_returns_best_iterate_and_finite_values():
    cell = expanding_cell(5, 1.5)
    x = torch.ones(2, 5, dtype=torch.float64)
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver="picard", max_iter=100, on_failure="ignore")
    assert torch.isfinite(sol.z).all()
    # The best iterate of a diverging Picard run is its first one.
    torch.testing.assert_close(sol.stats.abs_residual, x.norm(dim=1))
    assert bool(sol.stats.best.all())


def test_nan_produced_by_map_is_reported_as_divergence():
    def f(z):
        return torch.where(z > 2, torch.full_like(z, float("nan")), z + 1)

    sol = il.solve(f, torch.zeros(2, 3), solver="picard", max_iter=10, on_failure="ignore")
    assert sol.stats.status == "diverged"
    assert torch.isfinite(sol.z).all()


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
@pytest.mark.parametrize("rtol", [0.0, 1e-5])
def test_infinite_map_is_never_converged_under_a_relative_tolerance(solver, rtol):
    # ||f(z) - z|| = inf and ||f(z)|| = inf: atol + rtol * inf = inf would let inf <= inf pass as converged.
    def f(z):
        return torch.where(z.abs() > 0.5, z * float("inf"), z + 1.0)

    sol = il.solve(f, torch.zeros(2, 3, dtype=torch.float64), solver=solver, rtol=rtol, max_iter=5,
                   on_failure="ignore")
    assert sol.stats.status == "diverged" and not bool(sol.stats.converged.any())
    assert bool(sol.stats.diverged.all())
    with pytest.raises(il.ConvergenceError, match="diverged"):
        il.solve(f, torch.zeros(2, 3, dtype=torch.float64), solver=solver, rtol=rtol, max_iter=5, on_failure="raise")
    # From an infinite start too (the initial residual decides before any step).
    sol = il.solve(lambda z: z * float("inf") + 1.0, torch.ones(2, 3), solver=solver, rtol=rtol, on_failure="ignore")
    assert sol.stats.status == "diverged" and not bool(sol.stats.converged.any())


def test_max_iter_warns_by_default_and_reports_status():
    cell = TanhCell(6, norm=0.99, seed=1)
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver="picard", atol=1e-14, rtol=0, max_iter=3)
    assert sol.stats.status == "max_iter"
    assert sol.stats.nstep.tolist() == [3, 3]


def test_ignore_is_silent():
    x = torch.ones(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = il.solve(ShiftCell(), torch.zeros_like(x), args=(x,), max_iter=5, on_failure="ignore")
    assert sol.stats.status in ("max_iter", "diverged")


def test_no_fixed_point_with_singular_anderson_system_falls_back():
    """f(z) = z + c repeats the same residual: the mixing system is singular with lam = 0."""
    x = torch.ones(2, 4, dtype=torch.float64)
    sol = il.solve(ShiftCell(), torch.zeros_like(x), args=(x,), solver="anderson", lam=0.0, max_iter=20,
                   on_failure="ignore")
    assert sol.stats.info["anderson_fallbacks"] > 0
    assert sol.stats.status != "converged"
    assert torch.isfinite(sol.z).all()


def test_nan_input_rejected_before_iterating():
    calls = []

    def f(z, x):
        calls.append(1)
        return z

    x = torch.ones(3, 2)
    x[1, 0] = float("nan")
    with pytest.raises(il.NonFiniteInputError, match=r"args\[0\].*samples \[1\]"):
        il.solve(f, torch.zeros(3, 2), args=(x,), on_failure="raise")
    z0 = torch.zeros(3, 2)
    z0[2, 1] = float("inf")
    with pytest.raises(il.NonFiniteInputError, match="z0"):
        il.solve(lambda z: z, z0, on_failure="raise")
    assert calls == []


@pytest.mark.parametrize("on_failure", ["warn", "ignore"])
@pytest.mark.parametrize("stopping", ["verify", "per_sample", "joint"])
def test_nan_input_sample_is_excluded_and_the_others_solved(on_failure, stopping):
    """One NaN/Inf sample in x or z0: diverged from the start (residual inf, never evaluated); others solved."""
    seen = []

    def f(z, x):
        seen.append(x.clone())
        return 0.5 * z + x

    x = torch.ones(4, 2, dtype=torch.float64)
    x[1, 0] = float("nan")
    z0 = torch.zeros(4, 2, dtype=torch.float64)
    z0[3, 1] = float("inf")
    ctx = pytest.warns(il.ConvergenceWarning, match=r"diverged.*NaN/Inf.*z0 \(samples \[3\]\); args\[0\] \(samples \[1\]\)") \
        if on_failure == "warn" else warnings.catch_warnings()
    with ctx:
        if on_failure == "ignore":
            warnings.simplefilter("error")
        sol = il.solve(f, z0, args=(x,), solver="picard", atol=1e-12, rtol=0, on_failure=on_failure,
                       stopping=stopping)
    st = sol.stats
    assert st.status == "diverged"
    assert st.diverged.tolist() == [False, True, False, True]
    assert st.converged.tolist() == [True, False, True, False]
    assert st.abs_residual[[1, 3]].tolist() == [float("inf")] * 2
    assert st.nstep[[1, 3]].tolist() == [0, 0] and bool((st.nstep[[0, 2]] > 0).all())
    torch.testing.assert_close(sol.z[[0, 2]], torch.full((2, 2), 2.0, dtype=torch.float64), atol=1e-11, rtol=0)
    # the excluded samples were never evaluated: every call saw the two finite rows only
    assert all(s.shape[0] == 2 and bool(torch.isfinite(s).all()) for s in seen)
    assert "args[0] (samples [1])" in st.info["nonfinite_input"]


def test_nan_in_every_sample_or_in_a_non_batched_input_calls_nothing():
    calls = []

    def f(z, x, adj=None):
        calls.append(1)
        return z

    x = torch.full((3, 2), float("nan"))
    sol = il.solve(f, torch.zeros(3, 2), args=(x,), on_failure="ignore")
    assert sol.stats.status == "diverged" and bool(sol.stats.diverged.all()) and sol.stats.nfe == 0
    adj = torch.eye(3)
    adj[0, 1] = float("inf")  # never sliced: concerns every sample
    with pytest.raises(il.NonFiniteInputError, match=r"kwargs\['adj'\]"):
        il.solve(f, torch.zeros(3, 2), args=(torch.ones(3, 2),), kwargs={"adj": adj}, on_failure="raise")
    sol = il.solve(f, torch.zeros(3, 2), args=(torch.ones(3, 2),), kwargs={"adj": adj}, on_failure="ignore")
    assert bool(sol.stats.diverged.all()) and sol.stats.abs_residual.isinf().all()
    assert calls == []


def test_nonfinite_input_named_by_arg_names():
    from iterlayers.solvers._loop import LoopOptions, run_loop

    x = torch.ones(2, 3)
    x[0, 0] = float("nan")
    with pytest.raises(il.NonFiniteInputError, match=r"^x contains NaN or Inf: x \(samples \[0\]\)"):
        run_loop(lambda z, x: z, torch.zeros(2, 3), solver=il.PicardSolver(), args=(x,), arg_names=('x',), options=LoopOptions(atol=1e-05, rtol=0, max_iter=5, on_failure='raise', return_trace=False, divergence_ratio=1000000.0))


def test_large_finite_inputs_are_not_mistaken_for_inf():
    # The finiteness check screens with one sum, which overflows here; the element-wise test must decide.
    x = torch.full((3, 4), 3e38)
    sol = il.solve(lambda z, xx: 0.5 * z + 1e-38 * xx, torch.full((3, 4), 3e38), args=(x,), atol=1e-30,
                   rtol=1e-6, on_failure="ignore", solver="picard")
    assert torch.isfinite(sol.z).all()
    z0 = torch.zeros(3, 4)
    z0[0, 0], z0[0, 1] = float("inf"), -float("inf")  # sums to NaN: still caught, sample named
    with pytest.raises(il.NonFiniteInputError, match=r"samples \[0\]"):
        il.solve(lambda z: z, z0, on_failure="raise")


def test_shape_and_dtype_mismatch():
    with pytest.raises(il.ShapeMismatchError, match=r"shape \(2, 3\).*shape \(2, 4\)"):
        il.solve(lambda z: z[:, :3], torch.zeros(2, 4))
    with pytest.raises(il.ShapeMismatchError, match="dtype"):
        il.solve(lambda z: z.double(), torch.zeros(2, 4))
    with pytest.raises(OptionTypeError, match="floating-point"):
        il.solve(lambda z: z, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(il.ShapeMismatchError, match="batch"):
        il.solve(lambda z: z, torch.zeros((), dtype=torch.float32))
    with pytest.raises(il.ShapeMismatchError, match="batch size"):
        il.solve(lambda z: z, (torch.zeros(2, 4), torch.zeros(3, 4)))


def test_unknown_options_and_bad_values():
    z = torch.zeros(1, 2)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['mm'\].*valid options: \['m', 'lam', 'damping'\]"):
        il.solve(lambda z: z, z, solver="anderson", mm=3)
    with pytest.raises(ValueError, match="unknown solver 'newton'; valid"):
        il.solve(lambda z: z, z, solver="newton")
    with pytest.raises(ValueError, match="on_failure must be one of"):
        il.solve(lambda z: z, z, on_failure="explode")
    with pytest.raises(ValueError, match="damping must be in"):
        il.solve(lambda z: z, z, solver="picard", damping=1.5)
    with pytest.raises(ValueError, match="atol and rtol are both 0"):
        il.solve(lambda z: z, z, atol=0, rtol=0)
    with pytest.raises(ValueError, match="backward must be one of"):
        il.DEQ(lambda z, x: z, backward="magic")
    with pytest.raises(TypeError, match="unknown option"):
        il.DEQ(lambda z, x: z, solver_options={"history": 5})
