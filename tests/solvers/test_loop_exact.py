"""The loop on problems whose iteration counts, iterates and residuals are known exactly.

Each assertion is one that a plausible one-line bug in the loop or the statistics breaks: the per-iteration
test ignoring ``rtol``, the relative tolerance taken from ``||z||`` instead of ``||f(z)||``, ``<=`` turned into
``<`` at the tolerance, the last iterate returned instead of the best one, the ``best`` flag set when the best
iterate is the last one, per-sample step counts off by one. True residuals are recomputed here, never read
from the solver's statistics.
"""
from fractions import Fraction

import pytest
import torch

import iterlayers as il

STOPPINGS = ["verify", "per_sample", "joint"]


def affine(z, a, x):
    """``f(z; a, x) = a z + x`` per sample, both inputs batched (``[B, 1]`` columns)."""
    return a * z + x


def picard_count(a: Fraction, b: Fraction, atol: Fraction, rtol: Fraction) -> int:
    """First k with ||f(z_k) - z_k|| <= atol + rtol ||f(z_k)|| for Picard on the scalar f(z) = a z + b, z_0 = 0,
    in exact rational arithmetic: z_k = b (1 - a^k) / (1 - a), residual |b| a^k, f(z_k) = z_{k+1}."""
    z, k = Fraction(0), 0
    while abs(a * z + b - z) > atol + rtol * abs(a * z + b):
        z, k = a * z + b, k + 1
    return k


# rtol between the two bounds at k = 10 for a = 1/2, b = 1: the f-based test passes at k = 10, the z-based one
# (||z_10|| = 2 - 2^-9 < ||f(z_10)|| = 2 - 2^-10) only at k = 11.
RTOL = float((Fraction(1, 2**10) / (2 - Fraction(1, 2**10)) + Fraction(1, 2**10) / (2 - Fraction(1, 2**9))) / 2)


@pytest.mark.parametrize("stopping", STOPPINGS)
def test_rtol_only_solve_stops_at_the_closed_form_count(stopping):
    a = torch.tensor([[0.5], [0.25], [0.5]], dtype=torch.float64)
    b = torch.tensor([[1.0], [3.0], [-1.0]], dtype=torch.float64)
    counts = [picard_count(Fraction(float(ai)), Fraction(float(bi)), Fraction(0), Fraction(RTOL))
              for ai, bi in zip(a.flatten(), b.flatten())]
    assert counts[0] == 10 and picard_count(Fraction(1, 2), Fraction(1), Fraction(0), Fraction(RTOL)) == 10
    sol = il.solve(affine, torch.zeros(3, 1, dtype=torch.float64), args=(a, b), solver="picard", atol=0.0,
                   rtol=RTOL, max_iter=60, on_failure="raise", stopping=stopping)
    st = sol.stats
    K = counts if stopping != "joint" else [max(counts)] * 3
    assert st.nstep.tolist() == K
    # the iterates and residuals are dyadic: exact equality
    for i in range(3):
        ai, bi, k = float(a[i]), float(b[i]), K[i]
        assert float(sol.z[i]) == bi * (1 - ai**k) / (1 - ai)
        assert float(st.abs_residual[i]) == abs(bi) * ai**k
    true = (a * sol.z + b - sol.z).abs().flatten()
    assert torch.equal(st.abs_residual, true)
    assert st.converged.all() and not st.best.any()  # converging: the returned iterate is the last one


@pytest.mark.parametrize("stopping", STOPPINGS)
@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_residual_equal_to_atol_counts_as_converged(stopping, solver):
    """f(z) = z/2 + 1 from 0: residual exactly 2^-k; with atol = 2^-10 the solve stops at k = 10, not 11."""
    x = torch.ones(2, 1, dtype=torch.float64)
    opts = {"m": 1} if solver == "anderson" else {}  # Anderson with one history entry: Picard steps
    sol = il.solve(lambda z, xx: 0.5 * z + xx, torch.zeros(2, 1, dtype=torch.float64), args=(x,), solver=solver,
                   atol=2.0**-10, rtol=0.0, max_iter=40, on_failure="raise", stopping=stopping, **opts)
    assert sol.stats.nstep.tolist() == [10, 10]
    assert sol.stats.abs_residual.tolist() == [2.0**-10] * 2


def _picard_iterates(A: torch.Tensor, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    z, out = torch.zeros_like(x), []
    for _ in range(n + 1):
        out.append(z)
        z = z @ A.T + x
    return out


@pytest.mark.parametrize("stopping", ["verify", "per_sample"])
def test_diverging_sample_returns_its_best_iterate(stopping):
    """Sample 0 first contracts then blows up; sample 1 converges. Everything is recomputed here."""
    A = torch.diag(torch.tensor([0.25, 1.5], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0**-20], [1.0, 0.0]], dtype=torch.float64)
    atol, ratio = 1e-9, 1e6
    zs = _picard_iterates(A, x, 80)
    res = torch.stack([(z @ A.T + x - z).norm(dim=1) for z in zs])  # [k, sample]
    # sample 0: the loop stops it at the first k whose residual exceeds ratio * max(r_0, atol)
    k_div = int(next(k for k in range(81) if res[k, 0] > ratio * max(float(res[0, 0]), atol)))
    k_best = int(res[: k_div + 1, 0].argmin())
    k_conv = int(next(k for k in range(81) if res[k, 1] <= atol))
    assert 0 < k_best < k_div  # a best iterate strictly inside the run: first and last are both wrong
    sol = il.solve(lambda z, xx: z @ A.T + xx, torch.zeros_like(x), args=(x,), solver="picard", atol=atol, rtol=0,
                   max_iter=200, divergence_ratio=ratio, on_failure="ignore", stopping=stopping)
    st = sol.stats
    assert st.status == "diverged" and st.diverged.tolist() == [True, False]
    assert st.nstep.tolist() == [k_div, k_conv]
    torch.testing.assert_close(sol.z[0], zs[k_best][0], rtol=0, atol=0)
    torch.testing.assert_close(sol.z[1], zs[k_conv][1], rtol=0, atol=0)
    true = (sol.z @ A.T + x - sol.z).norm(dim=1)
    torch.testing.assert_close(st.abs_residual, true, rtol=1e-14, atol=0)
    assert st.best.tolist() == [True, False]
    assert st.converged.tolist() == [False, True]


def test_joint_divergence_stops_and_returns_the_best_whole_iterate():
    """Joint stopping: the first blow-up ends the solve; the returned state is one iterate for every row."""
    A = torch.diag(torch.tensor([0.25, 1.5], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0**-20], [1.0, 0.0]], dtype=torch.float64)
    atol, ratio = 1e-9, 1e6
    zs = _picard_iterates(A, x, 80)
    res = torch.stack([(z @ A.T + x - z).norm(dim=1) for z in zs])
    limit = ratio * float(torch.clamp(res[0], min=atol).max())  # the system's largest initial residual
    k_div = int(next(k for k in range(81) if float(res[k].max()) > limit))
    k_best = int(res[: k_div + 1].max(dim=1).values.argmin())  # smallest worst residual / atol
    sol = il.solve(lambda z, xx: z @ A.T + xx, torch.zeros_like(x), args=(x,), solver="picard", atol=atol, rtol=0,
                   max_iter=200, divergence_ratio=ratio, on_failure="ignore", stopping="joint")
    st = sol.stats
    assert st.status == "diverged" and st.nstep.tolist() == [k_div, k_div]
    assert st.diverged.tolist() == [True, False]
    torch.testing.assert_close(sol.z, zs[k_best], rtol=0, atol=0)
    torch.testing.assert_close(st.abs_residual, (sol.z @ A.T + x - sol.z).norm(dim=1), rtol=1e-14, atol=0)
    assert st.best.all()  # the returned iterate is not the last one
    assert st.info["stopping"] == "joint"


def test_joint_keeps_iterating_converged_rows_and_reports_their_final_residuals():
    a = torch.tensor([[0.5], [0.125]], dtype=torch.float64)
    b = torch.ones(2, 1, dtype=torch.float64)
    calls = []

    def f(z, x):
        calls.append(z.shape[0])
        return a[: z.shape[0]] * z + x

    sol = il.solve(f, torch.zeros(2, 1, dtype=torch.float64), args=(b,), solver="picard", atol=2.0**-12, rtol=0,
                   stopping="joint", on_failure="raise")
    assert sol.stats.nstep.tolist() == [12, 12]  # 2^-12 for a = 1/2; the 1/8 row goes on with it
    assert sol.stats.abs_residual.tolist() == [2.0**-12, 0.125**12]
    assert set(calls) == {2} and sol.stats.nfe == len(calls) == 13


@pytest.mark.parametrize("stopping", STOPPINGS)
def test_residual_equal_to_atol_plus_rtol_times_norm_counts_as_converged(stopping):
    """f(z) = z/2 + (3, 4) from 0: r_k = 5 2^-k and ||f(z_k)|| = 5 (2 - 2^-k), all exact in float64 (a
    Pythagorean triple keeps the norms exact). With rtol = 2^-12 and atol = 5 (2^-11 + 2^-22), r_10 equals
    atol + rtol ||f(z_10)|| exactly: the solve stops at 10, not 11."""
    rtol, atol = 2.0**-12, 5 * (2.0**-11 + 2.0**-22)
    assert 5 * 2.0**-10 == atol + rtol * 5 * (2 - 2.0**-10)  # the construction is exact
    c = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    sol = il.solve(lambda z, cc: 0.5 * z + cc, torch.zeros(1, 2, dtype=torch.float64), args=(c,), solver="picard",
                   atol=atol, rtol=rtol, max_iter=40, on_failure="raise", stopping=stopping)
    assert sol.stats.nstep.tolist() == [10]
    assert float(sol.stats.abs_residual[0]) == 5 * 2.0**-10


def test_equal_residuals_keep_the_earliest_iterate():
    """f(z) = z + c has residual ||c|| at every iterate: no iterate improves on z0, which is returned."""
    c = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    z0 = torch.full((1, 2), 0.5, dtype=torch.float64)
    sol = il.solve(lambda z, cc: z + cc, z0, args=(c,), solver="picard", atol=1e-3, rtol=0, max_iter=7,
                   on_failure="ignore")
    assert sol.stats.status == "max_iter" and sol.stats.nstep.tolist() == [7]
    assert torch.equal(sol.z, z0) and sol.stats.best.tolist() == [True]
