"""Closed-form stability / sensitivity of algorithm layers against the measured (autograd) ones."""
import math

import pytest
import torch

from iterlayers.reasoning import GradientDescent, HeavyBall, Nesterov, random_rotation, spd_from_eigs
from iterlayers.reasoning import theory

MU, L = 0.1, 1.0


def _random_quadratics(batch=8, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = MU + (L - MU) * torch.rand(batch, n, generator=g, dtype=torch.float64)
    V = random_rotation(batch, n, generator=g)
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return spd_from_eigs(V, lam), b, lam, V


CASES = [
    ("gd", lambda k: GradientDescent(max_iter=k, step_size=1.0), dict(s=1.0)),
    ("nag", lambda k: Nesterov(max_iter=k, step_size=1.0, mu=MU), dict(s=1.0, mu=MU)),
    ("heavy_ball", lambda k: HeavyBall(max_iter=k, step_size=1.2, momentum=0.35), dict(s=1.2, beta=0.35)),
]


@pytest.mark.parametrize("algo,make,kw", CASES)
@pytest.mark.parametrize("k", [1, 3, 12])
def test_per_sample_stability_closed_form_equals_measured(algo, make, kw, k):
    Q, b, lam, V = _random_quadratics(seed=k)
    measured = theory.measure_stability(make(k), Q, b)
    # closed form: dy/db = P_k(Q)  -> ||.||_2 = max_i |P_k(lam_i)|;
    #              dy/dlam_i = P_k'(lam_i) (v_i^T b) v_i  -> ||.||_2 = max_i |P_k'(lam_i)| |v_i^T b|
    lam_ = lam.clone().requires_grad_(True)
    p = theory.transfer(algo, lam_, k, **kw)
    (dp,) = torch.autograd.grad(p.sum(), lam_)
    coef = torch.einsum("bji,bj->bi", V, b)
    assert torch.allclose(measured["b"], p.detach().abs().max(-1).values, rtol=1e-9, atol=1e-12)
    ref_q = (dp.abs() * coef.abs()).max(-1).values / b.norm(dim=-1)
    assert torch.allclose(measured["Q"], ref_q, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("algo,make,kw", CASES[:2])
@pytest.mark.parametrize("k", [2, 6, 15])
def test_sup_stability_attained(algo, make, kw, k):
    """The class-wide constants are attained by a quadratic with an eigenvalue at the arg-sup."""
    beta = kw.get("beta")
    lam_grid = torch.linspace(MU, L, 2001, dtype=torch.float64).requires_grad_(True)
    p = theory.transfer(algo, lam_grid, k, **kw)
    (dp,) = torch.autograd.grad(p.sum(), lam_grid)
    i_b, i_q = int(p.detach().abs().argmax()), int(dp.abs().argmax())
    st = theory.stability(algo, k, MU, L, s=kw["s"], beta=beta)
    for which, idx in (("b", i_b), ("Q", i_q)):
        lam = torch.full((1, 4), 0.5, dtype=torch.float64)
        lam[0, 0] = lam_grid[idx].detach()
        V = random_rotation(1, 4, generator=torch.Generator().manual_seed(idx))
        b = V[:, :, 0] * 2.0  # along the eigenvector of the extremal eigenvalue
        m = theory.measure_stability(make(k), spd_from_eigs(V, lam), b)
        assert m[which].item() == pytest.approx(st[which], rel=1e-8)


def test_gd_stability_and_sensitivity_formulas():
    s = 1.0
    for k in (1, 2, 5, 10, 30):
        st = theory.stability("gd", k, MU, L, s=s)
        assert st["b"] == pytest.approx((1 - (1 - s * MU) ** k) / MU, rel=1e-10)
        assert theory.sensitivity("gd", k, MU, L, s=s) == pytest.approx(k * (1 - s * MU) ** (k - 1), rel=1e-10)
    # faster algorithm, less stable: NAG's Stab_Q exceeds GD's at every k (and both tend to 1/mu^2)
    for k in range(2, 31):
        assert theory.stability("nag", k, MU, L)["Q"] > theory.stability("gd", k, MU, L)["Q"]
    assert theory.stability("nag", 80, MU, L)["Q"] == pytest.approx(1 / MU ** 2, rel=1e-3)


@pytest.mark.parametrize("algo", ["gd", "nag"])
def test_sensitivity_closed_form_equals_finite_differences(algo):
    k = 7
    lam_grid = torch.linspace(MU, L, 2001, dtype=torch.float64)
    st = torch.full_like(lam_grid, 1.0).requires_grad_(True)
    (dp,) = torch.autograd.grad(theory.transfer(algo, lam_grid, k, s=st, mu=MU).sum(), st)
    lam_star = lam_grid[int(dp.abs().argmax())]
    lam = torch.tensor([[float(lam_star), 0.6, 0.9]], dtype=torch.float64)
    V = random_rotation(1, 3, generator=torch.Generator().manual_seed(0))
    Q, b = spd_from_eigs(V, lam), V[:, :, 0].clone()

    def factory(s):
        return GradientDescent(max_iter=k, step_size=s) if algo == "gd" else Nesterov(max_iter=k, step_size=s, mu=MU)

    measured = theory.measure_sensitivity(factory, Q, b, 1.0, eps=1e-6).item()
    assert measured == pytest.approx(theory.sensitivity(algo, k, MU, L, s=1.0), rel=1e-6)


@pytest.mark.parametrize("algo", ["gd", "nag"])
def test_frechet_derivative_matches_autograd_jvp(algo):
    Q, b, _, _ = _random_quadratics(batch=3, n=4, seed=11)
    g = torch.Generator().manual_seed(12)
    dQ = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    dQ = dQ + dQ.transpose(-1, -2)  # symmetric, not commuting with Q
    k = 9
    layer = GradientDescent(max_iter=k) if algo == "gd" else Nesterov(max_iter=k, mu=MU)
    _, jvp = torch.autograd.functional.jvp(lambda q: layer((q, b)), (Q,), (dQ,))
    ref = theory.frechet_derivative(algo, Q, b, dQ, k, s=1.0, mu=MU)
    assert torch.allclose(jvp, ref, atol=1e-10, rtol=1e-8)
    # finite-difference sanity check of the same directional derivative
    eps = 1e-6
    fd = (layer((Q + eps * dQ, b)) - layer((Q - eps * dQ, b))) / (2 * eps)
    assert torch.allclose(fd, ref, atol=1e-6)
    assert math.isfinite(float(ref.abs().max()))


def test_closed_form_rates_equal_analysis_toolkit_measurements():
    """Asymptotic rates: closed form vs dense spectral radius of the update Jacobian (analysis toolkit)."""
    from iterlayers.reasoning import polyak_parameters

    g = torch.Generator().manual_seed(5)
    lam = MU + (L - MU) * torch.rand(3, 5, generator=g, dtype=torch.float64)
    lam[:, 0], lam[:, -1] = MU, L
    V = random_rotation(3, 5, generator=g)
    Q, b = spd_from_eigs(V, lam), torch.randn(3, 5, generator=g, dtype=torch.float64)
    s_hb, beta_hb = polyak_parameters(MU, L)
    cases = [(GradientDescent(max_iter=1, step_size=1.0), theory.asymptotic_rate("gd", MU, L)),
             (Nesterov(max_iter=1, step_size=1.0, mu=MU), theory.asymptotic_rate("nag", MU, L)),
             (HeavyBall(max_iter=1, step_size=s_hb, momentum=beta_hb),
              theory.asymptotic_rate("heavy_ball", MU, L, s=s_hb, beta=beta_hb))]
    for layer, rate in cases:
        rho = theory.measure_asymptotic_rate(layer, Q, b)
        assert torch.allclose(rho, torch.full_like(rho, rate), atol=1e-6)  # NAG: defective double root
    fitted = theory.measure_trace_rate(GradientDescent(max_iter=1), Q, b, max_iter=80)
    assert torch.allclose(fitted, torch.full_like(fitted, 0.9), atol=1e-3)


def test_nag_stab_b_never_overshoots_one_over_mu():
    """NAG's Stab_b is P_k(mu) = (1 - (1 + k sqrt(s mu)) (1 - sqrt(s mu))^k) / mu: increasing in k and below 1/mu
    at every k <= 79 (its maximum there is 1/mu approached from below), i.e. no overshoot at intermediate k."""
    vals = []
    for k in range(1, 80):
        r_mu = (1 + k * math.sqrt(MU)) * (1 - math.sqrt(MU)) ** k
        st = theory.stability("nag", k, MU, L)["b"]
        assert st == pytest.approx((1 - r_mu) / MU, rel=1e-10)  # the sup over [mu, L] sits at lam = mu
        assert st < 1 / MU
        vals.append(st)
    assert all(b > a for a, b in zip(vals[:-1], vals[1:]))
    assert 1 / MU - max(vals) < 1e-9
