"""Jacobians, spectral radius and spectral norm against closed forms and dense exact values."""
import pytest
import torch

from iterlayers.analysis import Estimate, jacobian, jacobian_norm, spectral_radius

D = torch.float64


def linear_cell(W):
    return lambda z, x: z @ W.T + x


def tanh_cell(W, U):
    return lambda z, x: torch.tanh(z @ W.T + x @ U.T)


def rand(*shape, seed=0, dtype=D, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def test_jacobian_linear_cell_is_W():
    W = rand(5, 5, seed=1)
    z, x = rand(3, 5, seed=2), rand(3, 5, seed=3)
    J = jacobian(linear_cell(W), z, x)
    assert J.shape == (3, 5, 5)
    torch.testing.assert_close(J, W.expand(3, 5, 5), rtol=0, atol=1e-14)


def test_jacobian_matches_finite_differences_and_wrt_x():
    W, U = rand(4, 4, seed=4, scale=0.7), rand(4, 3, seed=5)
    cell = tanh_cell(W, U)
    z, x = rand(2, 4, seed=6), rand(2, 3, seed=7)
    J = jacobian(cell, z, x)
    Jx = jacobian(cell, z, x, wrt="x")
    assert Jx.shape == (2, 4, 3)
    h = 1e-6
    for i in range(4):
        e = torch.zeros(4, dtype=D)
        e[i] = h
        fd = (cell(z + e, x) - cell(z - e, x)) / (2 * h)
        torch.testing.assert_close(J[:, :, i], fd, rtol=1e-7, atol=1e-9)
    # analytic: J = diag(1 - tanh^2) W, Jx = diag(1 - tanh^2) U
    s = 1 - torch.tanh(z @ W.T + x @ U.T) ** 2
    torch.testing.assert_close(J, s[:, :, None] * W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Jx, s[:, :, None] * U, rtol=1e-12, atol=1e-12)


def test_jacobian_of_image_shaped_state_and_no_x():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    z = rand(2, 2, 3, 3, seed=8)
    J = jacobian(lambda z: torch.tanh(conv(z)), z)
    assert J.shape == (2, 18, 18)
    # per-sample independence: sample 0's Jacobian from a batch of one is the same
    J0 = jacobian(lambda z: torch.tanh(conv(z)), z[:1])
    torch.testing.assert_close(J[:1], J0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_radius_power_matches_dense_random_tanh_cells(seed):
    n = 8
    W, U = rand(n, n, seed=10 + seed, scale=0.5), rand(n, n, seed=20 + seed)
    cell = tanh_cell(W, U)
    z, x = rand(4, n, seed=30 + seed), rand(4, n, seed=40 + seed)
    est = spectral_radius(cell, z, x, method="power", tol=1e-10, max_iter=500)
    exact = torch.linalg.eigvals(jacobian(cell, z, x)).abs().max(-1).values
    assert isinstance(est, Estimate) and est.method == "power"
    assert bool(est.converged.all()) and 1 <= est.iterations <= 500
    torch.testing.assert_close(est.value, exact, rtol=1e-6, atol=1e-9)
    dense = spectral_radius(cell, z, x, method="dense")
    torch.testing.assert_close(dense.value, exact)


def rotation(r, th):
    c, s = torch.cos(torch.tensor(th, dtype=D)), torch.sin(torch.tensor(th, dtype=D))
    return r * torch.stack([torch.stack([c, -s]), torch.stack([s, c])])


def test_spectral_radius_complex_dominant_pair_closed_form():
    # J similar to block-diag(r R(theta), 0.5 R(0.4), 0.3, -0.2, 0.1, -0.45): dominant pair r e^{+-i theta},
    # where plain power iteration only oscillates. A non-orthogonal similarity makes J non-normal.
    r, th, n = 0.9, 1.1, 8
    W = torch.zeros(n, n, dtype=D)
    W[:2, :2], W[2:4, 2:4] = rotation(r, th), rotation(0.5, 0.4)
    W[4:, 4:] = torch.diag(torch.tensor([0.3, -0.2, 0.1, -0.45], dtype=D))
    P = torch.eye(n, dtype=D) + 0.3 * rand(n, n, seed=50)
    A = P @ W @ torch.linalg.inv(P)
    z, x = rand(3, n, seed=51), rand(3, n, seed=52)
    est = spectral_radius(linear_cell(A), z, x, tol=1e-12, max_iter=500)
    assert bool(est.converged.all())
    torch.testing.assert_close(est.value, torch.full((3,), r, dtype=D), rtol=1e-9, atol=0)
    torch.testing.assert_close(est.eigenvalue.abs(), torch.full((3,), r, dtype=D), rtol=1e-9, atol=0)
    torch.testing.assert_close(est.eigenvalue.angle().abs(), torch.full((3,), th, dtype=D), rtol=1e-8, atol=0)


def test_spectral_radius_negative_real_and_float32():
    W = torch.diag(torch.tensor([-0.95, 0.5, 0.1, 0.3]))
    z = torch.randn(2, 4)
    est = spectral_radius(linear_cell(W), z, torch.zeros(2, 4))
    assert est.value.dtype == torch.float32
    torch.testing.assert_close(est.value, torch.full((2,), 0.95), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_spectral_norm_matches_svd(method):
    n = 7
    W = rand(n, n, seed=60, scale=0.6)
    z, x = rand(3, n, seed=61), rand(3, n, seed=62)
    est = jacobian_norm(linear_cell(W), z, x, method=method, tol=1e-12, max_iter=1000)
    assert bool(est.converged.all())
    torch.testing.assert_close(est.value, torch.linalg.matrix_norm(W, 2).expand(3), rtol=1e-8, atol=0)
    if method == "lanczos":
        assert est.iterations <= n  # Lanczos with full re-orthogonalisation is exact after n steps
    cell = tanh_cell(W, rand(n, n, seed=63))
    est = jacobian_norm(cell, z, x, method=method, tol=1e-12, max_iter=1000)
    exact = torch.linalg.matrix_norm(jacobian(cell, z, x), 2)
    torch.testing.assert_close(est.value, exact, rtol=1e-7, atol=0)
    torch.testing.assert_close(jacobian_norm(cell, z, x, method="dense").value, exact)


def test_estimates_work_under_no_grad_with_parameters_and_validate_options():
    lin = torch.nn.Linear(5, 5).double()
    cell = lambda z, x: torch.tanh(lin(z) + x)  # noqa: E731
    z, x = rand(2, 5, seed=70), rand(2, 5, seed=71)
    with torch.no_grad():
        a = jacobian_norm(cell, z, x, method="lanczos").value
        b = spectral_radius(cell, z, x).value
    assert lin.weight.grad is None  # analysis must not accumulate gradients into the cell
    torch.testing.assert_close(a, jacobian_norm(cell, z, x, method="dense").value, rtol=1e-6, atol=0)
    torch.testing.assert_close(b, spectral_radius(cell, z, x, method="dense").value, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="method"):
        spectral_radius(cell, z, x, method="lanczos")
    with pytest.raises(ValueError, match="tol"):
        jacobian_norm(cell, z, x, tol=0)
    with pytest.raises(ValueError, match="shape of z"):
        jacobian_norm(lambda z, x: z[:, :2], z, x)
    with pytest.raises(TypeError, match="z must be"):
        jacobian_norm(cell, [1.0], x)
    assert "converged=2/2" in str(spectral_radius(cell, z, x))
