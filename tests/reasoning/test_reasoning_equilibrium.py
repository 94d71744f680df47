"""Algorithm layers run to their fixed point (DEQ mode): solution and implicit gradients."""
from pathlib import Path

import pytest
import torch

from iterlayers import reasoning

from iterlayers.reasoning import (GradientDescent, HeavyBall, ISTA, L1Penalty, Nesterov, Quadratic,
                                  QuadraticEnergy, random_rotation, FISTA)


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
    ("gd", lambda: GradientDescent(max_iter=1, step_size=1.0)),
    ("heavy_ball", lambda: HeavyBall(max_iter=1, step_size=1.0, momentum=0.3)),
    ("nag", lambda: Nesterov(max_iter=1, step_size=1.0, mu=0.2)),
    ("ista_l1_0", lambda: ISTA(max_iter=1, step_size=1.0, regularizer=L1Penalty(0.0))),
]


@pytest.mark.parametrize("name,make", LAYERS)
def test_deq_gradient_matches_long_unroll(name, make):
    energy, x, target = _energy_and_input()
    layer = make()
    y_deq = layer.solve(energy, x, atol=1e-12, max_iter=400, backward_atol=1e-12, backward_max_iter=400)
    g_deq = torch.autograd.grad(((y_deq - target) ** 2).sum(), list(energy.parameters()))
    y_unr = layer(energy, x, max_iter=600)  # (1 - 0.2)^600 ~ 1e-58: the unroll has converged
    g_unr = torch.autograd.grad(((y_unr - target) ** 2).sum(), list(energy.parameters()))
    assert torch.allclose(y_deq, y_unr, atol=1e-9)
    for a, b in zip(g_deq, g_unr):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6), (name, (a - b).abs().max())


def test_deq_solution_and_b_gradient_match_exact_minimiser():
    energy, x, target = _energy_and_input(seed=1)
    u, R, b = x
    b = b.clone().requires_grad_(True)
    y = GradientDescent(max_iter=1).solve(energy, (u, R, b), atol=1e-12, max_iter=400, backward_atol=1e-12)
    Q = energy.bind((u, R, b)).Q.detach()
    y_exact = torch.linalg.solve(Q, b.detach().unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(y, y_exact, atol=1e-10)
    (gb,) = torch.autograd.grad(((y - target) ** 2).sum(), b)
    # y* = Q^{-1} b  =>  dL/db = Q^{-1} 2 (y* - t)   (Q symmetric)
    ref = torch.linalg.solve(Q, (2 * (y_exact - target)).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gb, ref, atol=1e-8)


def test_equilibrium_mode_is_the_core_solve_with_the_dense_implicit_gradient():
    # The former local fallback (algorithms/_equilibrium.py) is gone: the DEQ mode is iterlayers.deq_solve on
    # the state tuple. Reference: the dense implicit-function-theorem gradient, computed here.
    energy, x, target = _energy_and_input(seed=2)
    layer = HeavyBall(max_iter=1, step_size=1.0, momentum=0.3)  # a two-tensor state (y, y_prev)
    stats: dict = {}
    y = layer.solve(energy, x, atol=1e-12, max_iter=500, backward_atol=1e-12, stats=stats)
    params = list(energy.parameters())
    grads = torch.autograd.grad(((y - target) ** 2).sum(), params)
    assert bool(stats["forward"].converged.all()) and bool(stats["backward"].converged.all())
    bound = energy.bind(x)
    f = layer.fixed_point_map(bound)
    with torch.no_grad():
        z = torch.cat([y.detach()] * 2, dim=-1)
        assert float((f(z) - z).norm(dim=1).max()) <= 1e-11  # a fixed point, measured here
    B, N = z.shape
    J = torch.autograd.functional.jacobian(f, z).reshape(B, N, B, N)
    J = torch.stack([J[i, :, i] for i in range(B)])  # samples are independent: the block diagonal
    dl = torch.zeros_like(z)
    dl[:, :4] = 2 * (y.detach() - target)  # the output is the first part of the state
    adj = torch.linalg.solve((torch.eye(N, dtype=z.dtype) - J).transpose(1, 2), dl.unsqueeze(-1)).squeeze(-1)
    ref = torch.autograd.grad(layer.fixed_point_map(energy.bind(x))(z), params, adj)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)
    assert not (Path(reasoning.__file__).parent / "_equilibrium.py").exists()


def test_solve_rejects_untied_and_fista():
    Q = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).contiguous()
    b = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="tied"):
        GradientDescent(max_iter=3, tied=False).solve((Q, b))
    with pytest.raises(ValueError, match="no stationary"):
        FISTA(max_iter=3, regularizer=L1Penalty(0.1)).solve((Q, b))
    y = HeavyBall(max_iter=1, step_size=0.5, momentum=0.2).solve(Quadratic(Q * 2, b), atol=1e-12)
    assert torch.allclose(y, b / 2, atol=1e-10)
