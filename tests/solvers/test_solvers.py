"""Solvers against exact answers, SciPy, and per-sample tolerances."""
import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import iterlayers as il
from problems import LinearCell, TanhCell, random_matrix

SOLVERS = ["picard", "anderson", "broyden"]


@pytest.mark.parametrize("solver", SOLVERS + ["gmres"])
def test_linear_fixed_point_matches_closed_form(solver):
    cell = LinearCell(random_matrix(12, 0.7, seed=1))
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver=solver, atol=1e-11, rtol=0, max_iter=300)
    assert sol.stats.status == "converged"
    torch.testing.assert_close(sol.z, cell.exact(x), atol=1e-9, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_nonlinear_fixed_point_matches_scipy(solver):
    cell = TanhCell(8, norm=0.9, seed=3)
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver=solver, atol=1e-12, rtol=0, max_iter=400)
    for i in range(4):
        xi = x[i : i + 1]

        def g(z):
            with torch.no_grad():
                return cell(torch.from_numpy(z)[None], xi)[0].numpy()

        ref = scipy.optimize.fixed_point(g, np.zeros(8), xtol=1e-13, maxiter=2000)
        np.testing.assert_allclose(sol.z[i].numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("atol,rtol", [(1e-3, 0.0), (1e-8, 0.0), (0.0, 1e-6)])
def test_each_sample_meets_its_tolerance(solver, atol, rtol):
    cell = TanhCell(10, norm=0.95, seed=5)
    x = 3 * torch.randn(16, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver=solver, atol=atol, rtol=rtol, max_iter=500)
    with torch.no_grad():
        fz = cell(sol.z, x)
    true_res = (fz - sol.z).norm(dim=1)
    assert bool(sol.stats.converged.all())
    assert bool((true_res <= atol + rtol * fz.norm(dim=1) + 1e-14).all())
    torch.testing.assert_close(sol.stats.abs_residual, true_res)


def test_per_sample_stopping_skips_converged_samples():
    """Samples that converge early stop counting steps, and f is no longer evaluated on them."""
    batch_sizes = []

    class Counting(torch.nn.Module):
        def forward(self, z, x):
            batch_sizes.append(z.shape[0])
            return x * z  # contraction factor |x_i| per sample

    x = torch.tensor([[0.01], [0.5], [0.9]], dtype=torch.float64)
    # stopping="per_sample": this test counts per-sample evaluations (the default "verify" adds one whole-batch
    # evaluation, counted in tests/solvers/test_loop_stopping.py).
    sol = il.solve(Counting(), torch.ones(3, 1, dtype=torch.float64), args=(x,), solver="picard", atol=1e-8, rtol=0,
                   max_iter=500, stopping="per_sample")
    n = sol.stats.nstep.tolist()
    assert n[0] < n[1] < n[2]
    # Exact step counts of z_k = x^k: first k with |x|^(k+1) * |1 - x| ... recomputed here directly.
    for i, xi in enumerate(x.flatten().tolist()):
        k = 0
        z = 1.0
        while abs(xi * z - z) > 1e-8:
            z = xi * z
            k += 1
        assert n[i] == k
    assert sum(batch_sizes) == 1 * 3 + sum(n)  # initial evaluation + one per active sample per step
    assert sol.stats.nfe == len(batch_sizes)


def test_closure_without_args_still_freezes_converged_samples():
    x = torch.tensor([[0.01], [0.9]], dtype=torch.float64)
    sol = il.solve(lambda z: x * z, torch.ones(2, 1, dtype=torch.float64), solver="anderson", atol=1e-10, rtol=0)
    assert sol.stats.nstep[0] < sol.stats.nstep[1]
    assert bool(sol.stats.converged.all())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    batch=st.integers(1, 6),
    q=st.floats(0.05, 0.9),
    seed=st.integers(0, 10_000),
    solver=st.sampled_from(SOLVERS),
)
def test_random_contractive_maps_converge(n, batch, q, seed, solver):
    cell = TanhCell(n, norm=q, seed=seed)
    x = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver=solver, atol=1e-9, rtol=0, max_iter=500,
                   on_failure="raise")
    with torch.no_grad():
        assert bool(((cell(sol.z, x) - sol.z).norm(dim=1) <= 1e-9 + 1e-15).all())


def test_tuple_state():
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def f(z):
        a, b = z
        return (0.5 * a + c, 0.25 * b + a[:, :2, None])

    z0 = (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 2, 2, dtype=torch.float64))
    sol = il.solve(f, z0, atol=1e-12, rtol=0)
    a, b = sol.z
    torch.testing.assert_close(a, (2 * c).expand(2, 3))
    torch.testing.assert_close(b, (a[:, :2, None] / 0.75).expand(2, 2, 2))
    assert isinstance(sol.z, tuple) and b.shape == (2, 2, 2)


def test_float32_and_conv_state():
    from problems import ConvCell

    cell = ConvCell(3, dtype=torch.float32)
    x = torch.randn(4, 3, 6, 6)
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), atol=1e-5, rtol=0)
    assert sol.z.dtype == torch.float32 and sol.z.shape == x.shape
    with torch.no_grad():
        assert float((cell(sol.z, x) - sol.z).flatten(1).norm(dim=1).max()) <= 1e-5


def test_trace_is_recorded_and_matches_linear_rate():
    A = 0.5 * torch.eye(4, dtype=torch.float64)
    cell = LinearCell(A)
    x = torch.ones(2, 4, dtype=torch.float64)
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver="picard", atol=1e-10, rtol=0, return_trace=True)
    tr = sol.stats.trace_tensor()
    assert tr.shape == (int(sol.stats.nstep.max()) + 1, 2)
    torch.testing.assert_close(tr[1:] / tr[:-1], torch.full_like(tr[1:], 0.5))


def test_broyden_memory_does_not_grow_with_max_iter():
    solver = il.BroydenSolver(memory=4)
    z = torch.zeros(3, 7)
    state = solver.init(z, z)
    assert state["U"].shape == (3, 4, 7)
    cell = LinearCell(random_matrix(7, 0.95, seed=7))
    x = torch.randn(3, 7, dtype=torch.float64)
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver="broyden", memory=4, atol=1e-10, rtol=0,
                   max_iter=500)
    assert sol.stats.status == "converged"
    assert sol.stats.info["broyden_restarts"] >= 1


def test_gmres_solves_linear_systems_in_at_most_n_steps():
    cell = LinearCell(random_matrix(10, 3.0, seed=8))  # not a contraction: Picard would diverge
    x = torch.randn(2, 10, dtype=torch.float64)
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver="gmres", restart=10, atol=1e-9, rtol=0)
    assert sol.stats.status == "converged"
    assert int(sol.stats.nstep.max()) <= 10
    torch.testing.assert_close(sol.z, cell.exact(x), atol=1e-8, rtol=0)


def test_anderson_beats_picard_on_slow_linear_map():
    g = torch.Generator().manual_seed(9)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-0.5, 0.97, 40, dtype=torch.float64)) @ Q.T
    cell = LinearCell(A)
    x = torch.randn(4, 40, generator=g, dtype=torch.float64)
    kw = dict(args=(x,), atol=1e-8, rtol=0, max_iter=2000)
    picard = il.solve(cell, torch.zeros_like(x), solver="picard", **kw).stats
    anderson = il.solve(cell, torch.zeros_like(x), solver="anderson", m=10, **kw).stats
    assert picard.status == anderson.status == "converged"
    assert anderson.nfe < picard.nfe / 3
