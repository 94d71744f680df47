"""The convergence theory of the implicit linear model and its trust-region Newton relation (Kawaguchi 2021)."""
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from iterlayers.analysis import fit_linear_rate
from iterlayers.implicit_linear import (
    ImplicitLinearModel,
    ShallowLinearModel,
    implicit_gradient,
    induced_metric,
    lambda_U,
    min_nonzero_eig,
    pl_constant_square,
    rate_bounds,
    shallow_grad,
    shallow_hessian,
    shallow_loss,
    shallow_optimum,
    theorem_quantities,
    trust_region_newton_step,
    trust_region_subproblem,
)

F64 = torch.float64
PHI = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=F64)
Y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)


def _hand_model():
    model = ImplicitLinearModel(2, 2, 2, gamma=0.5, dtype=F64)  # in == width: phi is the identity
    with torch.no_grad():
        model.A.zero_()  # sigma(A) = 1/2 everywhere
        model.B.copy_(torch.eye(2, dtype=F64))
    return model


@pytest.mark.parametrize("reduction,scale", [("sum", 1.0), ("mean", 1.0 / 3.0)])
def test_theorem_quantities_match_hand_computation(reduction, scale):
    # By hand: Phi^T Phi = [[2, 1], [1, 5]] -> lambda_min = (7 - sqrt 13)/2; I - gamma sigma(A) = [[3/4, -1/4],
    # [-1/4, 3/4]] has singular values 1/2 and 1 -> lambda_min(U U^T) = 1; U = [[3/2, 1/2], [1/2, 3/2]] gives
    # L = 7.5; the least-squares optimum is L* = 1/9; ||sigma(A)||_2 = 1.
    tq = theorem_quantities(_hand_model(), PHI, Y, loss="squared", reduction=reduction)
    lam = (7 - math.sqrt(13)) / 2
    assert tq.lambda_phi == pytest.approx(lam, rel=1e-12)
    assert tq.rank_phi == 2
    assert tq.pl_constant == pytest.approx(4 * lam * scale, rel=1e-12)
    assert tq.lambda_U == pytest.approx(1.0, rel=1e-12)
    assert tq.lambda_U_lower == pytest.approx(4 / 9, rel=1e-12)
    assert tq.lambda_U_worst == pytest.approx(1 / (1 + 0.5 * math.sqrt(2)) ** 2, rel=1e-12)
    assert tq.rate_constant == pytest.approx(4 * lam * scale, rel=1e-12)
    assert tq.loss_value == pytest.approx(7.5 * scale, rel=1e-12)
    assert tq.optimum == pytest.approx(scale / 9, rel=1e-10)
    assert tq.spectral_radius == pytest.approx(0.5, abs=1e-12) and tq.norm_1 == pytest.approx(0.5, abs=1e-12)
    assert all(tq.conditions.values())


def test_pl_inequality_of_square_loss_holds_and_is_tight():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(12, 4, generator=g, dtype=F64)
    y = torch.randn(12, 3, generator=g, dtype=F64)
    opt = shallow_optimum(phi, y)
    mu = pl_constant_square(phi)
    for _ in range(20):
        R = opt.R + torch.randn(3, 4, generator=g, dtype=F64)
        gap = float(shallow_loss(R, phi, y)) - opt.value
        assert float(shallow_grad(R, phi, y).pow(2).sum()) >= mu * gap * (1 - 1e-12)
    # equality along the eigenvector of lambda_min(Phi^T Phi)
    ev, V = torch.linalg.eigh(phi.T @ phi)
    R = opt.R + 0.3 * torch.outer(torch.tensor([1.0, -2.0, 0.5], dtype=F64), V[:, 0])
    gap = float(shallow_loss(R, phi, y)) - opt.value
    assert float(shallow_grad(R, phi, y).pow(2).sum()) == pytest.approx(mu * gap, rel=1e-9)
    # the rank-deficient case uses the smallest *nonzero* eigenvalue
    lam, rank = min_nonzero_eig(torch.cat([phi, phi[:, :1]], dim=1))
    assert rank == 4 and lam > 0


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_shallow_hessian_and_gradient_match_autograd(loss):
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(7, 3, generator=g, dtype=F64)
    y = torch.randn(7, 4, generator=g, dtype=F64) if loss == "squared" else torch.randint(0, 4, (7,), generator=g)
    R = torch.randn(4, 3, generator=g, dtype=F64)
    f = lambda r: shallow_loss(r.reshape(4, 3), phi, y, loss=loss, reduction="mean")  # noqa: E731
    H = torch.autograd.functional.hessian(f, R.reshape(-1))
    torch.testing.assert_close(shallow_hessian(R, phi, y, loss=loss, reduction="mean"), H, rtol=1e-10, atol=1e-12)
    r = R.clone().requires_grad_()
    (gr,) = torch.autograd.grad(shallow_loss(r, phi, y, loss=loss, reduction="mean"), r)
    torch.testing.assert_close(shallow_grad(R, phi, y, loss=loss, reduction="mean"), gr, rtol=1e-12, atol=1e-14)


def test_logistic_optimum_matches_scipy():
    g = torch.Generator().manual_seed(2)
    phi = torch.randn(40, 3, generator=g, dtype=F64)
    labels = torch.randint(0, 3, (40,), generator=g)
    opt = shallow_optimum(phi, labels, loss="logistic", reduction="mean", out_features=3)

    def fun(r):
        R = torch.tensor(r, dtype=F64).reshape(3, 3)
        return float(shallow_loss(R, phi, labels, loss="logistic", reduction="mean")), \
            shallow_grad(R, phi, labels, loss="logistic", reduction="mean").reshape(-1).numpy()

    ref = scipy.optimize.minimize(fun, np.zeros(9), jac=True, method="BFGS", options={"gtol": 1e-12})
    assert opt.value == pytest.approx(ref.fun, rel=1e-9)
    assert opt.grad_norm < 1e-10


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_lambda_U_never_below_its_a_priori_bounds(scale):
    model = ImplicitLinearModel(6, 6, 2, gamma=0.95, init_scale=scale, seed=8, dtype=F64)
    tq = theorem_quantities(model, torch.randn(10, 6, dtype=F64), torch.randn(10, 2, dtype=F64))
    assert tq.lambda_U >= tq.lambda_U_lower * (1 - 1e-12) >= tq.lambda_U_worst * (1 - 1e-12) > 0
    assert tq.rate_constant >= tq.rate_constant_worst * (1 - 1e-12)


def test_lambda_U_fit_rate_and_bounds():
    model = ImplicitLinearModel(4, 4, 2, gamma=0.9, init_scale=3.0, seed=3, dtype=F64)
    M = (np.eye(4) - 0.9 * torch.softmax(model.A.detach(), 0).numpy())
    assert lambda_U(model) == pytest.approx(1 / np.linalg.svd(M, compute_uv=False)[0] ** 2, rel=1e-12)
    gaps = [3.0 * 0.9 ** k for k in range(50)] + [1e-30] * 5
    assert fit_linear_rate(gaps, floor=1e-20, floor_factor=1.0) == pytest.approx(0.9, rel=1e-12)
    b = rate_bounds(0.2, 0.5)
    assert b["flow"] == pytest.approx(math.exp(-0.1)) and b["gd"] == pytest.approx(0.95)
    with pytest.raises(ValueError, match="lr"):
        rate_bounds(0.2, 0.0)


def test_shallow_model_reproduces_the_implicit_model():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g, dtype=F64)
    model = ImplicitLinearModel(5, 3, 7, seed=4, dtype=F64)  # width 3 < 7 outputs
    shallow = ShallowLinearModel.from_implicit(model)
    with torch.no_grad():
        torch.testing.assert_close(shallow(model.features(x)), model(x), rtol=1e-12, atol=1e-12)


def _small_problem(seed=0, gamma=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 6, generator=g, dtype=F64)
    y = torch.randn(24, 5, generator=g, dtype=F64)
    # width 3 < output dimension 5 < number of samples 24
    model = ImplicitLinearModel(6, 3, 5, gamma=gamma, seed=seed, dtype=F64)
    return model, x, y


def test_gradient_descent_converges_linearly_within_the_theorem_bound():
    model, x, y = _small_problem()
    phi = model.features(x).detach()
    opt = shallow_optimum(phi, y, reduction="mean")
    mu = pl_constant_square(phi, reduction="mean")
    beta = 2 * float(torch.linalg.eigvalsh(phi.T @ phi).max()) / 24
    lr = 1 / (beta * float(torch.linalg.eigvalsh(induced_metric(model)).max()))
    gaps, lam_us, suff = [], [], []
    for _ in range(700):
        gA, gB, L = implicit_gradient(model, x, y, reduction="mean", return_loss=True)
        gap = float(L) - opt.value
        if gaps and gaps[-1] > 1e-11 * gaps[0]:
            suff.append((gaps[-1] - gap) / (lr * g2))
        g2 = float(gA.pow(2).sum() + gB.pow(2).sum())
        gaps.append(gap)
        lam_us.append(lambda_U(model))
        with torch.no_grad():
            model.A.sub_(lr * gA)
            model.B.sub_(lr * gB)
    assert gaps[-1] <= 1e-6 * gaps[0]  # L_T - L* <= 1e-6 (L_0 - L*): the global optimum of the shallow model
    c = mu * min(lam_us)
    bounds = rate_bounds(c, lr)
    fitted = fit_linear_rate(gaps, floor=1e-11 * gaps[0], floor_factor=1.0)
    assert fitted < bounds["flow"] < 1
    assert min(suff) >= 0.5  # sufficient decrease at every step certifies the discrete bound below
    for k, gk in enumerate(gaps):
        assert gk <= gaps[0] * bounds["gd"] ** k + 1e-13
        assert gk <= gaps[0] * bounds["flow"] ** k + 1e-13


def test_induced_metric_is_JJT_and_dominates_the_output_layer_part():
    model, _, _ = _small_problem(seed=1, gamma=0.8)
    P = induced_metric(model)

    def r_of(a, b):
        return (b @ torch.linalg.inv(torch.eye(3, dtype=F64) - 0.8 * torch.softmax(a, 0))).reshape(-1)

    ja, jb = torch.autograd.functional.jacobian(r_of, (model.A.detach(), model.B.detach()))
    J = torch.cat([ja.reshape(15, -1), jb.reshape(15, -1)], 1)
    torch.testing.assert_close(P, J @ J.T, rtol=1e-10, atol=1e-12)
    U = model.inverse_factor().detach()
    floor = torch.kron(torch.eye(5, dtype=F64), U.T @ U)
    assert float(torch.linalg.eigvalsh(P - floor).min()) > -1e-10


def test_gradient_flow_of_R_is_preconditioned_shallow_gradient_flow():
    # d vec(R)/dt = -P grad L_R(R): checked by a tiny gradient step of (A, B)
    model, x, y = _small_problem(seed=2)
    phi = model.features(x).detach()
    with torch.no_grad():
        R0 = model.shallow_weight().clone()
    g = shallow_grad(R0, phi, y).reshape(-1)
    predicted = -(induced_metric(model) @ g)
    eta = 1e-7
    gA, gB = implicit_gradient(model, x, y)
    with torch.no_grad():
        model.A.sub_(eta * gA)
        model.B.sub_(eta * gB)
        dR = (model.shallow_weight() - R0).reshape(-1) / eta
    assert float((dR - predicted).norm() / predicted.norm()) < 1e-5


def test_trust_region_subproblem_is_exact():
    g = torch.Generator().manual_seed(5)
    n = 5
    Q = torch.randn(n, n, generator=g, dtype=F64)
    H = Q @ Q.T / n
    W = torch.randn(n, n, generator=g, dtype=F64)
    M = W @ W.T + 0.5 * torch.eye(n, dtype=F64)
    gvec = torch.randn(n, generator=g, dtype=F64)
    obj = lambda v: float(gvec @ v + 0.5 * v @ H @ v)  # noqa: E731
    for radius in (0.05, 0.5, 50.0):
        v, lam = trust_region_subproblem(gvec, H, M, radius)
        # optimality (More-Sorensen): (H + lam M) v = -g, lam >= 0, complementarity
        torch.testing.assert_close((H + lam * M) @ v, -gvec, rtol=1e-8, atol=1e-10)
        vm = float(torch.sqrt(v @ M @ v))
        assert lam >= 0 and vm <= radius * (1 + 1e-9)
        if lam > 0:
            assert vm == pytest.approx(radius, rel=1e-8)
        cons = {"type": "ineq", "fun": lambda z: radius ** 2 - z @ M.numpy() @ z}
        ref = scipy.optimize.minimize(lambda z: obj(torch.tensor(z)), np.zeros(n), constraints=[cons],
                                      method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
        assert obj(v) <= ref.fun + 1e-8
    v, lam = trust_region_subproblem(gvec, H + torch.eye(n, dtype=F64), M, 1e6)
    assert lam == 0.0  # interior: the plain Newton step
    torch.testing.assert_close(v, -torch.linalg.solve(H + torch.eye(n, dtype=F64), gvec))


def test_trust_region_newton_step_matches_the_implicit_step_to_first_order():
    model, x, y = _small_problem(seed=3)
    phi = model.features(x).detach()
    metric = torch.cholesky_inverse(torch.linalg.cholesky(induced_metric(model)))
    gA, gB = implicit_gradient(model, x, y)
    gnorm = float(torch.sqrt(gA.pow(2).sum() + gB.pow(2).sum()))
    with torch.no_grad():
        R0 = model.shallow_weight().clone()
    errs = []
    for eta in (1e-3, 2.5e-4):
        with torch.no_grad():
            A0, B0 = model.A.clone(), model.B.clone()
            model.A.sub_(eta * gA)
            model.B.sub_(eta * gB)
            R1 = model.shallow_weight().clone()
            model.A.copy_(A0)
            model.B.copy_(B0)
        R_tr, info = trust_region_newton_step(R0, phi, y, metric=metric, radius=eta * gnorm)
        assert info["lam"] > 0  # the trust region is active: the step is a constrained Newton step
        errs.append(float((R_tr - R1).norm() / (R1 - R0).norm()))
    order = math.log(errs[0] / errs[1]) / math.log(4.0)
    assert errs[1] < 0.01 and 0.8 < order < 1.3


def test_lambda_U_range_matches_numpy_svd():
    from iterlayers.implicit_linear import lambda_U_range

    model = ImplicitLinearModel(5, 5, 2, gamma=0.6, init_scale=2.0, seed=9, dtype=F64)
    s = np.linalg.svd(np.eye(5) - 0.6 * torch.softmax(model.A.detach(), 0).numpy(), compute_uv=False)
    lo, hi = lambda_U_range(model)
    assert lo == pytest.approx(1 / s[0] ** 2, rel=1e-12) and hi == pytest.approx(1 / s[-1] ** 2, rel=1e-12)
    assert lo == pytest.approx(lambda_U(model), rel=1e-12)


def test_logistic_infimum_attained_by_linear_programming():
    from iterlayers.implicit_linear import logistic_infimum_attained

    col = lambda *v: torch.tensor([[float(a)] for a in v], dtype=F64)  # noqa: E731
    lab = lambda *v: torch.tensor(v)  # noqa: E731
    sep = logistic_infimum_attained(col(1, 2, -1, -2), lab(0, 0, 1, 1))
    assert sep == {"attained": False, "separable": True, "max_margin_sum": sep["max_margin_sum"]}
    overlap = logistic_infimum_attained(col(1, 1, -1, -1), lab(0, 1, 0, 1))
    assert overlap["attained"] and not overlap["separable"]
    # quasi-separation: two points at phi = 0 carry both labels (no margin ever), the others separate
    quasi = logistic_infimum_attained(col(1, 0, 0, -1), lab(0, 0, 1, 1))
    assert not quasi["attained"] and not quasi["separable"] and quasi["max_margin_sum"] > 0.5
    g = torch.Generator().manual_seed(3)
    # N <= m in general position: any labelling is separable; the damped Newton norm keeps growing
    phi = torch.randn(6, 8, generator=g, dtype=F64)
    labels = torch.randint(0, 3, (6,), generator=g)
    assert not logistic_infimum_attained(phi, labels, num_classes=3)["attained"]
    norms = [float(shallow_optimum(phi, labels, loss="logistic", out_features=3, max_iter=k).R.norm())
             for k in (5, 20)]
    assert norms[1] > norms[0] + 1.0
    # N >> m with random labels: attained, and Newton converges to a stationary point of finite norm
    phi = torch.randn(200, 2, generator=g, dtype=F64)
    labels = torch.randint(0, 3, (200,), generator=g)
    assert logistic_infimum_attained(phi, labels, num_classes=3)["attained"]
    assert shallow_optimum(phi, labels, loss="logistic", out_features=3).grad_norm < 1e-8


def test_nearest_least_squares_is_where_shallow_gradient_descent_goes():
    from iterlayers.implicit_linear import nearest_least_squares

    g = torch.Generator().manual_seed(4)
    phi = torch.randn(5, 9, generator=g, dtype=F64)  # N < m: many interpolants
    T = torch.randn(5, 3, generator=g, dtype=F64)
    R0 = torch.randn(3, 9, generator=g, dtype=F64)
    R_mn = nearest_least_squares(phi, T)
    torch.testing.assert_close(R_mn, (torch.linalg.pinv(phi) @ T).T, rtol=1e-10, atol=1e-12)
    R_near = nearest_least_squares(phi, T, R0)
    torch.testing.assert_close(phi @ R_near.T, T, rtol=1e-10, atol=1e-10)  # an interpolant
    R = R0.clone()
    lr = 1.0 / float(torch.linalg.eigvalsh(2 * phi.T @ phi).max())
    for _ in range(3000):
        R = R - lr * shallow_grad(R, phi, T)
    torch.testing.assert_close(R, R_near, rtol=1e-8, atol=1e-9)
    assert float((R - R_mn).norm()) > 0.1  # ... which is not the minimum-norm one when R0 != 0


def test_new_theory_helpers_reject_bad_shapes_with_typed_errors():
    from iterlayers.errors import ShapeMismatchError, ValidationError
    from iterlayers.implicit_linear import logistic_infimum_attained, nearest_least_squares

    phi = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ShapeMismatchError, match="labels"):
        logistic_infimum_attained(phi, torch.tensor([0, 1]))
    with pytest.raises(ValidationError, match="integer"):
        logistic_infimum_attained(phi, torch.zeros(4))
    with pytest.raises(ShapeMismatchError, match="targets"):
        nearest_least_squares(phi, torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ShapeMismatchError, match="R0"):
        nearest_least_squares(phi, torch.zeros(4, 2, dtype=F64), torch.zeros(3, 3, dtype=F64))
