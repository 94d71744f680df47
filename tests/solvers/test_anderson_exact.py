"""Anderson acceleration against exact references, and the loop's stopping rule with exact step counts.

The first half pins the generic loop (stopping rule, tolerance boundaries, best iterate, step counts,
divergence) through the public ``solve()`` API on maps whose iterates are known in closed form; the maps are
chosen so that every iterate and residual is a dyadic number, exact in floating point, and ties with the
tolerance are real ties. The second half compares Anderson's iterates with a dense float64 NumPy
implementation of the documented update (constrained least squares with a ridge scaled by the smallest
residual, damping, ring-buffer history) and checks its safeguard and its finite termination on linear maps.
"""
import numpy as np
import pytest
import torch

import iterlayers as il

F64 = torch.float64


def scale_cell(z, a):
    """f(z) = a z, per sample."""
    return a * z


def affine_cell(z, a, c):
    """f(z) = a z + c, per sample."""
    return a * z + c


def col(*v):
    return torch.tensor(v, dtype=F64).unsqueeze(1)


# --- the loop's stopping rule ----------------------------------------------------------------------------

STOPPERS = [("picard", {}), ("anderson", {"m": 1})]  # Anderson with one history entry is Picard


@pytest.mark.parametrize("solver,opts", STOPPERS)
def test_absolute_tolerance_boundary_is_inclusive(solver, opts):
    # f(z) = z/2 from z0 = 2^j: r_k = |f(z_k) - z_k| = 2^(j-k-1) exactly; atol = 2^-10 is met with equality
    # at k = j + 9, so `<=` stops there and `<` one step later.
    z0 = col(1.0, 2.0, 4.0)
    sol = il.solve(scale_cell, z0, args=(col(0.5, 0.5, 0.5),), solver=solver, atol=2.0**-10, rtol=0,
                   max_iter=50, on_failure="raise", **opts)
    assert sol.stats.nstep.tolist() == [9, 10, 11]
    torch.testing.assert_close(sol.z, z0 * 2.0 ** -sol.stats.nstep.to(F64).unsqueeze(1), rtol=0, atol=0)
    assert sol.stats.abs_residual.tolist() == [2.0**-10] * 3
    # 1 + 11 evaluations of the iteration, plus the one whole-batch evaluation of the default stopping="verify"
    assert sol.stats.nfe == 1 + 11 + 1 and sol.stats.info["stopping"] == "per_sample (verified)"
    plain = il.solve(scale_cell, z0, args=(col(0.5, 0.5, 0.5),), solver=solver, atol=2.0**-10, rtol=0,
                     max_iter=50, on_failure="raise", stopping="per_sample", **opts)
    assert plain.stats.nfe == 1 + 11 and plain.stats.nstep.tolist() == [9, 10, 11]


@pytest.mark.parametrize("solver,opts", STOPPERS)
def test_mixed_tolerance_uses_the_norm_of_f_and_is_inclusive(solver, opts):
    # Same map: ||f(z_k)|| = 2^(j-k-1) and ||z_k|| = 2^(j-k). With atol = 2^-12 and rtol = 1/2 the rule
    # r <= atol + rtol ||f(z)|| reads 2^(j-k-2) <= 2^-12: equality at k = j + 10. Ignoring rtol stops at
    # k = j + 11; using ||z|| instead of ||f(z)|| stops at k = 0; `<` stops at k = j + 11.
    z0 = col(1.0, 2.0, 4.0)
    sol = il.solve(scale_cell, z0, args=(col(0.5, 0.5, 0.5),), solver=solver, atol=2.0**-12, rtol=0.5,
                   max_iter=50, on_failure="raise", **opts)
    assert sol.stats.nstep.tolist() == [10, 11, 12]
    assert bool(sol.stats.converged.all())


def reference_steps(a, c, z0, atol, rtol, max_iter, beta=1.0):
    """Damped Picard on the scalar map a z + c with the documented rule, in Python floats."""
    z, k = z0, 0
    while True:
        fz = a * z + c
        if abs(fz - z) <= atol + rtol * abs(fz) or k == max_iter:
            return k, z
        z = z + beta * (fz - z)
        k += 1


@pytest.mark.parametrize("solver,opts", STOPPERS + [("anderson", {"m": 1, "damping": 0.5})])
def test_relative_tolerance_alone_stops_at_the_exact_step(solver, opts):
    a, c = col(0.5, 0.75, 0.875), col(1.0, -3.0, 0.25)
    rtol = 2.0**-20
    sol = il.solve(affine_cell, torch.zeros(3, 1, dtype=F64), args=(a, c), solver=solver, atol=0.0, rtol=rtol,
                   max_iter=400, on_failure="raise", **opts)
    beta = opts.get("damping", 1.0)
    ref = [reference_steps(float(ai), float(ci), 0.0, 0.0, rtol, 400, beta) for ai, ci in zip(a, c)]
    assert sol.stats.nstep.tolist() == [k for k, _ in ref]
    assert max(k for k, _ in ref) < 400 and len({k for k, _ in ref}) == 3
    torch.testing.assert_close(sol.z.flatten(), torch.tensor([z for _, z in ref], dtype=F64), rtol=1e-15, atol=0)
    fz = a * sol.z + c
    torch.testing.assert_close(sol.stats.rel_residual, ((fz - sol.z).abs() / fz.abs()).flatten())


def test_max_iter_is_the_number_of_steps_taken():
    sol = il.solve(scale_cell, col(1.0, 1.0), args=(col(0.5, 0.5),), solver="picard", atol=1e-300, rtol=0,
                   max_iter=7, on_failure="ignore")
    assert sol.stats.nstep.tolist() == [7, 7]
    assert sol.stats.nfe == 8 and sol.stats.status == "max_iter"
    assert sol.z.flatten().tolist() == [2.0**-7] * 2
    assert not bool(sol.stats.best.any())  # the last iterate is the best one: not flagged


@pytest.mark.parametrize("solver,opts", STOPPERS)
def test_closure_maps_are_frozen_per_sample_with_exact_counts(solver, opts):
    a = col(0.5, 0.5)
    z0 = col(1.0, 8.0)
    sol = il.solve(lambda z: a * z, z0, solver=solver, atol=2.0**-10, rtol=0, max_iter=50, **opts)
    assert sol.stats.nstep.tolist() == [9, 12]
    assert sol.z.flatten().tolist() == [2.0**-9, 2.0**-9]


def non_monotone(solver, opts, max_iter=12):
    """Picard on f(z) = diag(1/2, 3/2) z: from e = (1, 2^-10) the residual (A - I) A^k e falls, then grows
    (the expanding direction takes over), so the best iterate is an inner one. Sample 1 starts at
    (1, 0) and converges; sample 0 never does."""
    A = torch.diag(torch.tensor([0.5, 1.5], dtype=F64))
    z0 = torch.tensor([[1.0, 2.0**-10], [1.0, 0.0]], dtype=F64)
    sol = il.solve(lambda z: z @ A.T, z0, solver=solver, atol=2.0**-9, rtol=0, max_iter=max_iter,
                   on_failure="ignore", return_trace=True, **opts)
    iterates = [z0[0] * torch.diag(A) ** k for k in range(max_iter + 1)]
    res = [float((it @ A.T - it).norm()) for it in iterates]
    return sol, A, iterates, res


@pytest.mark.parametrize("solver,opts", STOPPERS)
def test_a_non_converging_sample_returns_its_best_iterate_and_says_so(solver, opts):
    sol, A, iterates, res = non_monotone(solver, opts)
    k_best = int(np.argmin(res))
    assert 0 < k_best < len(res) - 1  # the problem is non-monotone, as designed
    torch.testing.assert_close(sol.z[0], iterates[k_best], rtol=0, atol=0)
    # the returned iterate's true residual is the reported one
    true_res = (sol.z @ A.T - sol.z).norm(dim=1)
    torch.testing.assert_close(sol.stats.abs_residual, true_res, rtol=1e-15, atol=0)
    assert sol.stats.best.tolist() == [True, False]
    assert sol.stats.nstep.tolist() == [12, 8]
    assert sol.stats.converged.tolist() == [False, True]
    assert sol.stats.status == "max_iter"
    # the trace records every iterate's residual (the last one, not the best so far)
    tr = sol.stats.trace_tensor()
    torch.testing.assert_close(tr[:, 0], torch.tensor(res, dtype=F64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_a_converged_solve_never_flags_best(solver):
    cell = lambda z, x: torch.tanh(0.5 * z + x)  # noqa: E731
    x = torch.linspace(-2, 2, 6, dtype=F64).reshape(3, 2)
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver=solver, atol=1e-10, rtol=0, on_failure="raise")
    assert not bool(sol.stats.best.any())


def test_a_nan_mid_solve_marks_that_sample_diverged_and_frees_the_others():
    def cell(z, a):
        out = a * z + 1.0
        return torch.where(z > 3.5, torch.full_like(z, float("nan")), out)

    a = col(1.0, 0.5)  # sample 0: z_k = k until NaN at z = 4; sample 1 converges to 2
    sol = il.solve(cell, torch.zeros(2, 1, dtype=F64), args=(a,), solver="picard", atol=1e-9, rtol=0,
                   max_iter=100, on_failure="ignore")
    assert sol.stats.status == "diverged"
    assert sol.stats.diverged.tolist() == [True, False]
    assert sol.stats.converged.tolist() == [False, True]
    assert sol.stats.nstep[0] == 4  # frozen at the first non-finite residual
    # every finite residual of sample 0 is 1: its best iterate is the first one, and it is flagged as such
    assert sol.z[0].item() == 0.0 and sol.stats.best.tolist() == [True, False]


def test_a_sample_whose_first_image_is_not_finite_is_diverged_before_any_step():
    def cell(z, a):
        return 0.5 * z + torch.log(a)  # a = -1: f(z0) = NaN although z0 and a are finite

    a = col(-1.0, 1.0)
    sol = il.solve(cell, torch.ones(2, 1, dtype=F64), args=(a,), solver="picard", atol=2.0**-10, rtol=0,
                   max_iter=100, on_failure="ignore")
    assert sol.stats.nstep.tolist() == [0, 9]
    assert sol.stats.diverged.tolist() == [True, False] and sol.stats.status == "diverged"
    assert sol.z[0].item() == 1.0 and sol.z[1].item() == 2.0**-9


@pytest.mark.parametrize("max_iter", [0, 5])
def test_the_solution_never_shares_memory_with_z0(max_iter):
    # z0 is already the fixed point (or no iteration is allowed): the returned tensor is still a new one, so
    # writing into it (or into z0) cannot change the other
    z0 = torch.zeros(3, 2, dtype=F64)
    sol = il.solve(lambda z, a: a * z, z0, args=(torch.full((3, 2), 0.5, dtype=F64),), solver="picard", atol=1e-9,
                   rtol=0, max_iter=max_iter, on_failure="raise")
    assert sol.stats.nstep.tolist() == [0, 0, 0]
    sol.z.add_(1.0)
    assert bool((z0 == 0).all())


def test_an_infinite_map_never_passes_a_relative_tolerance():
    def cell(z, a):
        return 0.5 * z + 1.0 / a  # a = 0: f(z) = inf, r = inf, and inf <= atol + rtol * inf would pass

    a = col(0.0, 1.0)
    sol = il.solve(cell, torch.zeros(2, 1, dtype=F64), args=(a,), solver="picard", atol=1e-9, rtol=1e-3,
                   max_iter=100, on_failure="ignore")
    assert sol.stats.converged.tolist() == [False, True]
    assert sol.stats.status == "diverged"
    assert sol.stats.diverged.tolist() == [True, False]


# --- Anderson against a dense reference ------------------------------------------------------------------

def reference_anderson(f, z0, *, m, lam, damping, steps):
    """Anderson type II in NumPy float64, from the documented update: with residuals g_i = f(z_i) - z_i and
    damped images y_i = z_i + beta g_i of the last min(k, m) iterates,

        alpha = argmin_{sum alpha = 1} ||sum alpha_i g_i||^2 + lam s ||alpha||^2,  s = min_i ||g_i||^2,

    z_next = sum alpha_i y_i; the first step is a damped Picard step. The constrained problem is solved as an
    unconstrained least-squares one (numpy lstsq) by eliminating the constraint: alpha = e_n + D b with
    D = [I; -1^T], over the stacked matrix [G^T; sqrt(lam s) I]. Returns the iterates z_0..z_steps."""
    zs, G, Y = [np.asarray(z0, dtype=np.float64)], [], []
    for _ in range(steps):
        z = zs[-1]
        g = f(z) - z
        G.append(g)
        Y.append(z + damping * g)
        G, Y = G[-m:], Y[-m:]
        n = len(G)
        if n == 1:
            zs.append(Y[-1])
            continue
        s = min(float(gi @ gi) for gi in G)
        M = np.vstack([np.stack(G).T, np.sqrt(lam * s) * np.eye(n)])
        D = np.vstack([np.eye(n - 1), -np.ones((1, n - 1))])
        e = np.zeros(n)
        e[-1] = 1.0
        b = np.linalg.lstsq(M @ D, -M @ e, rcond=None)[0]
        alpha = e + D @ b
        zs.append(alpha @ np.stack(Y))
    return zs


def tanh_problem(n=6, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=F64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)
    # very different input scales: samples converge at different iterations (active-subset steps)
    x = torch.randn(batch, n, generator=g, dtype=F64) * torch.tensor([1e-7, 1.0, 3.0], dtype=F64)[:batch, None]
    return W, x


@pytest.mark.parametrize("m,lam,damping", [(3, 1e-2, 0.5), (2, 0.0, 1.0), (8, 1e-4, 0.7), (4, 0.3, 1.0)])
def test_anderson_iterates_match_the_dense_least_squares_reference(m, lam, damping):
    W, x = tanh_problem()
    atol, max_iter = 1e-9, 25
    sol = il.solve(lambda z, xx: torch.tanh(z @ W.T + xx), torch.zeros_like(x), args=(x,), solver="anderson",
                   m=m, lam=lam, damping=damping, atol=atol, rtol=0, max_iter=max_iter, return_trace=True,
                   on_failure="ignore")
    tr = sol.stats.trace_tensor()
    Wn = W.numpy()
    steps = []
    for i in range(x.shape[0]):
        xi = x[i].numpy()
        f = lambda z: np.tanh(Wn @ z + xi)  # noqa: E731
        zs = reference_anderson(f, np.zeros(x.shape[1]), m=m, lam=lam, damping=damping, steps=max_iter)
        res = np.array([np.linalg.norm(f(z) - z) for z in zs])
        k = next((j for j, r in enumerate(res) if r <= atol), max_iter)
        steps.append(k)
        scale = res[0]
        np.testing.assert_allclose(tr[: k + 1, i].numpy(), res[: k + 1], rtol=1e-6, atol=1e-12 * scale)
        if k < max_iter:
            np.testing.assert_allclose(sol.z[i].numpy(), zs[k], rtol=0, atol=1e-12 * (1 + np.abs(zs[k]).max()))
    assert sol.stats.nstep.tolist() == steps
    assert len(set(steps)) > 1  # some steps ran on an active subset of the batch


def test_anderson_with_one_entry_is_damped_picard_exactly():
    # f(z) = z/2: a damped Picard step multiplies z by 1 - beta + beta/2 = 3/4 for beta = 1/2
    sol = il.solve(scale_cell, col(1.0), args=(col(0.5),), solver="anderson", m=1, damping=0.5,
                   atol=1e-300, rtol=0, max_iter=5, on_failure="ignore", return_trace=True)
    assert sol.z.item() == 0.75**5
    assert sol.stats.trace_tensor().flatten().tolist() == [0.5 * 0.75**k for k in range(6)]


@pytest.mark.parametrize("n", [3, 5, 8])
def test_anderson_with_full_memory_solves_a_linear_problem_in_n_plus_one_steps(n):
    # For f(z) = A z + c, undamped Anderson with unlimited memory and no ridge is GMRES in disguise (Walker &
    # Ni 2011): z_{k+1} = f(w_k) where w_k is the k-th GMRES iterate of (I - A) z = c from z_0. GMRES is exact
    # after at most n steps, so z_{n+1} is the fixed point (up to round-off).
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=F64)
    A = 0.9 * A / torch.linalg.matrix_norm(A, 2)
    c = torch.randn(2, n, generator=g, dtype=F64)
    sol = il.solve(lambda z, cc: z @ A.T + cc, torch.zeros_like(c), args=(c,), solver="anderson", m=n + 1,
                   lam=0.0, atol=1e-10, rtol=0, max_iter=n + 1, on_failure="raise", return_trace=True)
    assert int(sol.stats.nstep.max()) <= n + 1
    exact = torch.linalg.solve(torch.eye(n, dtype=F64) - A, c.T).T
    torch.testing.assert_close(sol.z, exact, rtol=0, atol=1e-9)
    # and not before: Picard with the same number of steps is far away (the test is not trivially met)
    far = il.solve(lambda z, cc: z @ A.T + cc, torch.zeros_like(c), args=(c,), solver="picard", atol=1e-10,
                   rtol=0, max_iter=n + 1, on_failure="ignore")
    assert float(far.stats.abs_residual.min()) > 1e-4


def clamp_cell(z, top):
    """f(z) = min(z + 1, top): every residual is 1 until z >= top - 1."""
    return torch.minimum(z + 1.0, top)


@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_anderson_safeguard_takes_a_damped_picard_step(damping):
    # Scalar states: any two residual rows are parallel, so the mixing system with lam = 0 is exactly singular
    # at every step after the first (all numbers here are dyadic, so the singularity is exact). Each step is
    # then the safeguard's damped Picard step, and the solve is damped Picard exactly.
    top = col(5.0, 3.0)
    atol = 2.0**-10
    sol = il.solve(clamp_cell, torch.zeros(2, 1, dtype=F64), args=(top,), solver="anderson", m=4, lam=0.0,
                   damping=damping, atol=atol, rtol=0, max_iter=100, on_failure="raise")
    steps, zs = [], []
    for t in (5.0, 3.0):
        z, k = 0.0, 0
        while abs(min(z + 1.0, t) - z) > atol:
            z, k = z + damping * (min(z + 1.0, t) - z), k + 1
        steps.append(k)
        zs.append(z)
    assert sol.stats.nstep.tolist() == steps
    assert sol.z.flatten().tolist() == zs
    # every step but each sample's first fell back
    assert sol.stats.info["anderson_fallbacks"] == sum(steps) - 2


@pytest.mark.parametrize("solver,opts", [("picard", {}), ("anderson", {"m": 3}), ("broyden", {"line_search": True}),
                                         ("gmres", {})])
def test_nfe_counts_every_evaluation_of_f(solver, opts):
    calls = []

    def cell(z, x):
        calls.append(z.shape[0])
        return torch.tanh(0.6 * z.flip(1) + x)

    x = torch.linspace(-3, 3, 12, dtype=F64).reshape(4, 3) * torch.tensor([[1e-6], [1.0], [2.0], [3.0]], dtype=F64)
    sol = il.solve(cell, torch.zeros_like(x), args=(x,), solver=solver, atol=1e-9, rtol=0, max_iter=60,
                   on_failure="ignore", **opts)
    assert sol.stats.nfe == len(calls) > 3
    with torch.no_grad():
        true_res = (cell(sol.z, x) - sol.z).norm(dim=1)
    torch.testing.assert_close(sol.stats.abs_residual, true_res, rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("mode", ["per_sample", "joint", "device", "excluded"])
def test_anderson_never_reads_history_slots_it_has_not_written(monkeypatch, mode):
    # Anderson's histories are allocated uninitialised: filled with NaN instead of zeros, every result must be
    # bitwise the same (a read of an unwritten slot would turn a row into NaN or change its iterate).
    torch.manual_seed(3)
    A = 0.15 * torch.randn(6, 10, 10, dtype=torch.float64)
    c = torch.randn(6, 10, dtype=torch.float64) * torch.logspace(-3, 1, 6, dtype=torch.float64).unsqueeze(1)
    # (samples converge at different steps)
    if mode == "excluded":
        c[2, 0] = float("nan")

    def f(z, aa, cc):
        return torch.tanh(torch.einsum("bij,bj->bi", aa, z) + cc)

    kw = dict(solver="anderson", m=4, atol=1e-9, rtol=0.0, max_iter=60, on_failure="ignore", args=(A, c),
              stopping="joint" if mode == "joint" else "per_sample")
    runs = {}
    for fill in (0.0, float("nan")):
        orig = torch.Tensor.new_empty

        def new_empty(self, *size, _fill=fill, **k):
            return orig(self, *size, **k).fill_(_fill)

        monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
        if mode == "device":
            from iterlayers.solvers import LoopOptions, make_solver, run_loop

            z, st = run_loop(f, torch.zeros_like(c), solver=make_solver("anderson", {"m": 4}), args=(A, c),
                             stopping="per_sample",
                             options=LoopOptions(atol=1e-9, rtol=0.0, max_iter=60, on_failure="ignore",
                                                 check_every=3))
        else:
            z, st = il.solve(f, torch.zeros_like(c), **kw)
        monkeypatch.setattr(torch.Tensor, "new_empty", orig)
        runs["nan" if fill != fill else "zero"] = (z, st)
    (z0, s0), (zn, sn) = runs["zero"], runs["nan"]
    assert torch.equal(torch.nan_to_num(z0, nan=7.0), torch.nan_to_num(zn, nan=7.0))
    assert torch.equal(s0.nstep, sn.nstep) and torch.equal(s0.converged, sn.converged)
    live = ~s0.diverged
    assert bool(s0.converged[live].all())
    if mode != "joint":  # the rows stopped at different steps, so later steps read a subset of the rows
        assert int(s0.nstep.max()) > int(s0.nstep[live].min())


def test_anderson_refuses_a_stepping_row_it_holds_no_history_for():
    # The histories are compacted to the stepping rows when per-sample stopping freezes samples; that rests
    # on the set only shrinking. A step on a row dropped earlier (or a same-size but different set) must
    # raise instead of mixing an uninitialised history.
    from iterlayers.solvers import make_solver

    s = make_solver("anderson", {"m": 3})
    z = torch.randn(4, 5, dtype=F64)
    state = s.init(z, torch.tanh(z))
    f = torch.tanh
    s.step(state, z, f(z), None, f)
    keep = torch.tensor([0, 2, 3])
    z_new, _ = s.step(state, z[keep], f(z[keep]), keep, f)
    assert state["G"].shape[0] == 3  # compacted to the stepping rows
    with pytest.raises(RuntimeError, match="no history"):
        s.step(state, z[[0, 1]], f(z[[0, 1]]), torch.tensor([0, 1]), f)
    with pytest.raises(RuntimeError, match="without shrinking"):
        s.step(state, z[[0, 1, 2]], f(z[[0, 1, 2]]), torch.tensor([0, 1, 2]), f)
