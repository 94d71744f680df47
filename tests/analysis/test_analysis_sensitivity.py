"""Input/parameter sensitivity, condition number and unrolled sensitivity against closed forms and dense values."""
from pathlib import Path

import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.analysis import (condition_number, input_sensitivity, parameter_sensitivity,
                                 unrolled_sensitivity)

D = torch.float64


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


class TanhCell(nn.Module):
    def __init__(self, n, m, seed=0, scale=0.4):
        super().__init__()
        self.W = nn.Parameter(rand(n, n, seed=seed, scale=scale))
        self.U = nn.Parameter(rand(n, m, seed=seed + 1))
        self.b = nn.Parameter(rand(n, seed=seed + 2, scale=0.1))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def fixed_point(cell, x, n):
    sol = il.solve(cell, torch.zeros(x.shape[0], n, dtype=D), args=(x,), solver="anderson", atol=1e-13,
                   rtol=0.0, max_iter=500, on_failure="raise")
    return sol.z


def test_linear_cell_closed_forms():
    """cell(z, x) = W z + U x: dz*/dx = (I - W)^{-1} U and kappa(I - W) from its singular values."""
    n, m = 6, 4
    W, U = rand(n, n, seed=1, scale=0.25), rand(n, m, seed=2)
    cell = lambda z, x: z @ W.T + x @ U.T  # noqa: E731
    x, z = rand(3, m, seed=3), rand(3, n, seed=4)  # a linear cell's Jacobians do not depend on the point
    eye = torch.eye(n, dtype=D)
    sens = torch.linalg.matrix_norm(torch.linalg.solve(eye - W, U), 2)
    s = torch.linalg.svdvals(eye - W)
    for method in ("power", "lanczos", "dense"):
        torch.testing.assert_close(input_sensitivity(cell, z, x, method=method, tol=1e-10),
                                   sens.expand(3), rtol=1e-7, atol=0)
        torch.testing.assert_close(condition_number(cell, z, x, method=method, tol=1e-10),
                                   (s[0] / s[-1]).expand(3), rtol=1e-7, atol=0)


def test_parameter_sensitivity_of_bias_is_resolvent_norm():
    """theta = b only, cell = W z + x + b: dz*/db = (I - W)^{-1}, so ||dz*/db|| = 1 / sigma_min(I - W)."""
    n = 5
    W = rand(n, n, seed=5, scale=0.3)
    b = nn.Parameter(torch.zeros(n, dtype=D))
    cell = lambda z, x: z @ W.T + x + b  # noqa: E731
    x, z = rand(2, n, seed=6), rand(2, n, seed=7)
    expected = 1 / torch.linalg.svdvals(torch.eye(n, dtype=D) - W)[-1]
    for method in ("power", "lanczos", "dense"):
        out = parameter_sensitivity(cell, z, x, params=[b], method=method, tol=1e-10)
        torch.testing.assert_close(out, expected.expand(2), rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="params"):
        parameter_sensitivity(cell, z, x)


def test_nonlinear_cell_matrix_free_matches_dense_and_finite_differences():
    n, m = 6, 3
    cell = TanhCell(n, m, seed=10)
    x = rand(3, m, seed=11)
    z = fixed_point(cell, x, n)
    dense = input_sensitivity(cell, z, x, method="dense")
    torch.testing.assert_close(input_sensitivity(cell, z, x, method="lanczos", tol=1e-10), dense, rtol=1e-6, atol=0)
    torch.testing.assert_close(condition_number(cell, z, x, method="lanczos", tol=1e-10),
                               condition_number(cell, z, x, method="dense"), rtol=1e-6, atol=0)
    pd = parameter_sensitivity(cell, z, x, method="dense")
    torch.testing.assert_close(parameter_sensitivity(cell, z, x, method="lanczos", tol=1e-10), pd, rtol=1e-6, atol=0)
    # finite differences of the actual solve: ||z*(x + h e) - z*(x)|| / h <= ||dz*/dx|| for every unit e,
    # with equality (to O(h)) along the top right-singular vector of the dense dz*/dx.
    from iterlayers.analysis import jacobian
    Jz, Jx = jacobian(cell, z, x), jacobian(cell, z, x, wrt="x")
    M = torch.linalg.solve(torch.eye(n, dtype=D) - Jz, Jx)
    top = torch.linalg.svd(M).Vh[:, 0, :]
    h = 1e-6
    fd = (fixed_point(cell, x + h * top, n) - fixed_point(cell, x - h * top, n)).norm(dim=1) / (2 * h)
    torch.testing.assert_close(fd, dense, rtol=1e-5, atol=0)


def test_sensitivities_work_in_float32_under_no_grad():
    cell = TanhCell(5, 5, seed=20).float()
    x = rand(2, 5, seed=21).float()
    z = il.solve(cell, torch.zeros(2, 5), args=(x,), solver="anderson", atol=1e-6, rtol=0.0).z
    with torch.no_grad():
        a = input_sensitivity(cell, z, x, method="lanczos", tol=1e-5)
        b = condition_number(cell, z, x, method="power", tol=1e-6)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, input_sensitivity(cell, z, x, method="dense"), rtol=1e-4, atol=0)
    torch.testing.assert_close(b, condition_number(cell, z, x, method="dense"), rtol=1e-3, atol=0)


def _gd_step(Q, s):
    # Gradient descent on E(y) = 1/2 y^T Q y - x^T y (Chen et al. 2020): y <- y - s (Q y - x).
    return lambda y, x: y - s * (y @ Q.T - x)


def test_unrolled_sensitivity_of_gradient_descent_closed_form():
    """y_k = (I - (I - sQ)^k) Q^{-1} x, so dy_k/dx = (I - (I - sQ)^k) Q^{-1} (Chen et al. 2020)."""
    n, s = 5, 0.9
    V = torch.linalg.qr(rand(n, n, seed=30)).Q
    Q = V @ torch.diag(torch.tensor([1.0, 0.7, 0.4, 0.2, 0.1], dtype=D)) @ V.T
    x = rand(2, n, seed=31)
    ks = [0, 1, 2, 5, 10, 30]
    eye = torch.eye(n, dtype=D)
    A = [(eye - torch.linalg.matrix_power(eye - s * Q, k)) @ torch.linalg.inv(Q) for k in ks]
    worst = unrolled_sensitivity(_gd_step(Q, s), torch.zeros(2, n, dtype=D), x, ks, "worst", tol=1e-12,
                                 method="lanczos")
    assert worst.shape == (len(ks), 2)
    expected = torch.stack([torch.linalg.matrix_norm(a, 2) for a in A])
    torch.testing.assert_close(worst, expected[:, None].expand(-1, 2), rtol=1e-8, atol=1e-12)
    delta = rand(2, n, seed=32)
    lin = unrolled_sensitivity(_gd_step(Q, s), torch.zeros(2, n, dtype=D), x, ks, delta)
    exp_dir = torch.stack([(delta @ a.T).norm(dim=1) / delta.norm(dim=1) for a in A])
    torch.testing.assert_close(lin, exp_dir, rtol=1e-10, atol=1e-12)
    # the map is affine in x, so a finite perturbation moves y_k by exactly the linearised amount
    fin = unrolled_sensitivity(_gd_step(Q, s), torch.zeros(2, n, dtype=D), x, ks, delta, eps=0.5)
    torch.testing.assert_close(fin, exp_dir, rtol=1e-9, atol=1e-12)
    # sensitivity grows monotonically towards ||Q^{-1}|| = 10 for GD
    assert bool((worst[1:] - worst[:-1] >= -1e-12).all()) and float(worst[-1, 0]) < 10


def test_unrolled_sensitivity_nonlinear_finite_difference_and_validation():
    W, U = rand(4, 4, seed=40, scale=0.5), rand(4, 4, seed=41)
    step = lambda y, x: torch.tanh(y @ W.T + x @ U.T)  # noqa: E731
    x, delta = rand(3, 4, seed=42), rand(3, 4, seed=43)
    ks = [1, 3, 8]
    lin = unrolled_sensitivity(step, torch.zeros(3, 4, dtype=D), x, ks, delta)
    fin = unrolled_sensitivity(step, torch.zeros(3, 4, dtype=D), x, ks, delta, eps=1e-6)
    torch.testing.assert_close(fin, lin, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="ks"):
        unrolled_sensitivity(step, torch.zeros(3, 4, dtype=D), x, [])
    with pytest.raises(ValueError, match="perturbation"):
        unrolled_sensitivity(step, torch.zeros(3, 4, dtype=D), x, [1], "best")
    with pytest.raises(ValueError, match="shape of x"):
        unrolled_sensitivity(step, torch.zeros(3, 4, dtype=D), x, [1], delta[:, :2])


def test_linear_solves_use_the_core_gmres_and_match_a_dense_solve():
    # one Krylov kernel: analysis/_linsolve.gmres is the core's GMRES solver on an affine fixed point; here
    # rho(J) > 1 (a Neumann series would diverge) but I - J is invertible
    from iterlayers.analysis import _linsolve

    g = torch.Generator().manual_seed(3)
    J = 1.5 * torch.randn(3, 6, 6, generator=g, dtype=torch.float64) / 6 ** 0.5
    assert float(torch.linalg.eigvals(J).abs().max()) > 1
    rhs = torch.randn(3, 6, generator=g, dtype=torch.float64)
    rhs[1] = 0.0  # a zero right-hand side has the solution 0
    A = torch.eye(6, dtype=torch.float64) - J
    w, ok = _linsolve.gmres(lambda u: torch.einsum("bij,bj->bi", A, u), rhs, tol=1e-12, max_iter=100)
    exact = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)
    assert ok.tolist() == [True, True, True]
    torch.testing.assert_close(w, exact, atol=1e-10, rtol=0)
    res = (rhs - torch.einsum("bij,bj->bi", A, w)).norm(dim=1)  # measured here
    assert bool((res <= 1e-11 * rhs.norm(dim=1).clamp_min(1e-300) + 1e-300).all())
    assert "def gmres" in Path(_linsolve.__file__).read_text() and "Arnoldi" not in Path(
        _linsolve.__file__).read_text()
    # an unsolvable budget is flagged, not silently returned as solved
    with pytest.warns(Warning):
        _, ok = _linsolve.gmres(lambda u: torch.einsum("bij,bj->bi", A, u), rhs, tol=1e-12, max_iter=2)
    assert not bool(ok[0])
