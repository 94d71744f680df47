"""Unrolled GD / NAG / heavy-ball layers against closed-form iterates on fixed quadratics (float64)."""
import math

import pytest
import torch

from iterlayers.reasoning import (GradientDescent, HeavyBall, Nesterov, Quadratic, random_rotation,
                                  spd_from_eigs)
from iterlayers.reasoning import theory


def _problem(batch=6, n=5, mu=0.1, L=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lam = mu + (L - mu) * torch.rand(batch, n, generator=g, dtype=torch.float64)
    lam[:, 0], lam[:, -1] = mu, L
    Q = spd_from_eigs(random_rotation(batch, n, generator=g), lam)
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return Q.to(dtype), b.to(dtype)


@pytest.mark.parametrize("k", [1, 2, 7, 30])
def test_gd_matches_closed_form(k):
    Q, b = _problem()
    y = GradientDescent(max_iter=k, step_size=1.0)((Q, b))
    # y_k = (I - (I - sQ)^k) Q^{-1} b, written with dense matrix powers (independent of theory.py)
    eye = torch.eye(5, dtype=torch.float64)
    ref = torch.einsum("bij,bj->bi", (eye - torch.linalg.matrix_power(eye - Q, k)) @ torch.linalg.inv(Q), b)
    assert torch.allclose(y, ref, atol=1e-12, rtol=1e-10)
    assert torch.allclose(theory.closed_form_iterates("gd", Q, b, k, s=1.0), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 5, 13, 30])
def test_nag_matches_block_recursion(k):
    Q, b = _problem(seed=1)
    mu, s = 0.1, 0.9
    y = Nesterov(max_iter=k, step_size=s, mu=mu)((Q, b))
    ref = theory.closed_form_iterates("nag", Q, b, k, s=s, mu=mu)
    assert torch.allclose(y, ref, atol=1e-11, rtol=1e-10)
    # scalar check of the 2x2 recursion at lam = mu: double root 1 - sqrt(s mu), r_k = (1 + k c) (1 - c)^k
    c = math.sqrt(s * mu)
    r = theory.residual("nag", torch.tensor(mu, dtype=torch.float64), k, s=s, mu=mu).item()
    assert r == pytest.approx((1 + k * c) * (1 - c) ** k, rel=1e-10)


@pytest.mark.parametrize("k", [1, 4, 20])
def test_heavy_ball_matches_closed_form(k):
    Q, b = _problem(seed=2)
    y = HeavyBall(max_iter=k, step_size=1.3, momentum=0.4)((Q, b))
    ref = theory.closed_form_iterates("heavy_ball", Q, b, k, s=1.3, beta=0.4)
    assert torch.allclose(y, ref, atol=1e-11, rtol=1e-10)


def test_rates_match_theory():
    mu, L = 0.1, 1.0
    assert theory.asymptotic_rate("gd", mu, L) == pytest.approx(0.9)
    assert theory.asymptotic_rate("nag", mu, L) == pytest.approx(1 - math.sqrt(0.1), rel=1e-6)
    s, beta = __import__("iterlayers.reasoning", fromlist=["polyak_parameters"]).polyak_parameters(mu, L)
    kappa = L / mu
    assert theory.asymptotic_rate("heavy_ball", mu, L, s=s, beta=beta) == pytest.approx(
        (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1), rel=1e-5)
    for k in (1, 5, 20):
        assert theory.convergence_factor("gd", k, mu, L) == pytest.approx(0.9 ** k)
    # measured worst case on a quadratic with lam_min = mu hits the bound exactly for GD (b along v_mu)
    Q, _ = _problem(batch=1, seed=3)
    lam, V = torch.linalg.eigh(Q)
    b = V[:, :, 0] * 3.0
    rel = theory.measure_convergence(GradientDescent(max_iter=6), Q, b)
    assert rel.item() == pytest.approx(0.9 ** 6, rel=1e-10)


def test_nag_faster_than_gd_on_average():
    Q, b = _problem(batch=32, seed=4)
    for k in (5, 10, 20):
        gd = theory.measure_convergence(GradientDescent(max_iter=k), Q, b).mean()
        nag = theory.measure_convergence(Nesterov(max_iter=k, mu=0.1), Q, b).mean()
        assert nag < gd


def test_tied_and_untied():
    Q, b = _problem(seed=5)
    k, steps = 4, [0.5, 1.0, 1.5, 0.8]
    untied = GradientDescent(max_iter=k, step_size=steps, tied=False)
    y = untied((Q, b))
    ref = torch.zeros_like(b)
    for s in steps:
        ref = ref - s * (torch.einsum("bij,bj->bi", Q, ref) - b)
    assert torch.allclose(y, ref, atol=1e-13)
    # untied with equal values equals tied
    assert torch.allclose(GradientDescent(max_iter=k, step_size=0.7, tied=False)((Q, b)),
                          GradientDescent(max_iter=k, step_size=0.7)((Q, b)), atol=1e-14)
    assert untied.step_size.shape == (k,)
    # untied NAG with per-step momentum equals the manual recursion
    moms = [0.1, 0.5, 0.3, 0.2]
    nag = Nesterov(max_iter=k, step_size=steps, momentum=moms, tied=False)
    x_prev = torch.zeros_like(b)
    yy = torch.zeros_like(b)
    for s, m in zip(steps, moms):
        x = yy - s * (torch.einsum("bij,bj->bi", Q, yy) - b)
        yy = x + m * (x - x_prev)
        x_prev = x
    assert torch.allclose(nag((Q, b)), x_prev, atol=1e-13)
    with pytest.raises(ValueError, match="max_iter"):
        untied((Q, b), max_iter=k + 1)


def test_learnable_step_gets_exact_gradient():
    Q, b = _problem(seed=6)
    k = 5
    layer = GradientDescent(max_iter=k, step_size=0.8, learn_step=True)
    layer((Q, b)).sum().backward()
    # d/ds sum_i y_k = sum over batch of 1^T k (I - sQ)^{k-1} b
    eye = torch.eye(5, dtype=torch.float64)
    ref = torch.einsum("bij,bj->b", k * torch.linalg.matrix_power(eye - 0.8 * Q, k - 1), b).sum()
    assert layer.step_size.grad.item() == pytest.approx(ref.item(), rel=1e-10)
    untied = GradientDescent(max_iter=k, step_size=0.8, learn_step=True, tied=False)
    untied((Q, b)).sum().backward()
    assert untied.step_size.grad.shape == (k,)
    assert untied.step_size.grad.sum().item() == pytest.approx(ref.item(), rel=1e-10)


def test_float32_batched_no_grad_and_return_all():
    Q, b = _problem(dtype=torch.float32)
    with torch.no_grad():
        trace = Nesterov(max_iter=6, mu=0.1)((Q, b), return_all=True)
    assert len(trace) == 7 and trace[-1].dtype == torch.float32
    assert torch.count_nonzero(trace[0]) == 0  # y_0 = 0
    ref = theory.closed_form_iterates("nag", Q.double(), b.double(), 6, mu=0.1)
    assert torch.allclose(trace[-1].double(), ref, atol=1e-4)
    y0 = torch.ones_like(b)
    y = GradientDescent(max_iter=1)((Q, b), y0=y0)
    assert torch.allclose(y, y0 - (torch.einsum("bij,bj->bi", Q, y0) - b), atol=1e-6)


def test_validation_errors():
    with pytest.raises(ValueError, match="max_iter"):
        GradientDescent(max_iter=0)
    with pytest.raises(ValueError, match="step_size"):
        GradientDescent(max_iter=3, step_size=[1.0, 2.0], tied=False)
    with pytest.raises(TypeError, match="tied"):
        GradientDescent(max_iter=3, tied="yes")
    with pytest.raises(ValueError, match="exactly one of mu"):
        Nesterov(max_iter=3)
    with pytest.raises(ValueError, match="algorithm"):
        theory.residual("adam", torch.ones(2, dtype=torch.float64), 3)
    with pytest.raises(TypeError, match="energy"):
        GradientDescent(max_iter=2)("not an energy")
    with pytest.raises(ValueError, match="Q must have shape"):
        Quadratic(torch.ones(3, 3), torch.ones(1, 3))
