"""Kawaguchi's implicit linear model: well-posedness, direct vs iterative equilibrium, exact gradients."""
import pytest
import torch

from iterlayers.implicit_linear import (
    EquilibriumCell,
    ImplicitLinearModel,
    column_softmax,
    implicit_gradient,
    logistic_loss,
    loss_grad,
    squared_loss,
)

F64 = torch.float64


def _data(n=9, d=6, my=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, my, generator=g, dtype=dtype),
            torch.randint(0, my, (n,), generator=g))


def test_column_softmax_is_column_stochastic_and_matches_formula():
    a = torch.randn(5, 5, dtype=F64) * 3
    s = column_softmax(a)
    expected = torch.exp(a) / torch.exp(a).sum(0, keepdim=True)
    torch.testing.assert_close(s, expected, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(s.sum(0), torch.ones(5, dtype=F64), rtol=0, atol=1e-14)
    assert (s > 0).all()
    with pytest.raises(ValueError, match="square"):
        column_softmax(torch.zeros(2, 3))


@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0, 10.0, 100.0])
def test_equilibrium_exists_and_is_unique_for_any_weights(scale):
    x, _, _ = _data(n=7, d=5)
    model = ImplicitLinearModel(5, 5, 2, gamma=0.9, init_scale=scale, seed=3, dtype=F64, solver="anderson")
    cf = model.contraction_factor()
    # columns of sigma(A) sum to one: ||gamma sigma(A)||_1 = gamma, and 1 is an eigenvalue of sigma(A)^T
    assert cf["norm_1"] == pytest.approx(0.9, abs=1e-12)
    assert cf["spectral_radius"] == pytest.approx(0.9, abs=1e-9)
    with torch.no_grad():
        z = model.equilibrium_point(x, method="direct")
        u = model.features(x)
        S = model.weight_map()
        torch.testing.assert_close(z, 0.9 * z @ S.T + u, rtol=0, atol=1e-12)
        # the Neumann series sum_l (gamma S)^l u converges to the same point (infinite weight-tied depth)
        zl = torch.zeros_like(u)
        for _ in range(400):
            zl = 0.9 * zl @ S.T + u
        torch.testing.assert_close(zl, z, rtol=0, atol=1e-10)
        # iterative solves from very different starts all land on the direct solution: uniqueness
        for z0 in (torch.zeros_like(u), 100.0 * torch.randn_like(u), -u):
            zi = model.equilibrium_point(x, method="iterative", z0=z0)
            torch.testing.assert_close(zi, z, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("solver", ["anderson", "picard", "broyden"])
def test_direct_and_iterative_agree(dtype, atol, solver):
    x, _, _ = _data(n=16, d=8, dtype=dtype)
    model = ImplicitLinearModel(8, 6, 4, gamma=0.8, seed=1, dtype=dtype, solver=solver, max_iter=300)
    with torch.no_grad():
        fd = model(x, method="direct")
        fi = model(x, method="iterative")
    assert fd.dtype == dtype and fd.shape == (16, 4)
    torch.testing.assert_close(fi, fd, rtol=0, atol=atol)
    assert bool(model.stats["forward"].converged.all())


@pytest.mark.parametrize("loss,reduction", [("squared", "sum"), ("squared", "mean"), ("logistic", "sum"),
                                            ("logistic", "mean")])
def test_closed_form_gradient_equals_autograd_and_core_implicit_backward(loss, reduction):
    x, yr, yl = _data(n=10, d=6, my=3)
    y = yr if loss == "squared" else yl
    model = ImplicitLinearModel(6, 4, 3, gamma=0.85, init_scale=2.0, seed=2, dtype=F64, atol=1e-13)
    gA, gB = implicit_gradient(model, x, y, loss=loss, reduction=reduction)
    for method, tol in (("direct", 1e-11), ("iterative", 1e-9)):
        model.zero_grad()
        model.loss(x, y, loss=loss, reduction=reduction, method=method).backward()
        torch.testing.assert_close(model.A.grad, gA, rtol=0, atol=tol)
        torch.testing.assert_close(model.B.grad, gB, rtol=0, atol=tol)
    assert model.stats["backward"] is not None and bool(model.stats["backward"].converged.all())


def test_closed_form_gradient_matches_central_finite_differences():
    x, yr, _ = _data(n=8, d=5, my=2, seed=4)
    model = ImplicitLinearModel(5, 3, 2, gamma=0.7, init_scale=1.5, seed=5, dtype=F64)
    gA, gB = implicit_gradient(model, x, yr)
    h = 1e-6
    for param, grad in ((model.A, gA), (model.B, gB)):
        for idx in [(0, 0), (1, 2), (param.shape[0] - 1, 1)]:
            with torch.no_grad():
                old = param[idx].item()
                param[idx] = old + h
                lp = float(model.loss(x, yr))
                param[idx] = old - h
                lm = float(model.loss(x, yr))
                param[idx] = old
            assert (lp - lm) / (2 * h) == pytest.approx(float(grad[idx]), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("method,atol", [("direct", 1e-7), ("iterative", 1e-5)])
def test_gradcheck_float64_through_the_equilibrium(method, atol):
    x, yr, _ = _data(n=5, d=3, my=2, seed=6)
    model = ImplicitLinearModel(3, 3, 2, gamma=0.6, seed=7, dtype=F64, atol=1e-13, max_iter=400)

    def loss(a, b):
        out = torch.func.functional_call(model, {"cell.A": a, "B": b}, (x,), {"method": method})
        return squared_loss(out, yr)

    a = model.A.detach().clone().requires_grad_()
    b = model.B.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, (a, b), eps=1e-6, atol=atol)


def test_losses_and_their_gradients():
    q = torch.randn(4, 3, dtype=F64, requires_grad=True)
    lab = torch.tensor([0, 2, 1, 2])
    onehot = torch.nn.functional.one_hot(lab, 3).to(F64)
    qd = q.detach()
    assert float(squared_loss(qd, onehot)) == pytest.approx(float(((qd - onehot) ** 2).sum()))
    ref = torch.nn.functional.cross_entropy(qd, lab, reduction="sum")
    assert float(logistic_loss(qd, lab)) == pytest.approx(float(ref), rel=1e-13)
    assert float(logistic_loss(qd, lab, reduction="mean")) == pytest.approx(float(ref) / 4, rel=1e-13)
    for kind, y in (("squared", onehot), ("logistic", lab)):
        (g_auto,) = torch.autograd.grad((squared_loss if kind == "squared" else logistic_loss)(q, y), q)
        torch.testing.assert_close(loss_grad(kind, q.detach(), y), g_auto, rtol=1e-12, atol=1e-14)


def test_feature_maps_and_shapes():
    x = torch.randn(4, 2, 3, dtype=F64)
    ident = ImplicitLinearModel(6, 6, 2, dtype=F64)
    torch.testing.assert_close(ident.features(x), x.reshape(4, 6))
    proj = ImplicitLinearModel(6, 3, 2, dtype=F64, seed=0)
    assert proj.features(x).shape == (4, 3)
    assert not any(p.requires_grad for p in proj.phi.parameters())
    lin = torch.nn.Linear(6, 4).double()
    custom = ImplicitLinearModel(torch.nn.Sequential(torch.nn.Flatten(), lin), 4, 2, dtype=F64)
    assert not lin.weight.requires_grad  # phi is fixed, as in the paper
    assert custom(x).shape == (4, 2)
    bad = ImplicitLinearModel(lambda t: t.reshape(t.shape[0], -1), 5, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        bad(x)
    # the end-to-end map R = B U reproduces the model: f(x) = R phi(x)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), proj.features(x) @ proj.shallow_weight().T, rtol=1e-12, atol=1e-12)


def test_options_are_validated():
    with pytest.raises(ValueError, match="gamma"):
        ImplicitLinearModel(3, 3, 1, gamma=1.0)
    with pytest.raises(ValueError, match="gamma"):
        EquilibriumCell(3, gamma=0.0)
    with pytest.raises(ValueError, match="equilibrium"):
        ImplicitLinearModel(3, 3, 1, equilibrium="newton")
    with pytest.raises(ValueError, match="width"):
        ImplicitLinearModel(3, 0, 1)
    with pytest.raises(TypeError, match="features"):
        ImplicitLinearModel("x", 3, 1)
    with pytest.raises(ValueError, match="backward"):
        ImplicitLinearModel(3, 3, 1, backward="adjoint")
    model = ImplicitLinearModel(3, 3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="loss"):
        model.loss(x, torch.zeros(4, 2), loss="hinge")
    with pytest.raises(ValueError, match="reduction"):
        model.loss(x, torch.zeros(4, 2), reduction="max")
    with pytest.raises(ValueError, match="labels"):
        model.loss(x, torch.tensor([0, 1, 2, 3]), loss="logistic")
    with pytest.raises(ValueError, match="method"):
        model.equilibrium_point(x, method="fast")


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_batched_equilibrium_gradient_equals_one_model_at_a_time_and_autograd(loss):
    from iterlayers.implicit_linear import equilibrium_gradient

    g = torch.Generator().manual_seed(11)
    models = [ImplicitLinearModel(4, 4, 3, gamma=0.7, seed=s, dtype=torch.float64) for s in range(3)]
    phi = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 9), generator=g)
    A = torch.stack([m.A.detach() for m in models])
    B = torch.stack([m.B.detach() for m in models])
    gA, gB, L = equilibrium_gradient(A, B, phi, y, gamma=0.7, loss=loss, reduction="mean")
    assert L.shape == (3,)
    for i, m in enumerate(models):
        value = m.loss(phi[i], y[i], loss=loss, reduction="mean", method="direct")
        ra, rb = torch.autograd.grad(value, (m.A, m.B))
        torch.testing.assert_close(gA[i], ra, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gB[i], rb, rtol=1e-10, atol=1e-12)
        assert float(L[i]) == pytest.approx(float(value.detach()), rel=1e-12)  # one mean loss per model


@pytest.mark.parametrize("targets", ["labels", "real"])
def test_moment_gradient_of_the_square_loss_equals_autograd(targets):
    """The N-free form (loss and gradient from Phi^T Phi, Phi^T Y, ||Y||^2) against autograd through the direct
    solve, one model per batch index, with integer labels and with real-valued targets."""
    from iterlayers.implicit_linear import square_moment_gradient, square_moments

    g = torch.Generator().manual_seed(12)
    models = [ImplicitLinearModel(5, 5, 3, gamma=0.6, seed=s, dtype=torch.float64) for s in range(2)]
    phi = torch.randn(2, 11, 5, generator=g, dtype=torch.float64)
    y = (torch.randint(0, 3, (2, 11), generator=g) if targets == "labels"
         else torch.randn(2, 11, 3, generator=g, dtype=torch.float64))
    A = torch.stack([m.A.detach() for m in models])
    B = torch.stack([m.B.detach() for m in models])
    gA, gB, L = square_moment_gradient(A, B, square_moments(phi, y, 3), gamma=0.6)
    for i, m in enumerate(models):
        value = m.loss(phi[i], y[i], loss="squared", reduction="mean", method="direct")
        ra, rb = torch.autograd.grad(value, (m.A, m.B))
        torch.testing.assert_close(gA[i], ra, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gB[i], rb, rtol=1e-10, atol=1e-12)
        assert float(L[i]) == pytest.approx(float(value.detach()), rel=1e-12)


def test_iterative_path_is_configured_by_one_deq_options_value(monkeypatch):
    """The core's options come as one DEQOptions value (or keyword shortcuts for its fields), built and validated
    once in __init__, and the iterative path solves through the core with exactly that value."""
    import iterlayers.implicit_linear.model as model_module
    from iterlayers import DEQOptions

    x, _, _ = _data(n=6, d=5)
    o = DEQOptions(solver="picard", atol=1e-11, rtol=0.0, max_iter=3000, on_failure="raise")
    model = ImplicitLinearModel(5, 5, 2, gamma=0.8, seed=1, dtype=F64, equilibrium="iterative", options=o)
    assert model.options is o
    seen = []
    real = model_module.deq_solve

    def spy(f, z0, **kw):
        seen.append(kw)
        return real(f, z0, **kw)

    monkeypatch.setattr(model_module, "deq_solve", spy)
    with torch.no_grad():
        z = model.equilibrium_point(x)
        model.equilibrium_point(x)
    assert [set(kw) for kw in seen] == [{"args", "options", "stats"}] * 2
    assert all(kw["options"] is o for kw in seen)  # the same value every call: nothing rebuilt per forward
    # the residual measured here, not by the solver: Picard (rate gamma = 0.8) to 1e-11 takes > 50 steps,
    # Anderson (the core's default solver) far fewer, so the step count shows which solver ran
    with torch.no_grad():
        residual = z - (z @ model.cell.matrix().T + model.features(x))
    assert float(residual.norm(dim=1).max()) <= 1e-10
    assert int(model.stats["forward"].nstep.min()) > 50 and bool(model.stats["forward"].converged.all())
    # keyword shortcuts apply on top of the value
    short = ImplicitLinearModel(5, 5, 2, seed=1, dtype=F64, equilibrium="iterative", options=o, max_iter=4,
                                on_failure="ignore")
    assert short.options.solver == "picard" and short.options.max_iter == 4 and o.max_iter == 3000
    with torch.no_grad():
        short(x)
    assert int(short.stats["forward"].nstep.max()) == 4 and not bool(short.stats["forward"].converged.any())


def test_model_defaults_and_option_errors():
    from iterlayers.errors import OptionTypeError, ValidationError

    for dtype, atol in ((F64, 1e-12), (torch.float32, 1e-6)):
        o = ImplicitLinearModel(3, 3, 2, dtype=dtype).options
        assert (o.atol, o.rtol, o.max_iter, o.solver, o.backward) == (atol, 0.0, 500, "anderson", "implicit")
    assert ImplicitLinearModel(3, 3, 2, dtype=F64, atol=1e-9, solver="broyden").options.atol == 1e-9
    with pytest.raises(OptionTypeError, match="tol"):
        ImplicitLinearModel(3, 3, 2, tol=1e-3)  # not a DEQOptions field
    with pytest.raises(ValidationError, match="max_iter"):
        ImplicitLinearModel(3, 3, 2, max_iter=-1)
    with pytest.raises(ValidationError, match="solver"):
        ImplicitLinearModel(3, 3, 2, solver="newton")  # validated at construction, not at the first solve
    with pytest.raises(OptionTypeError, match="DEQOptions"):
        ImplicitLinearModel(3, 3, 2, options={"solver": "picard"})
