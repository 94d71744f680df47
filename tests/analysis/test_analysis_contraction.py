"""Lipschitz bounds and the contraction certificate on constructed cells."""

import pytest
import torch
from torch import nn

from iterlayers.analysis import ContractionCertificate, certify_contraction, lipschitz_upper_bound
from iterlayers.parametrizations import SpectralNormLinear

D = torch.float64


def sigma(w):
    return float(torch.linalg.matrix_norm(w.detach().double(), 2))


def test_lipschitz_sequential_is_product_of_layer_bounds():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 3),
                        nn.Sigmoid()).double()
    expected = sigma(net[0].weight) * sigma(net[2].weight) * sigma(net[4].weight) * 0.25
    assert lipschitz_upper_bound(net) == pytest.approx(expected, rel=1e-12)
    # The bound really bounds: the local Lipschitz constant ||J(z)||_2 never exceeds it.
    z = torch.randn(16, 4, dtype=D)
    J = torch.stack([torch.autograd.functional.jacobian(net, zi) for zi in z])
    assert float(torch.linalg.matrix_norm(J.detach(), 2).max()) <= expected


def test_lipschitz_of_a_single_linear_layer_is_tight():
    lin = nn.Linear(5, 5).double()
    assert lipschitz_upper_bound(lin) == pytest.approx(sigma(lin.weight), rel=1e-12)


def test_conv_bound_is_exact_for_1x1_and_an_upper_bound_for_3x3():
    torch.manual_seed(1)
    c1 = nn.Conv2d(3, 4, 1).double()
    x = torch.zeros(1, 3, 5, 5, dtype=D)
    J1 = torch.autograd.functional.jacobian(lambda t: c1(t).reshape(-1), x).reshape(100, 75)
    assert lipschitz_upper_bound(c1) == pytest.approx(sigma(J1), rel=1e-10)
    c3 = nn.Conv2d(3, 4, 3, padding=1, stride=1).double()
    J3 = torch.autograd.functional.jacobian(lambda t: c3(t).reshape(-1), x).reshape(100, 75)
    bound = lipschitz_upper_bound(c3)
    w = c3.weight.detach().reshape(4, -1)
    assert bound == pytest.approx(3 * sigma(w), rel=1e-12)  # sqrt(3 * 3) * ||W_mat||
    assert sigma(J3) <= bound


def test_pooling_bounds():
    x = torch.randn(1, 1, 6, 6, dtype=D)
    avg = nn.AvgPool2d(2)
    J = torch.autograd.functional.jacobian(lambda t: avg(t).reshape(-1), x).reshape(9, 36)
    assert lipschitz_upper_bound(avg) == pytest.approx(sigma(J), rel=1e-12) == pytest.approx(0.5)
    assert lipschitz_upper_bound(nn.MaxPool2d(2)) == 1.0
    overlap = nn.MaxPool2d(3, stride=1)
    assert lipschitz_upper_bound(overlap) == pytest.approx(3.0)
    # the worst case is attained: a single spike is the max of all 9 windows that contain it
    spike = torch.zeros(1, 1, 5, 5, dtype=D)
    spike[0, 0, 2, 2] = 1.0
    assert float(overlap(spike).norm()) == pytest.approx(3.0)
    with pytest.raises(TypeError, match="AvgPool2d"):
        lipschitz_upper_bound(nn.AvgPool2d(3, padding=1, count_include_pad=False))


def test_lipschitz_unsupported_layers_raise_typeerror_naming_them():
    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.ReLU(), nn.MultiheadAttention(3, 1))
    with pytest.raises(TypeError, match=r"1 \(LayerNorm\).*3 \(MultiheadAttention\)"):
        lipschitz_upper_bound(net)
    with pytest.raises(TypeError, match="nn.Module"):
        lipschitz_upper_bound(lambda z: z)


def test_certificate_contractive_from_global_bound():
    net = nn.Sequential(nn.Linear(6, 6), nn.Tanh()).double()
    with torch.no_grad():
        net[0].weight.mul_(0.5 / sigma(net[0].weight))
    cert = certify_contraction(net, torch.randn(2, 6, dtype=D))
    assert isinstance(cert, ContractionCertificate)
    assert cert.verdict == "contractive" and cert.is_contractive
    assert cert.lipschitz_bound == pytest.approx(0.5, rel=1e-12)
    assert cert.max_spectral_norm <= 0.5 + 1e-12
    text = str(cert)
    assert "contractive" in text and "0.5" in text and "Lipschitz bound" in text


def test_certificate_contractive_for_spectral_norm_cell_without_points():
    cell = SpectralNormLinear(5, bound=0.8).double()
    cert = certify_contraction(cell)
    assert cert.verdict == "contractive" and cert.samples == 0
    assert cert.lipschitz_bound <= 0.8 + 1e-12


def test_certificate_not_contractive_when_an_eigenvalue_leaves_the_unit_disc():
    # Linear cell with eigenvalues {1.3, 0.2, 0.1, -0.5}: a repelling fixed point, no norm contracts it.
    P = torch.eye(4, dtype=D) + 0.2 * torch.randn(4, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    W = P @ torch.diag(torch.tensor([1.3, 0.2, 0.1, -0.5], dtype=D)) @ torch.linalg.inv(P)
    cell = lambda z, x: z @ W.T + x  # noqa: E731
    x = torch.randn(3, 4, dtype=D)
    for method in ("dense", "power"):
        cert = certify_contraction(cell, None, x, samples=2, method=method)
        assert cert.verdict == "not contractive"
        assert cert.max_spectral_radius == pytest.approx(1.3, rel=1e-6)
        assert cert.lipschitz_bound is None


def test_certificate_unknown_when_norm_exceeds_one_but_radius_does_not():
    # Nilpotent-plus-small: rho = 0.5 but ||J||_2 > 1; a contraction in a weighted norm, not in the Euclidean one.
    W = torch.tensor([[0.5, 3.0], [0.0, 0.5]], dtype=D)
    cert = certify_contraction(lambda z, x: z @ W.T + x, torch.zeros(2, 2, dtype=D), torch.ones(2, 2, dtype=D))
    assert cert.verdict == "unknown"
    assert cert.max_spectral_radius == pytest.approx(0.5, rel=1e-9)
    assert cert.max_spectral_norm == pytest.approx(sigma(W), rel=1e-9)
    assert ">= 1" in cert.reason


def test_certificate_validates_options():
    with pytest.raises(ValueError, match="margin"):
        certify_contraction(lambda z, x: z, margin=2.0)
    with pytest.raises(ValueError, match="method"):
        certify_contraction(lambda z, x: z, method="exact")
    with pytest.raises(ValueError, match="samples"):
        certify_contraction(lambda z, x: z, samples=-1)


def test_smooth_activation_constants_are_their_max_slopes():
    t = torch.linspace(-40, 40, 400001, dtype=D, requires_grad=True)
    for act in (nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.Softplus()):
        (slope,) = torch.autograd.grad(act(t).sum(), t)
        assert lipschitz_upper_bound(act) == pytest.approx(float(slope.abs().max()), rel=1e-6)


def test_constant_cell_has_zero_jacobian():
    cert = certify_contraction(lambda z, x: x.clone(), torch.zeros(2, 3, dtype=D), torch.ones(2, 3, dtype=D))
    assert cert.max_spectral_norm == 0.0 and cert.max_spectral_radius == 0.0 and cert.verdict == "unknown"
