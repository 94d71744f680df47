"""ISTA / FISTA layers reach the lasso optimum; projected gradient reaches the NNLS optimum."""
import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from sklearn.linear_model import Lasso

from iterlayers.reasoning import (FISTA, ISTA, BoxConstraint, L1Penalty, NonnegativeConstraint, Quadratic)


def _lasso_problem(batch=3, m=20, n=8, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((batch, m, n))
    x = rng.standard_normal((batch, m))
    At = torch.from_numpy(A)
    Q = At.transpose(-1, -2) @ At
    b = torch.einsum("bmn,bm->bn", At, torch.from_numpy(x))
    L = torch.linalg.eigvalsh(Q).max(-1).values.max().item()
    return A, x, Quadratic(Q, b), L


def _objective(A, x, y, lam):
    return 0.5 * np.sum((A @ y - x) ** 2) + lam * np.abs(y).sum()


def test_ista_and_fista_reach_sklearn_lasso():
    lam = 2.0
    A, x, energy, L = _lasso_problem()
    m = A.shape[1]
    ista = ISTA(max_iter=3000, step_size=1.0 / L, regularizer=L1Penalty(lam))
    fista = FISTA(max_iter=600, step_size=1.0 / L, regularizer=L1Penalty(lam))
    with torch.no_grad():
        y_i, y_f = ista(energy).numpy(), fista(energy).numpy()
    for j in range(A.shape[0]):
        # sklearn minimises 1/(2m) ||x - A w||^2 + alpha ||w||_1  ->  alpha = lam / m
        ref = Lasso(alpha=lam / m, fit_intercept=False, tol=1e-12, max_iter=100000).fit(A[j], x[j]).coef_
        for y in (y_i[j], y_f[j]):
            assert np.allclose(y, ref, atol=1e-6)
            assert _objective(A[j], x[j], y, lam) <= _objective(A[j], x[j], ref, lam) + 1e-9
    # KKT: A^T (x - A y) = lam sign(y) on the support, |.| <= lam off it
    for j in range(A.shape[0]):
        r = A[j].T @ (x[j] - A[j] @ y_f[j])
        on = np.abs(y_f[j]) > 1e-8
        assert np.allclose(r[on], lam * np.sign(y_f[j][on]), atol=1e-6)
        assert np.all(np.abs(r[~on]) <= lam + 1e-6)
    assert (np.abs(y_f) < 1e-8).any()  # the l1 term produced real zeros


def test_fista_faster_than_ista_at_fixed_depth():
    lam = 1.0
    A, x, energy, L = _lasso_problem(seed=1)
    star = FISTA(max_iter=3000, step_size=1.0 / L, regularizer=L1Penalty(lam))(energy).detach().numpy()
    f_star = sum(_objective(A[j], x[j], star[j], lam) for j in range(len(A)))
    k = 40
    with torch.no_grad():
        yi = ISTA(max_iter=k, step_size=1.0 / L, regularizer=L1Penalty(lam))(energy).numpy()
        yf = FISTA(max_iter=k, step_size=1.0 / L, regularizer=L1Penalty(lam))(energy).numpy()
    gi = sum(_objective(A[j], x[j], yi[j], lam) for j in range(len(A))) - f_star
    gf = sum(_objective(A[j], x[j], yf[j], lam) for j in range(len(A))) - f_star
    assert 0 <= gf < gi


def test_ista_equilibrium_mode_reaches_lasso_optimum():
    lam = 2.0
    A, x, energy, L = _lasso_problem(seed=2)
    y = ISTA(max_iter=1, step_size=1.0 / L, regularizer=L1Penalty(lam)).solve(energy, solver="picard", atol=1e-12,
                                                                       max_iter=5000)
    m = A.shape[1]
    for j in range(A.shape[0]):
        ref = Lasso(alpha=lam / m, fit_intercept=False, tol=1e-12, max_iter=100000).fit(A[j], x[j]).coef_
        assert np.allclose(y[j].detach().numpy(), ref, atol=1e-6)


def test_projected_gradient_nonnegative_least_squares():
    A, x, energy, L = _lasso_problem(seed=3)
    with torch.no_grad():
        y = FISTA(max_iter=3000, step_size=1.0 / L, regularizer=NonnegativeConstraint())(energy).numpy()
    for j in range(A.shape[0]):
        ref, _ = nnls(A[j], x[j])
        assert np.allclose(y[j], ref, atol=1e-6)
    box = BoxConstraint(-0.1, 0.1)
    with torch.no_grad():
        yb = ISTA(max_iter=50, step_size=1.0 / L, regularizer=box)(energy)
    assert yb.abs().max() <= 0.1 + 1e-12


def test_learnable_lambda_gets_gradient_and_validation():
    A, x, energy, L = _lasso_problem(seed=4)
    reg = L1Penalty(0.5, learnable=True)
    ISTA(max_iter=10, step_size=1.0 / L, regularizer=reg)(energy).sum().backward()
    assert reg.raw.grad is not None and torch.isfinite(reg.raw.grad)
    with pytest.raises(ValueError, match="lam"):
        L1Penalty(-1.0)
    with pytest.raises(TypeError, match="regularizer"):
        ISTA(max_iter=3, regularizer=0.1)
    with pytest.raises(ValueError, match="low < high"):
        BoxConstraint(1.0, 0.0)
