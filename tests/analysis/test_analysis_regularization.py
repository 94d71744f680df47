"""Hutchinson estimate of ||J||_F^2 / n as a differentiable training penalty."""
import pytest
import torch

from iterlayers.analysis import jacobian, jacobian_frobenius_penalty

D = torch.float64


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(6, 6, generator=g, dtype=D) * 0.5).requires_grad_(True)
    x = torch.randn(4, 6, generator=g, dtype=D)
    z = torch.randn(4, 6, generator=g, dtype=D).requires_grad_(True)
    cell = lambda z, x: torch.tanh(z @ W.T + x)  # noqa: E731
    return W, x, z, cell


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_hutchinson_matches_dense_frobenius_norm(distribution):
    W, x, z, cell = _setup()
    exact = jacobian(cell, z, x).pow(2).sum() / (4 * 6)
    f = cell(z, x)
    est = jacobian_frobenius_penalty(f, z, samples=4000, distribution=distribution,
                                     generator=torch.Generator().manual_seed(1))
    assert est.dim() == 0
    # Relative std of the Gaussian estimator here is ~ sqrt(2 ||JJ^T||_F^2 / ||J||_F^4 / (B * samples)) < 1%.
    assert float(est.detach()) == pytest.approx(float(exact), rel=0.03)


def test_penalty_is_differentiable_and_its_gradient_is_unbiased():
    W, x, z, cell = _setup(2)
    f = cell(z, x)
    est = jacobian_frobenius_penalty(f, z, samples=3000, generator=torch.Generator().manual_seed(3))
    (g_est,) = torch.autograd.grad(est, W)

    # exact penalty through the analytic Jacobian diag(1 - tanh^2(a)) W, a = W z + x
    def exact_penalty(W):
        s = 1 - torch.tanh(z.detach() @ W.T + x) ** 2
        return (s[:, :, None] * W).pow(2).sum() / (4 * 6)

    g_exact = torch.autograd.grad(exact_penalty(W), W)[0]
    assert float((g_est - g_exact).norm() / g_exact.norm()) < 0.05
    # linear cell: ||J||_F^2 / n = ||V||_F^2 / n
    V = torch.randn(5, 5, dtype=D, generator=torch.Generator().manual_seed(4))
    zz = torch.randn(3, 5, dtype=D).requires_grad_(True)
    est = jacobian_frobenius_penalty(zz @ V.T, zz, samples=2000, generator=torch.Generator().manual_seed(5))
    assert float(est) == pytest.approx(float(V.pow(2).sum() / 5), rel=0.05)


def test_penalty_validates_inputs():
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="requires? grad"):
        jacobian_frobenius_penalty(z * 2, z)
    zg = z.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="samples"):
        jacobian_frobenius_penalty(zg * 2, zg, samples=0)
    with pytest.raises(ValueError, match="distribution"):
        jacobian_frobenius_penalty(zg * 2, zg, distribution="uniform")
