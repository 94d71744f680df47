"""Algorithm layers run to their fixed point (DEQ mode): solution and implicit gradients."""
import pytest
import torch

from iterlayers.algorithms import (GradientDescent, HeavyBall, ISTA, L1Penalty, Nesterov, Quadratic,
                                   QuadraticEnergy, random_rotation, FISTA)
from iterlayers.algorithms._equilibrium import equilibrium


def _energy_and_input(seed=0, batch=4):
    torch.manual_seed(seed)
    energy = QuadraticEnergy(3, 4, hidden=(6,), mu=0.2, L=1.0).double()
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    R = random_rotation(batch, 4, generator=g)
    b = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    target = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    return energy, (u, R, b), target


LAYERS = [
    ("gd", lambda: GradientDescent(k=1, step_size=1.0)),
    ("heavy_ball", lambda: HeavyBall(k=1, step_size=1.0, momentum=0.3)),
    ("nag", lambda: Nesterov(k=1, step_size=1.0, mu=0.2)),
    ("ista_l1_0", lambda: ISTA(k=1, step_size=1.0, regularizer=L1Penalty(0.0))),
]


@pytest.mark.parametrize("name,make", LAYERS)
def test_deq_gradient_matches_long_unroll(name, make):
    energy, x, target = _energy_and_input()
    layer = make()
    y_deq = layer.solve(energy, x, atol=1e-12, max_iter=400, backward_atol=1e-12, backward_max_iter=400)
    g_deq = torch.autograd.grad(((y_deq - target) ** 2).sum(), list(energy.parameters()))
    y_unr = layer(energy, x, steps=600)  # (1 - 0.2)^600 ~ 1e-58: the unroll has converged
    g_unr = torch.autograd.grad(((y_unr - target) ** 2).sum(), list(energy.parameters()))
    assert torch.allclose(y_deq, y_unr, atol=1e-9)
    for a, b in zip(g_deq, g_unr):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6), (name, (a - b).abs().max())


def test_deq_solution_and_b_gradient_match_exact_minimiser():
    energy, x, target = _energy_and_input(seed=1)
    u, R, b = x
    b = b.clone().requires_grad_(True)
    y = GradientDescent(k=1).solve(energy, (u, R, b), atol=1e-12, max_iter=400, backward_atol=1e-12)
    Q = energy.bind((u, R, b)).Q.detach()
    y_exact = torch.linalg.solve(Q, b.detach().unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(y, y_exact, atol=1e-10)
    (gb,) = torch.autograd.grad(((y - target) ** 2).sum(), b)
    # y* = Q^{-1} b  =>  dL/db = Q^{-1} 2 (y* - t)   (Q symmetric)
    ref = torch.linalg.solve(Q, (2 * (y_exact - target)).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gb, ref, atol=1e-8)


def test_local_fallback_matches_core():
    energy, x, target = _energy_and_input(seed=2)
    bound = energy.bind(x)
    layer = GradientDescent(k=1)
    f = layer.fixed_point_map(bound)
    z0 = bound.zeros()
    grads = []
    for use_core in (True, False):
        z = equilibrium(f, z0, atol=1e-12, max_iter=500, use_core=use_core)
        grads.append(torch.autograd.grad(((z - target) ** 2).sum(), list(energy.parameters()), retain_graph=True))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-8)


def test_solve_rejects_untied_and_fista():
    Q = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).contiguous()
    b = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="tied"):
        GradientDescent(k=3, tied=False).solve((Q, b))
    with pytest.raises(ValueError, match="no stationary"):
        FISTA(k=3, regularizer=L1Penalty(0.1)).solve((Q, b))
    y = HeavyBall(k=1, step_size=0.5, momentum=0.2).solve(Quadratic(Q * 2, b), atol=1e-12)
    assert torch.allclose(y, b / 2, atol=1e-10)
