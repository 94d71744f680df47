"""Relaxed Picard iteration (Zappala et al., arXiv 2310.01618, Sec. 3) against closed forms, the core solvers,
SciPy's fixed_point and the Banach rate alpha + (1 - alpha) q."""
import math

import numpy as np
import pytest
import scipy.optimize
import torch

import iterlayers as il
from iterlayers.analysis import fit_linear_rate
from iterlayers.operators import PicardIteration, check_convergence, make_schedule, relaxed_picard



@pytest.fixture(autouse=True)
def _float64():
    """float64 for the exactness checks, restored afterwards so no other test module is affected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _sym_contraction(n: int, q: float, seed: int = 0):
    """Symmetric W with spectrum in [-q, q], top eigenvalue exactly +q; returns W and its top eigenvector."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.linspace(-0.9 * q, q, n, dtype=torch.float64)
    return Q @ torch.diag(ev) @ Q.T, Q[:, -1]


class Linear:
    """T(z, x) = z W^T + x: a q-contraction with fixed point z* = x (I - W)^{-T}."""

    def __init__(self, W):
        self.W = W

    def __call__(self, z, x):
        return z @ self.W.T + x


def test_converges_to_closed_form_core_solvers_and_scipy():
    n, q, alpha = 6, 0.7, 0.3
    W, _ = _sym_contraction(n, q)
    T = Linear(W)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(torch.eye(n) - W, x.T).T
    z, stats, _ = relaxed_picard(T, torch.zeros_like(x), x, alpha=alpha, max_iter=400, tol=1e-13)
    assert bool(stats.converged.all()) and int(stats.nstep.max()) < 400
    torch.testing.assert_close(z, exact, atol=1e-11, rtol=0)
    for solver in ("picard", "anderson"):
        sol = il.solve(lambda w: T(w, x), torch.zeros_like(x), solver=solver, atol=1e-12, rtol=0, max_iter=500,
                       on_failure="raise")
        torch.testing.assert_close(z, sol.z, atol=1e-9, rtol=0)
    Wn, xn = W.numpy(), x.numpy()
    # SciPy's plain iteration of the relaxed map R_a (its default del2 acceleration is componentwise)
    ref = scipy.optimize.fixed_point(lambda v: alpha * v + (1 - alpha) * (v @ Wn.T + xn), np.zeros_like(xn),
                                     xtol=1e-13, maxiter=2000, method="iteration")
    np.testing.assert_allclose(z.numpy(), ref, atol=1e-10)


def test_banach_rate_is_attained_on_the_top_eigenvector():
    n, q = 5, 0.6
    W, v = _sym_contraction(n, q, seed=3)
    T = Linear(W)
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(4))
    z_star = torch.linalg.solve(torch.eye(n) - W, x.T).T
    for alpha in (0.0, 0.25, 0.6):
        rho = alpha + (1 - alpha) * q
        # generic start: the error never shrinks slower than the Banach bound
        z0 = torch.randn(1, n, generator=torch.Generator().manual_seed(5))
        _, _, tr = relaxed_picard(T, z0, x, alpha=alpha, max_iter=30, return_iterates=True)
        errs = [float((t - z_star).norm()) for t in tr]
        for k, e in enumerate(errs):
            assert e <= rho ** k * errs[0] * (1 + 1e-10)
        # start on the top eigenvector: the error contracts by exactly rho per step
        _, _, tr = relaxed_picard(T, z_star + v[None], x, alpha=alpha, max_iter=10, return_iterates=True)
        ratios = [float((b - z_star).norm() / (a - z_star).norm()) for a, b in zip(tr, tr[1:])]
        np.testing.assert_allclose(ratios, rho, rtol=1e-10)


def test_nonlinear_operator_rates_and_check_convergence_dense():
    n, q, alpha = 4, 0.8, 0.4
    W, _ = _sym_contraction(n, q, seed=7)

    def T(z, x):
        return torch.tanh(z @ W.T + x)

    x = 0.5 * torch.randn(2, n, generator=torch.Generator().manual_seed(8))
    z, st, _ = relaxed_picard(T, torch.zeros_like(x), x, alpha=alpha, max_iter=500, tol=1e-14)
    sol = il.solve(lambda w: T(w, x), torch.zeros_like(x), solver="anderson", atol=1e-13, rtol=0, max_iter=300)
    torch.testing.assert_close(z, sol.z, atol=1e-10, rtol=0)
    chk = check_convergence(T, z, x, alpha=alpha, method="dense")
    # closed form: J = diag(1 - tanh^2) W at the fixed point
    for b in range(2):
        J = torch.diag(1 - z[b] ** 2) @ W
        qb = torch.linalg.matrix_norm(J, ord=2)
        rb = torch.linalg.eigvals(alpha * torch.eye(n) + (1 - alpha) * J).abs().max()
        assert math.isclose(float(chk.q[b]), float(qb), rel_tol=1e-10)
        assert math.isclose(float(chk.banach_rate[b]), alpha + (1 - alpha) * float(qb), rel_tol=1e-10)
        assert math.isclose(float(chk.local_rate[b]), float(rb), rel_tol=1e-8)
    assert bool(chk.contractive.all()) and bool(chk.convergent.all())
    # the observed asymptotic rate of the iteration is the local rate (worst sample)
    _, st2, _ = relaxed_picard(T, torch.zeros_like(x), x, alpha=alpha, max_iter=60, return_trace=True)
    worst = st2.trace_tensor().max(dim=1).values  # the largest residual of the batch at each step
    assert abs(fit_linear_rate(worst, tail=0.5, floor_factor=None) - float(chk.local_rate.max())) < 2e-3
    power = check_convergence(T, z, x, alpha=alpha, method="power", max_iter=500, tol=1e-10)
    torch.testing.assert_close(power.q, chk.q, atol=1e-6, rtol=0)


def test_check_convergence_flags_an_expansive_operator():
    W = torch.diag(torch.tensor([1.5, -0.5]))
    chk = check_convergence(lambda z, x: z @ W.T, torch.ones(1, 2), alpha=0.2, method="dense")
    assert math.isclose(float(chk.q), 1.5) and not bool(chk.contractive)
    assert math.isclose(float(chk.local_rate), 0.2 + 0.8 * 1.5) and not bool(chk.convergent)


def test_module_fixed_adaptive_and_implicit_gradient_agree():
    n, alpha = 5, 0.5
    W, _ = _sym_contraction(n, 0.5, seed=11)
    T = Linear(W)
    x0 = torch.randn(2, n, generator=torch.Generator().manual_seed(12))
    fixed = PicardIteration(T, alpha=alpha, max_iter=7)
    fixed(x0)
    assert fixed.stats["forward"].nstep.tolist() == [7, 7] and fixed.stats["backward"] is None
    adaptive = PicardIteration(T, alpha=alpha, max_iter=500, tol=1e-12)
    z_a = adaptive(x0)
    st = adaptive.stats["forward"]
    assert bool(st.converged.all()) and int(st.nstep.max()) < 500
    assert float(st.rel_residual.max()) <= 1e-12
    fz = T(z_a, x0)  # measured here, not read from the engine
    assert float(((fz - z_a).norm(dim=1) / fz.norm(dim=1)).max()) <= 1e-12
    exact = torch.linalg.solve(torch.eye(n) - W, x0.T).T
    torch.testing.assert_close(z_a, exact, atol=1e-10, rtol=0)
    # gradient of a loss w.r.t. x: unrolled (long) vs implicit through the core; closed form (I - W)^{-T} g
    g = torch.randn(2, n, generator=torch.Generator().manual_seed(13))
    grads = []
    for layer in (PicardIteration(T, alpha=alpha, max_iter=200),
                  PicardIteration(T, alpha=alpha, max_iter=200, tol=1e-12, backward="implicit", solver="anderson")):
        x = x0.clone().requires_grad_(True)
        (layer(x) * g).sum().backward()
        grads.append(x.grad)
        if layer.backward == "implicit":  # the core solver's stats are reported
            st = layer.stats["forward"]
            assert bool(st.converged.all()) and 0 < int(st.nstep.max()) < 200
            assert layer.stats["backward"] is not None and bool(layer.stats["backward"].converged.all())
    closed = torch.linalg.solve(torch.eye(n) - W, g.T).T  # W symmetric
    torch.testing.assert_close(grads[0], closed, atol=1e-9, rtol=0)
    torch.testing.assert_close(grads[1], closed, atol=1e-7, rtol=0)


def test_jfb_gradient_is_one_relaxed_step_at_the_fixed_point():
    n, alpha = 4, 0.3
    W, _ = _sym_contraction(n, 0.5, seed=21)
    layer = PicardIteration(Linear(W), alpha=alpha, max_iter=300, tol=1e-12, backward="jfb", solver="anderson")
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(22), requires_grad=True)
    g = torch.randn(2, n, generator=torch.Generator().manual_seed(23))
    z = layer(x)
    torch.testing.assert_close(z, torch.linalg.solve(torch.eye(n) - W, x.detach().T).T, atol=1e-10, rtol=0)
    (z * g).sum().backward()
    # Jacobian-free backprop differentiates only the last application of R_a: d/dx = (1 - a) I
    torch.testing.assert_close(x.grad, (1 - alpha) * g, atol=1e-12, rtol=0)


def test_learnable_alpha_stays_in_open_unit_interval_and_has_the_right_gradient():
    W, _ = _sym_contraction(3, 0.5, seed=2)
    layer = PicardIteration(Linear(W), alpha=0.5, learnable_alpha=True, max_iter=3)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    # finite-difference check of d loss / d theta (alpha = sigmoid(theta))
    theta = layer.alpha_logit.detach().clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda th: _loss_with_logit(layer, x, th), (theta,))
    (g_layer,) = torch.autograd.grad((layer(x) ** 2).sum(), layer.alpha_logit)
    (g_ref,) = torch.autograd.grad(_loss_with_logit(layer, x, theta), theta)
    torch.testing.assert_close(g_layer, g_ref)
    opt = torch.optim.SGD(layer.parameters(), lr=1e3)
    for sign in (1.0, -1.0):
        for _ in range(20):
            opt.zero_grad()
            (sign * layer(x).sum()).backward()
            opt.step()
            a = float(layer.alpha.detach())
            assert 0.0 < a < 1.0
        assert min(abs(a - 0.999), abs(a - 0.001)) < 1e-6  # the huge steps drove it onto a bound, not past


def _loss_with_logit(layer, x, theta):
    a = 1e-3 + 0.998 * torch.sigmoid(theta)
    z = relaxed_picard(layer.operator, torch.zeros_like(x), x, alpha=a, max_iter=3).z
    return (z ** 2).sum()


def test_schedule_is_applied_step_by_step():
    sched = make_schedule("linear", 3, start=0.2, end=0.6)
    assert sched == pytest.approx((0.2, 0.4, 0.6))
    T = lambda z, x: 2 * z + 1  # noqa: E731
    layer = PicardIteration(T, alpha=sched)
    z = torch.zeros(1, 1)
    for a in sched:
        z = a * z + (1 - a) * T(z, None)
    torch.testing.assert_close(layer(None, z0=torch.zeros(1, 1)), z)


def test_schedule_iteration_count_is_max_iter_without_alias():
    """#14: the iteration count (the paper's N) is ``max_iter``; the old name is gone, bad counts are typed errors."""
    assert len(make_schedule("sigmoid", max_iter=7)) == 7
    with pytest.raises(TypeError):
        make_schedule("sigmoid", num_iter=7)
    with pytest.raises(il.ValidationError, match="max_iter"):
        make_schedule("linear", 0)
    with pytest.raises(il.OptionTypeError, match="max_iter"):
        make_schedule("linear", 2.5)


def test_the_rate_fit_recovers_a_geometric_sequence():
    assert fit_linear_rate([3 * 0.7 ** k for k in range(20)], tail=0.5, floor_factor=None) == pytest.approx(
        0.7, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.0), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(backward="adjoint"), "backward"),
    (dict(alpha=(0.3, 0.5), learnable_alpha=True), "learnable_alpha"), (dict(max_iter=0), "max_iter"),
    (dict(tol=-1.0), "tol"), (dict(alpha=(0.3, 0.5), backward="implicit"), "backward"),
    (dict(solver="newton"), "solver"),
])
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PicardIteration(lambda z, x: z, **kwargs)


def test_float32_and_no_grad():
    W, _ = _sym_contraction(3, 0.5)
    T = Linear(W.float())
    x = torch.randn(2, 3, dtype=torch.float32)
    with torch.no_grad():
        z = PicardIteration(T, alpha=0.5, max_iter=100)(x)
    assert z.dtype == torch.float32 and not z.requires_grad
    torch.testing.assert_close(z, torch.linalg.solve(torch.eye(3) - W, x.double().T).T.float(), atol=1e-5, rtol=0)
