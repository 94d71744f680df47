"""Broyden's method against a dense float64 NumPy reference of the documented update, and its finite
termination on linear problems.

The reference keeps the full inverse-Jacobian approximation ``H`` of ``g(z) = f(z) - z`` as a matrix (the
solver stores it as ``-I + sum u_i v_i^T``), so it checks the low-rank bookkeeping, the transposed product
``dz^T H``, the treatment of negative and tiny denominators, the restart and the line search independently.
"""
import numpy as np
import pytest
import torch

import iterlayers as il

F64 = torch.float64


def reference_broyden(f, z0, *, steps, memory, line_search=False, ls_steps=3):
    """Good Broyden in NumPy: dz = -H g, optional halving of dz while ||g|| does not decrease, then

        H <- H + (dz - H dg) (dz^T H) / (dz^T H dg)   unless |dz^T H dg| <= eps ||dz|| ||dg||,

    with H reset to -I once ``memory`` updates (made or skipped) have accumulated. Returns the iterates and
    counters: negative denominators met, skipped updates, line-search halvings per step."""
    n = z0.shape[0]
    eps = np.finfo(np.float64).eps
    H, k = -np.eye(n), 0
    z = np.asarray(z0, dtype=np.float64)
    g = f(z) - z
    zs, info = [z], {"negative": 0, "skipped": 0, "halvings": []}
    for _ in range(steps):
        if k == memory:
            H, k = -np.eye(n), 0
        dz = -H @ g
        t, z_new = 1.0, z + dz
        g_new = f(z_new) - z_new
        halvings = 0
        if line_search:
            for _ in range(ls_steps):
                if np.linalg.norm(g_new) < np.linalg.norm(g):
                    break
                t *= 0.5
                halvings += 1
                z_new = z + t * dz
                g_new = f(z_new) - z_new
        info["halvings"].append(halvings)
        dz, dg = z_new - z, g_new - g
        vT = dz @ H
        denom = vT @ dg
        info["negative"] += int(denom < 0)
        if abs(denom) > eps * np.linalg.norm(dz) * np.linalg.norm(dg):
            H = H + np.outer((dz - H @ dg) / denom, vT)
        else:
            info["skipped"] += 1
        k += 1
        z, g = z_new, g_new
        zs.append(z)
    return zs, info


def expanding_linear(n, norm, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64)
    A = norm * A / torch.linalg.matrix_norm(A, 2)
    c = torch.randn(2, n, generator=g, dtype=F64)
    return A, c


def expanding_tanh(n=6, seed=11):
    """f(z) = tanh(A z + c), A = 1.5 I + R (||R|| = 0.6, not symmetric), small c: near z = 0 the map expands
    (||A|| > 1), so Picard steps overshoot and secant denominators dz^T (I - J) dz are negative."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(n, n, generator=g, dtype=F64)
    A = 1.5 * torch.eye(n, dtype=F64) + 0.6 * R / torch.linalg.matrix_norm(R, 2)
    c = 0.3 * torch.randn(2, n, generator=g, dtype=F64)
    return A, c


@pytest.mark.parametrize("memory,line_search", [(20, False), (3, False), (20, True), (4, True)])
def test_broyden_iterates_match_the_dense_reference(memory, line_search):
    n, steps = 6, 14
    A, c = expanding_tanh(n)
    An = A.numpy()
    sol = il.solve(lambda z, cc: torch.tanh(z @ A.T + cc), torch.zeros_like(c), args=(c,), solver="broyden",
                   memory=memory, line_search=line_search, atol=1e-300, rtol=0, max_iter=steps,
                   on_failure="ignore", return_trace=True)
    tr = sol.stats.trace_tensor()
    negative, halvings = 0, []
    for i in range(c.shape[0]):
        ci = c[i].numpy()
        f = lambda z: np.tanh(An @ z + ci)  # noqa: E731
        zs, info = reference_broyden(f, np.zeros(n), steps=steps, memory=memory, line_search=line_search)
        res = np.array([np.linalg.norm(f(z) - z) for z in zs])
        np.testing.assert_allclose(tr[:, i].numpy(), res, rtol=1e-7, atol=1e-13)
        negative += info["negative"]
        halvings += info["halvings"]
    assert negative > 0  # updates with a negative denominator happen and must be applied
    if line_search:
        assert max(halvings) >= 2  # repeated halving happens
    assert sol.stats.info["broyden_restarts"] == (0 if memory >= steps else (steps - 1) // memory)


@pytest.mark.parametrize("n", [3, 6])
def test_broyden_solves_a_linear_problem_in_at_most_2n_steps(n):
    # Gay (1979): on an affine g, Broyden's good method (no restart, no line search) reaches the root in at
    # most 2n steps, whatever the conditioning, even where Picard diverges.
    A, c = expanding_linear(n, 2.5, seed=n)
    sol = il.solve(lambda z, cc: z @ A.T + cc, torch.zeros_like(c), args=(c,), solver="broyden", memory=2 * n,
                   atol=1e-9, rtol=0, max_iter=2 * n, on_failure="raise")
    assert int(sol.stats.nstep.max()) <= 2 * n
    exact = torch.linalg.solve(torch.eye(n, dtype=F64) - A, c.T).T
    torch.testing.assert_close(sol.z, exact, rtol=0, atol=1e-8)


def test_broyden_first_step_is_picard_and_second_is_exact_on_a_scalar_affine_map():
    # On f(z) = a z + c (scalar) the first step is Picard (H = -I); the secant update then makes H the exact
    # inverse of g' = a - 1, so the second step lands on c / (1 - a).
    a = torch.tensor([[3.0], [0.5]], dtype=F64)
    c = torch.tensor([[1.0], [2.0]], dtype=F64)
    sol = il.solve(lambda z, aa, cc: aa * z + cc, torch.zeros_like(c), args=(a, c), solver="broyden", atol=1e-12,
                   rtol=0, max_iter=10, on_failure="raise", return_trace=True)
    assert sol.stats.nstep.tolist() == [2, 2]
    torch.testing.assert_close(sol.z, c / (1 - a), rtol=1e-15, atol=0)


def test_broyden_line_search_backtracks_on_an_equal_residual():
    # f(z) = c - z from z0 = 0: the Picard step lands on z1 = c with g1 = -c, a residual of exactly the same
    # norm. That is not a decrease, so the line search halves the step and lands on c / 2, the fixed point,
    # after one step and two evaluations. (Accepting the equal residual would take a second Broyden step.)
    c = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=F64)
    sol = il.solve(lambda z, cc: cc - z, torch.zeros_like(c), args=(c,), solver="broyden", line_search=True,
                   atol=1e-12, rtol=0, max_iter=10, on_failure="raise")
    assert sol.stats.nstep.tolist() == [1, 1]
    assert sol.stats.nfe == 1 + 2
    assert torch.equal(sol.z, c / 2)
