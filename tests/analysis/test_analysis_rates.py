"""Fitted and predicted linear rates, and predicted iteration counts against measured Picard solves."""
import math

import pytest
import torch

import iterlayers as il
from iterlayers.analysis import fit_linear_rate, predict_iterations, predicted_rate

D = torch.float64


def test_fit_geometric_trace_is_exact():
    trace = [3.0 * 0.73 ** k for k in range(40)]
    assert fit_linear_rate(trace) == pytest.approx(0.73, rel=1e-12)
    assert fit_linear_rate(torch.tensor(trace)) == pytest.approx(0.73, rel=1e-6)  # float32 input


def test_fit_ignores_zero_and_plateau_tail_and_transient_head():
    geo = [10.0 * 0.5 ** k for k in range(30)]
    plateau = [geo[-1] * f for f in (1.3, 0.9, 1.1, 1.0, 1.2, 0.95)]
    assert fit_linear_rate(geo + plateau) == pytest.approx(0.5, rel=1e-6)
    assert fit_linear_rate(geo + [0.0, 0.0]) == pytest.approx(0.5, rel=1e-12)
    head = [50.0, 45.0, 44.0]
    assert fit_linear_rate(head + geo, skip=3) == pytest.approx(0.5, rel=1e-12)
    assert math.isnan(fit_linear_rate([1.0]))
    assert math.isnan(fit_linear_rate([1e-9] * 10))  # converged from the start: nothing to fit
    # tail keeps the asymptotic part only: a fast transient does not bias the fit
    assert fit_linear_rate([10.0 * 0.1 ** k for k in range(5)] + [1e-3 * 0.8 ** k for k in range(1, 40)],
                           tail=0.5) == pytest.approx(0.8, rel=1e-12)
    with pytest.raises(ValueError, match="tail"):
        fit_linear_rate(geo, tail=0.0)


def test_fit_absolute_floor_ends_the_usable_trace():
    # Below a known noise floor the "residuals" are round-off, possibly far from any plateau the relative test
    # would see: geometric decay to 1e-10, then values scattered in [1e-16, 1e-14] that would bend the fit.
    geo = [4.0 * 0.6 ** k for k in range(44)]  # down to ~7e-10
    noise = [3e-15, 1e-16, 8e-15, 5e-16, 2e-14, 1e-15]
    assert fit_linear_rate(geo + noise, floor=1e-13) == pytest.approx(0.6, rel=1e-12)
    assert fit_linear_rate(geo + noise, floor=1e-13, floor_factor=1.0) == pytest.approx(0.6, rel=1e-12)
    assert abs(fit_linear_rate(geo + noise) - 0.6) > 1e-3  # without the floor the noise does bend it
    assert math.isnan(fit_linear_rate([1e-14, 1e-15], floor=1e-13))
    with pytest.raises(ValueError, match="floor must be"):
        fit_linear_rate(geo, floor=-1.0)


def test_fit_batched_trace_as_list_of_tensors():
    rates = torch.tensor([0.3, 0.6, 0.9], dtype=D)
    trace = [2.0 * rates ** k for k in range(25)]  # the layout of SolverStats.trace
    out = fit_linear_rate(trace)
    assert out.shape == (3,)
    torch.testing.assert_close(out, rates, rtol=1e-10, atol=0)


def test_predict_iterations_closed_form():
    assert predict_iterations(0.5, 1.0, 1e-3) == 10  # 0.5^10 = 9.8e-4 <= 1e-3 < 0.5^9
    assert predict_iterations(0.5, 1.0, 0.5 ** 7) == 7  # exact power: no extra step
    assert predict_iterations(0.9, 1e-6, 1e-5) == 0
    assert predict_iterations(0.0, 1.0, 1e-3) == 1
    k = predict_iterations(torch.tensor([0.5, 0.9]), torch.tensor([1.0, 1.0]), torch.tensor(1e-3))
    assert k.tolist() == [10, math.ceil(math.log(1e-3) / math.log(0.9))]
    with pytest.raises(ValueError, match="rate"):
        predict_iterations(1.0, 1.0, 1e-3)
    with pytest.raises(ValueError, match="tol"):
        predict_iterations(0.5, 1.0, 0.0)


def test_predicted_rate_of_linear_cell_is_largest_eigenvalue_modulus():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 6, generator=g, dtype=D) * 0.3
    rho = torch.linalg.eigvals(W).abs().max()
    z = torch.randn(2, 6, generator=g, dtype=D)
    out = predicted_rate(lambda z, x: z @ W.T + x, z, torch.zeros(2, 6, dtype=D), tol=1e-12, max_iter=500)
    torch.testing.assert_close(out, rho.expand(2), rtol=1e-9, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_predicted_iterations_match_measured_picard_within_factor_1_5(seed):
    """On contractive tanh cells the Picard iteration count to atol matches r_0 rho(J*)^k = atol within 1.5x."""
    g = torch.Generator().manual_seed(seed)
    n = 10
    W = torch.randn(n, n, generator=g, dtype=D)
    W = W * (0.95 / torch.linalg.eigvals(W).abs().max())  # rho(W) = 0.95; ||W||_2 > 1: no Euclidean contraction
    U = 0.5 * torch.randn(n, n, generator=g, dtype=D)
    x = torch.randn(4, n, generator=g, dtype=D)

    def cell(z, x):
        return torch.tanh(z @ W.T + x @ U.T)

    atol = 1e-10
    sol = il.solve(cell, torch.zeros(4, n, dtype=D), args=(x,), solver="picard", atol=atol, rtol=0.0,
                   max_iter=2000, return_trace=True, on_failure="raise")
    rate = predicted_rate(cell, sol.z, x, tol=1e-10, max_iter=500)
    assert bool((rate < 0.95).all())  # tanh' <= 1 shrinks the spectrum
    r0 = sol.stats.trace[0]
    predicted = predict_iterations(rate, r0, torch.tensor(atol))
    measured = sol.stats.nstep
    ratio = predicted.double() / measured.double()
    assert bool(((ratio >= 1 / 1.5) & (ratio <= 1.5)).all()), (predicted, measured)
    # and the empirical asymptotic rate (second half of each trace) agrees with the Jacobian's spectral radius
    fitted = fit_linear_rate(sol.stats.trace, tail=0.5)
    torch.testing.assert_close(fitted, rate, rtol=0.05, atol=0)
