"""Monotone and spectral-norm parametrised cells: unique fixed points, exact bounds, torch helpers."""
import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.analysis import jacobian, jacobian_norm as jac_spectral_norm
from iterlayers.parametrizations import MonotoneLinear, SpectralNormLinear, spectral_norm, weight_norm

D = torch.float64


def _mon(seed=0, **kw):
    torch.manual_seed(seed)
    return MonotoneLinear(8, in_features=5, **kw).double()


def test_monotone_weight_structure_and_strong_monotonicity():
    cell = _mon(m=0.3, init_scale=2.0)
    W, G = cell.W().detach(), cell.G().detach()
    A, B = cell.A.detach(), cell.B.detach()
    eye = torch.eye(8, dtype=D)
    torch.testing.assert_close(W, 0.7 * eye - A.T @ A + B - B.T)
    torch.testing.assert_close(G, eye - W)
    # symmetric part of I - W is >= m I
    assert float(torch.linalg.eigvalsh((G + G.T) / 2).min()) >= 0.3 - 1e-12
    # with init_scale=2, ||W||_2 > 1: the undamped map is not a Euclidean contraction, the cell is
    assert float(torch.linalg.matrix_norm(W, 2)) > 1
    bound = cell.lipschitz_bound()
    L = float(torch.linalg.matrix_norm(G, 2))
    assert bound < 1 and bound <= (1 - 0.3 ** 2 / L ** 2) ** 0.5 + 1e-12
    assert cell.step_size() == pytest.approx(0.3 / L ** 2, rel=1e-12)


def test_monotone_two_starts_reach_the_same_fixed_point_of_the_equilibrium_equation():
    cell = _mon(1, m=0.5, init_scale=1.5)
    x = torch.randn(4, 5, dtype=D)
    with torch.no_grad():
        a = il.solve(cell, torch.zeros(4, 8, dtype=D), args=(x,), solver="picard", atol=1e-11, rtol=0.0,
                     max_iter=5000, on_failure="raise")
        b = il.solve(cell, 10 * torch.randn(4, 8, dtype=D), args=(x,), solver="anderson", atol=1e-11, rtol=0.0,
                     max_iter=5000, on_failure="raise")
        torch.testing.assert_close(a.z, b.z, rtol=0, atol=1e-9)
        # z* solves the monotone-operator equilibrium z = relu(W z + U x + b) (and the damped cell's equation);
        # that residual is the cell's divided by at most the step alpha, hence the looser tolerance.
        torch.testing.assert_close(cell.equilibrium_map(a.z, x), a.z, rtol=0, atol=2e-11 / cell.step_size())
        torch.testing.assert_close(cell(a.z, x), a.z, rtol=0, atol=1e-10)
        assert bool((a.z >= 0).all()) and bool((a.z > 0).any())


def test_monotone_identity_activation_closed_form_and_fixed_step():
    cell = _mon(2, activation="identity", alpha=0.05)
    x = torch.randn(3, 5, dtype=D)
    with torch.no_grad():
        sol = il.solve(cell, torch.zeros(3, 8, dtype=D), args=(x,), solver="anderson", atol=1e-12, rtol=0.0,
                       max_iter=2000, on_failure="raise")
        u = x @ cell.U.T + cell.bias
        exact = torch.linalg.solve(cell.G(), u.T).T  # z* = G^{-1} (U x + b)
    torch.testing.assert_close(sol.z, exact, rtol=0, atol=1e-9)
    # Identity activation: the cell is affine in z, its Jacobian I - alpha G, its Lipschitz bound exact
    J = jacobian(cell, sol.z, x)
    torch.testing.assert_close(J[0], torch.eye(8, dtype=D) - 0.05 * cell.G().detach())
    assert cell.lipschitz_bound() == pytest.approx(float(torch.linalg.matrix_norm(J[0], 2)), rel=1e-10)


def test_spectral_norm_linear_keeps_bound_after_optimizer_steps():
    torch.manual_seed(3)
    cell = SpectralNormLinear(6, in_features=4, bound=0.7).double()
    opt = torch.optim.SGD(cell.parameters(), lr=5.0)  # a large step that would break any soft constraint
    x = torch.randn(16, 4, dtype=D)
    target = 3 * torch.randn(16, 6, dtype=D)
    for _ in range(10):
        z = torch.randn(16, 6, dtype=D)
        loss = (cell(z, x) - target).pow(2).mean() - cell.V.pow(2).sum()  # pushes ||V|| up
        opt.zero_grad()
        loss.backward()
        opt.step()
        s = float(torch.linalg.matrix_norm(cell.weight.detach(), 2))
        assert s <= 0.7 + 1e-12
    assert float(torch.linalg.matrix_norm(cell.V.detach(), 2)) > 0.7  # the raw weight did grow past the bound
    z = torch.randn(5, 6, dtype=D)
    est = jac_spectral_norm(cell, z, x[:5], method="dense").value
    assert bool((est <= 0.7 + 1e-12).all())
    assert cell.lipschitz_bound() == pytest.approx(0.7, rel=1e-10)


def test_torch_parametrization_helpers():
    torch.manual_seed(4)
    lin = spectral_norm(nn.Linear(5, 5).double(), bound=0.5, n_power_iterations=5)
    for _ in range(20):  # each training-mode forward refines torch's power-iteration estimate
        lin(torch.randn(2, 5, dtype=D))
    assert float(torch.linalg.matrix_norm(lin.weight.detach(), 2)) == pytest.approx(0.5, rel=1e-6)
    wn = weight_norm(nn.Linear(4, 3).double())
    v, g = wn.parametrizations.weight.original1, wn.parametrizations.weight.original0
    torch.testing.assert_close(wn.weight, g * v / v.norm(dim=1, keepdim=True))


def test_options_are_validated():
    with pytest.raises(ValueError, match="m must"):
        MonotoneLinear(4, m=0)
    with pytest.raises(ValueError, match="activation"):
        MonotoneLinear(4, activation="tanh")
    with pytest.raises(ValueError, match="alpha"):
        MonotoneLinear(4, alpha=-1.0)
    with pytest.raises(ValueError, match="features"):
        SpectralNormLinear(0)
    with pytest.raises(ValueError, match="bound"):
        SpectralNormLinear(4, bound=0)
    with pytest.raises(ValueError, match="activation"):
        SpectralNormLinear(4, activation="gelu")
    with pytest.raises(ValueError, match="shape"):
        SpectralNormLinear(4)(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="bound"):
        spectral_norm(nn.Linear(2, 2), bound=-1)
    assert "m=1" in repr(MonotoneLinear(4)) and "bound=0.9" in repr(SpectralNormLinear(4))


def test_monotone_cell_inside_a_deq_has_the_closed_form_input_gradient():
    """Identity activation: z*(x) = G^{-1} (U x + b), so d sum(z*) / dx = 1^T G^{-1} U."""
    cell = _mon(5, activation="identity")
    layer = il.DEQ(cell, solver="anderson", atol=1e-12, rtol=0.0, max_iter=500, backward_atol=1e-12)
    x = torch.randn(2, 5, dtype=D, requires_grad=True)
    layer(x).sum().backward()
    G, U = cell.G().detach(), cell.U.detach()
    expected = torch.ones(8, dtype=D) @ torch.linalg.solve(G, U)
    torch.testing.assert_close(x.grad, expected.expand(2, 5), rtol=1e-7, atol=1e-9)
    assert cell.A.grad is not None and bool(torch.isfinite(cell.A.grad).all())


def test_option_errors_are_typed_and_name_the_layer():
    from iterlayers.errors import OptionTypeError, ShapeMismatchError, ValidationError

    with pytest.raises(OptionTypeError, match="MonotoneLinear: m must be a number"):
        MonotoneLinear(4, m="1")
    with pytest.raises(ValidationError, match="MonotoneLinear: m must be a finite number, got nan"):
        MonotoneLinear(4, m=float("nan"))
    with pytest.raises(OptionTypeError, match="MonotoneLinear: features must be an integer"):
        MonotoneLinear(4.0)
    with pytest.raises(ValidationError, match="MonotoneLinear: alpha must be 'auto' or a positive number"):
        MonotoneLinear(4, alpha="fast")
    with pytest.raises(OptionTypeError, match="MonotoneLinear: alpha must be a number"):
        MonotoneLinear(4, alpha=True)
    with pytest.raises(OptionTypeError, match="SpectralNormLinear: bias must be True or False"):
        SpectralNormLinear(4, bias=1)
    with pytest.raises(ValidationError, match="SpectralNormLinear: bound must be a finite number"):
        SpectralNormLinear(4, bound=float("inf"))
    with pytest.raises(ShapeMismatchError, match=r"z must have shape \[B, 4\]"):
        SpectralNormLinear(4)(torch.zeros(2, 3))
    with pytest.raises(ValidationError, match="spectral_norm: Linear has no parameter 'W'"):
        spectral_norm(nn.Linear(2, 2), name="W")
    with pytest.raises(OptionTypeError, match="weight_norm: module must be an nn.Module"):
        weight_norm(lambda x: x)
