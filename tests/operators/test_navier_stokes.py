"""The pseudo-spectral vorticity solver against closed forms (advection term, Taylor-Green decay) and the
conservation laws of the dealiased Galerkin system (energy, enstrophy, mean vorticity, energy budget)."""
import math

import pytest
import torch

from iterlayers.errors import ShapeMismatchError, ValidationError
from iterlayers.operators.navier_stokes import (VorticitySolver, energy, enstrophy, fno_forcing,
                                                 gaussian_random_field, grid, navier_stokes_pairs)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_advection_term_matches_its_closed_form():
    # w = sin(2 pi x) + cos(4 pi y): psi = sin(2 pi x)/(4 pi^2) + cos(4 pi y)/(16 pi^2), u = psi_y, v = -psi_x,
    # so u w_x + v w_y = 1.5 cos(2 pi x) sin(4 pi y) (derived by hand)
    n = 16
    x, y = grid(n)
    w = torch.sin(2 * math.pi * x) + torch.cos(4 * math.pi * y)
    s = VorticitySolver(n, nu=0.0)
    adv = torch.fft.irfft2(s.advection(torch.fft.rfft2(w)), s=(n, n))
    torch.testing.assert_close(adv, 1.5 * torch.cos(2 * math.pi * x) * torch.sin(4 * math.pi * y), atol=1e-12, rtol=0)


def test_taylor_green_decays_at_the_viscous_rate():
    n, nu, t = 16, 0.01, 1.0
    x, y = grid(n)
    w0 = torch.cos(2 * math.pi * x) * torch.cos(2 * math.pi * y)
    s = VorticitySolver(n, nu=nu, dt=0.01)
    exact = w0 * math.exp(-nu * 8 * math.pi ** 2 * t)
    # Crank-Nicolson's error on this mode: 100 steps of (1-d)/(1+d) vs exp(-2d), 2d = nu 8 pi^2 dt, ~ 3e-6
    assert _rel(s.run(w0, t), exact) < 1e-5
    # the field is steady under advection (w proportional to psi) but a second shell is not: the test can fail
    assert float(s.advection(torch.fft.rfft2(w0)).abs().max()) < 1e-10
    w1 = w0 + torch.sin(4 * math.pi * x)
    assert float(s.advection(torch.fft.rfft2(w1)).abs().max()) > 1.0


def test_inviscid_unforced_flow_conserves_energy_enstrophy_and_mean():
    w0 = gaussian_random_field(4, 32, seed=3)
    s = VorticitySolver(32, nu=0.0, dt=0.01)
    wt = s.run(w0, 1.0)
    assert _rel(wt, w0) > 0.1  # the flow moved
    assert float(((energy(wt) - energy(w0)) / energy(w0)).abs().max()) < 1e-5
    assert float(((enstrophy(wt) - enstrophy(w0)) / enstrophy(w0)).abs().max()) < 1e-4
    assert float(wt.mean(dim=(-2, -1)).abs().max()) < 1e-12
    # dealiased: the state never leaves the 2/3-rule band (|m_x|, |m_y| < n / 3)
    coef = torch.fft.rfft2(wt).abs()
    assert float(coef[:, ~s.keep].max()) < 1e-12 * float(coef.max())


def test_viscous_energy_budget_dE_dt_is_minus_two_nu_Z():
    nu, t, k = 0.01, 0.5, 50
    w0 = gaussian_random_field(3, 32, seed=4)
    traj = VorticitySolver(32, nu=nu, dt=0.005).run(w0, t, snapshots=k)  # [k + 1, B, n, n]
    E, Z = energy(traj), enstrophy(traj)  # [k + 1, B]
    h = t / k
    dissipated = 2 * nu * h * (Z[1:] + Z[:-1]).sum(0) / 2  # trapezoid
    lost = E[0] - E[-1]
    assert float(lost.min()) > 0
    torch.testing.assert_close(lost, dissipated, rtol=1e-3, atol=0)


def test_forced_pairs_are_seeded_and_finite():
    a0, at = navier_stokes_pairs(3, n=16, t=0.2, dt=0.05, seed=1)
    b0, bt = navier_stokes_pairs(3, n=16, t=0.2, dt=0.05, seed=1)
    assert a0.shape == at.shape == (3, 16, 16) and a0.dtype == torch.float32
    assert torch.equal(a0, b0) and torch.equal(at, bt) and torch.isfinite(at).all()
    # the forcing is the FNO's, and it changes the flow
    f = fno_forcing(16)
    free = VorticitySolver(16, nu=1e-3, dt=0.05).run(a0.double(), 0.2)
    forced = VorticitySolver(16, nu=1e-3, dt=0.05, forcing=f).run(a0.double(), 0.2)
    assert _rel(forced, free) > 1e-3


def test_bad_inputs_are_named():
    with pytest.raises(ShapeMismatchError, match="forcing"):
        VorticitySolver(16, forcing=torch.zeros(8, 8))
    with pytest.raises(ValidationError, match="multiple of dt"):
        VorticitySolver(16, dt=0.1).run(torch.zeros(16, 16), 0.25)
    with pytest.raises(ShapeMismatchError, match="w0"):
        VorticitySolver(16).run(torch.zeros(2, 8, 8), 0.1)
    with pytest.raises(ValidationError, match="nu"):
        VorticitySolver(16, nu=-1.0)
