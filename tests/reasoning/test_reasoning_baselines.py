"""Learned-update baselines and energy modules."""
import pytest
import torch
from torch import nn

from iterlayers.reasoning import (MLPRNN, AutogradEnergy, GradientDescent, GradientRNN, Nesterov, Quadratic,
                                  QuadraticEnergy, random_rotation)


def _quadratic(batch=5, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = 0.1 + 0.9 * torch.rand(batch, n, generator=g, dtype=torch.float64)
    V = random_rotation(batch, n, generator=g)
    return (V * lam.unsqueeze(-2)) @ V.transpose(-1, -2), torch.randn(batch, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 6])
def test_gd_initialised_baselines_equal_gd(k):
    Q, b = _quadratic()
    gd = GradientDescent(max_iter=k, step_size=0.7)((Q, b))
    rnn = GradientRNN(4, 9, max_iter=k, init="gd", step_size=0.7).double()
    mlp = MLPRNN(4, (8, 11, 8), max_iter=k, init="gd", step_size=0.7).double()
    assert torch.allclose(rnn((Q, b)), gd, atol=1e-12)
    assert torch.allclose(mlp((Q, b)), gd, atol=1e-12)


def test_baselines_train_and_validate():
    Q, b = _quadratic()
    rnn = GradientRNN(4, 8, max_iter=3, init="random").double()
    rnn((Q, b)).pow(2).sum().backward()
    assert all(p.grad is not None for p in rnn.parameters())
    with pytest.raises(ValueError, match="hidden >= 2"):
        GradientRNN(4, 5, init="gd")
    with pytest.raises(ValueError, match="activation"):
        MLPRNN(4, (8,), activation="gelu")
    with pytest.raises(ValueError, match="init"):
        GradientRNN(4, 8, init="zeros")


def test_quadratic_energy_spectrum_and_gradient():
    torch.manual_seed(0)
    energy = QuadraticEnergy(6, 5, hidden=(7,), mu=0.2, L=3.0).double()
    u = torch.randn(10, 6, dtype=torch.float64) * 5
    R = random_rotation(10, 5)
    b = torch.randn(10, 5, dtype=torch.float64)
    bound = energy.bind((u, R, b))
    ev = torch.linalg.eigvalsh(bound.Q)
    assert torch.allclose(ev[:, 0], torch.full((10,), 0.2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ev[:, -1], torch.full((10,), 3.0, dtype=torch.float64), atol=1e-12)
    y = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(bound.value(y).sum(), y)
    assert torch.allclose(g, bound.grad(y), atol=1e-12)
    free = QuadraticEnergy(6, 5, hidden=(), mu=0.2, L=3.0, pin_extremes=False).double()
    e = free.eigenvalues(u)
    assert (e >= 0.2).all() and (e <= 3.0).all()
    with pytest.raises(ValueError, match="mu"):
        QuadraticEnergy(6, 5, mu=2.0, L=1.0)
    with pytest.raises(TypeError, match="x = "):
        energy.bind(u)


def test_autograd_energy_matches_quadratic():
    Q, b = _quadratic(seed=3)

    class Quad(nn.Module):
        def forward(self, x, y):
            return 0.5 * torch.einsum("bi,bij,bj->b", y, Q, y) - (b * y).sum(-1)

    energy = AutogradEnergy(Quad(), dim=4)
    x = torch.zeros(5, 1, dtype=torch.float64)
    for layer in (GradientDescent(max_iter=5), Nesterov(max_iter=5, mu=0.1)):
        assert torch.allclose(layer(energy, x), layer(Quadratic(Q, b)), atol=1e-12)
    # gradients flow through autograd energies (create_graph inside the layer)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    e2 = AutogradEnergy(lambda x, y: scale * 0.5 * (y * y).sum(-1) - (b * y).sum(-1), dim=4)
    y = GradientDescent(max_iter=3, step_size=0.5)(e2, x)
    (gs,) = torch.autograd.grad(y.sum(), scale)
    # y_k = (1 - (1 - s c)^k) b / c ; derivative at c = 1, s = 0.5, k = 3
    c, s, k = 1.0, 0.5, 3
    d = (k * s * (1 - s * c) ** (k - 1) * c - (1 - (1 - s * c) ** k)) / c ** 2
    assert gs.item() == pytest.approx(d * b.sum().item(), rel=1e-10)
