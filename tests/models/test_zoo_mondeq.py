"""monDEQ: the operators are what they claim (dense references), the splittings find the Anderson fixed point of
the same monotone map, their adjoint gives the dense implicit gradient, and the step ranges hold."""
import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

import iterlayers as il
from iterlayers.models import build_model
from iterlayers.models.mondeq import ConvMonotone, DenseMonotone
from iterlayers.solvers import make_solver

f64 = torch.float64
SPLITTINGS = ["peaceman_rachford", "forward_backward"]


def _dense(fn, n):
    """The matrix of a linear map on flat rows."""
    return fn(torch.eye(n, dtype=f64)).T


def _conv_op(seed=0, channels=3, side=4):
    torch.manual_seed(seed)
    return ConvMonotone(1, channels, side, m=0.5).double()


def test_conv_operator_is_the_circular_convolution_operator_and_strongly_monotone():
    op = _conv_op()
    C, s = op.channels, op.side
    n = C * s * s

    def conv(K, z, adjoint=False):  # spatial circular convolution (flipped kernel = true convolution), on rows
        z = z.reshape(-1, C, s, s)
        if adjoint:  # the adjoint of a circular convolution: correlate with the transposed kernel
            out = F.conv2d(F.pad(z, (1, 1, 1, 1), mode="circular"), K.transpose(0, 1))
        else:
            out = F.conv2d(F.pad(z, (1, 1, 1, 1), mode="circular"), K.flip(-1, -2))
        return out.flatten(1)

    with torch.no_grad():
        A, B = _dense(lambda z: conv(op.A, z), n), _dense(lambda z: conv(op.B, z), n)
        assert torch.allclose(_dense(lambda z: conv(op.A, z, True), n), A.T, atol=1e-12)
        W = (1 - op.m) * torch.eye(n, dtype=f64) - A.T @ A + B - B.T
        torch.testing.assert_close(_dense(op.linear, n), W, rtol=0, atol=1e-12)
        torch.testing.assert_close(_dense(lambda z: op.linear(z, True), n), W.T, rtol=0, atol=1e-12)
        G = torch.eye(n, dtype=f64) - W
        assert float(torch.linalg.eigvalsh((G + G.T) / 2).min()) >= op.m - 1e-10
        assert op.lipschitz() == pytest.approx(float(torch.linalg.matrix_norm(G, 2)), rel=1e-10)
        for transpose in (False, True):
            M = torch.eye(n, dtype=f64) + 0.7 * (G.T if transpose else G)
            torch.testing.assert_close(_dense(op.resolvent(0.7, transpose), n), torch.linalg.inv(M), rtol=0,
                                       atol=1e-10)


def test_dense_operator_is_monotone_linear_and_its_resolvent_is_exact():
    torch.manual_seed(1)
    op = DenseMonotone(5, 6, m=0.3).double()
    with torch.no_grad():
        W = op.core.W()
        torch.testing.assert_close(_dense(op.linear, 6), W)
        torch.testing.assert_close(_dense(lambda z: op.linear(z, True), 6), W.T)
        G = torch.eye(6, dtype=f64) - W
        for transpose in (False, True):
            M = torch.eye(6, dtype=f64) + 2.0 * (G.T if transpose else G)
            torch.testing.assert_close(_dense(op.resolvent(2.0, transpose), 6), torch.linalg.inv(M))


@pytest.mark.parametrize("name", ["mondeq", "mondeq_conv"])
def test_splitting_fixed_points_equal_the_anderson_fixed_point_of_the_same_map(name):
    torch.manual_seed(2)
    opts = dict(width=7) if name == "mondeq" else dict(channels=3)
    x = torch.randn(4, 16, dtype=f64)
    found = {}
    for solver in SPLITTINGS:
        torch.manual_seed(3)
        model = build_model(name, 16, 3, solver=solver, atol=1e-11, max_iter=3000, on_failure="raise", **opts)
        model = model.double()
        with torch.no_grad():
            found[solver] = model.mon(x)
        assert model.mon.stats["forward"].status == "converged"
    op, b = model.mon.operator, model.mon.operator.injection(x).detach()
    with torch.no_grad():
        # the reference: Anderson, through the core loop, on the forward-backward map of the same operator
        # (a contraction for alpha = m / L^2), not on the splitting solvers' own iteration
        a = op.m / op.lipschitz() ** 2
        ref = il.solve(lambda z, bb: torch.relu((1 - a) * z + a * (op.linear(z) + bb)), torch.zeros_like(b),
                       args=(b,), solver="anderson", atol=1e-12, rtol=0, max_iter=2000, on_failure="raise").z
        if name == "mondeq":  # and the core's own MonotoneLinear cell (its W, its auto step) agrees
            core = il.solve(op.core, torch.zeros_like(b), args=(x,), atol=1e-12, rtol=0, max_iter=2000).z
            torch.testing.assert_close(core, ref, rtol=0, atol=1e-9)
        n = b.shape[1]
        W = _dense(op.linear, n)
        for solver, z in found.items():
            # the true residual, from the dense matrix W
            assert float((torch.relu(z @ W.T + b) - z).norm(dim=1).max()) < 1e-10, solver
            torch.testing.assert_close(z, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(found["peaceman_rachford"], found["forward_backward"], rtol=0, atol=1e-9)


def _shrink(model, factor=0.4):
    # smaller A and B: L = ||I - W|| closer to m, so forward-backward (rate sqrt(1 - m^2 / L^2)) is fast too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".A", ".B")):
                p.mul_(factor)
    return model


def _grads(model, x, g):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    (model(x) * g).sum().backward()
    assert model.mon.stats["backward"].status == "converged"
    return [x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["mondeq", "mondeq_conv"])
def test_gradient_equals_the_dense_ift_gradient_and_finite_differences(name):
    torch.manual_seed(4)
    opts = dict(width=6) if name == "mondeq" else dict(channels=2)
    tight = dict(m=0.5, atol=1e-13, max_iter=5000, backward_rtol=1e-13, backward_max_iter=5000, on_failure="raise")
    model = _shrink(build_model(name, 16, 3, solver="peaceman_rachford", **opts, **tight).double())
    x = torch.randn(2, 16, dtype=f64)
    g = torch.randn(2, 3, dtype=f64)
    grads = _grads(model, x, g)
    # the dense implicit function theorem for x: z = relu(W z + b(x)), dz/dx = (I - D W)^{-1} D db/dx
    op = model.mon.operator
    with torch.no_grad():
        n = op.size
        W = _dense(op.linear, n)
        z = model.mon(x)
        pre = z @ W.T + op.injection(x)
        db_dx = _dense(op.injection, 16)  # the injection is affine: its matrix plus a constant
        db_dx = db_dx - op.injection(torch.zeros(1, 16, dtype=f64)).reshape(-1, 1)
        head = model.head.weight if name == "mondeq" else None
        expected = torch.empty_like(x)
        for i in range(2):
            D = torch.diag((pre[i] > 0).double())
            dz_dx = torch.linalg.solve(torch.eye(n, dtype=f64) - D @ W, D @ db_dx)
            if name == "mondeq":
                expected[i] = g[i] @ head @ dz_dx
            else:  # the head pools 2x2 then is linear: its matrix from the model's own forward
                pooled = _dense(lambda t: model.head(F.avg_pool2d(t.reshape(-1, op.channels, op.side, op.side),
                                                                   2).flatten(1)) - model.head.bias, n)
                expected[i] = g[i] @ pooled @ dz_dx
    torch.testing.assert_close(grads[0], expected, rtol=1e-9, atol=1e-11)
    # forward-backward's adjoint gives the same gradient as Peaceman-Rachford's, for every parameter
    model.mon.solver = "forward_backward"
    for a, b in zip(_grads(model, x, g), grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # and finite differences of the whole model, in every parameter (gradcheck in float64)
    model.mon.solver = "peaceman_rachford"
    names = [k for k, _ in model.named_parameters() if k.startswith("mon.")]
    params = tuple(dict(model.named_parameters())[k].detach().clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(lambda *ps: functional_call(model, dict(zip(names, ps)), (x[:1],)), params,
                                    eps=1e-6, atol=1e-6)


def test_step_ranges_forward_backward_below_2m_over_l2_and_peaceman_rachford_for_every_alpha():
    torch.manual_seed(6)
    model = build_model("mondeq", 8, 2, width=10, m=0.5).double()
    mon = model.mon
    op = mon.operator
    limit = 2 * op.m / op.lipschitz() ** 2
    x = torch.randn(6, 8, dtype=f64)
    ref = None
    for solver, alphas in (("forward_backward", [0.1 * limit, 0.5 * limit, 0.95 * limit]),
                           ("peaceman_rachford", [0.05, 1.0, 20.0])):
        for alpha in alphas:
            mon.solver, mon.alpha, mon.atol, mon.max_iter, mon.on_failure = solver, alpha, 1e-11, 20000, "raise"
            with torch.no_grad():
                z = mon(x)
            st = mon.stats["forward"]
            assert st.status == "converged" and st.info["alpha"] == pytest.approx(alpha)
            ref = z if ref is None else ref
            torch.testing.assert_close(z, ref, rtol=0, atol=1e-9)
    # outside forward-backward's range: refused before any iteration, naming the range
    structure = mon.structure(op.injection(x).detach())
    with pytest.raises(ValueError, match=r"forward_backward: alpha must lie in \(0, 2 m / L\^2\)"):
        make_solver("forward_backward", {"alpha": 1.01 * limit, "structure": structure})


def test_splitting_solvers_refuse_a_map_without_structure():
    for name in SPLITTINGS:
        with pytest.raises(ValueError, match=rf"^{name}: structure must be given"):
            il.DEQ(lambda z, x: z, solver=name)
        with pytest.raises(TypeError, match=rf"^{name}: structure must be a MonotoneStructure"):
            make_solver(name, {"structure": 3})
        with pytest.raises(ValueError, match=rf"^{name}: alpha must be"):
            make_solver(name, {"alpha": -1.0})
    with pytest.raises(ValueError, match="solver must be one of"):
        build_model("mondeq", 4, 2, solver="anderson")


@pytest.mark.parametrize("name", SPLITTINGS)
def test_splittings_solve_a_linear_monotone_system_exactly(name):
    # prox = identity (f = 0): z = W z + b with W = 0.5 * flip, I - W has eigenvalues 0.5 and 1.5 (m = 0.5,
    # L = 1.5); the exact answer is (I - W)^{-1} b
    from iterlayers.solvers.splitting import MonotoneStructure

    n = 3
    P = torch.eye(n, dtype=f64).flip(1)
    G = torch.eye(n, dtype=f64) - 0.5 * P
    b = torch.randn(4, n, dtype=f64)
    structure = MonotoneStructure(
        linear=lambda z: 0.5 * z.flip(1), bias=b, prox=lambda t, idx: t, m=0.5, lipschitz=1.5,
        resolvent=lambda r, a: r @ torch.linalg.inv(torch.eye(n, dtype=f64) + a * G).T)
    solver = make_solver(name, {"alpha": 1 if name == "peaceman_rachford" else 0.4, "structure": structure})
    assert type(solver.alpha) is float
    sol = il.solve(lambda z, bb: 0.5 * z.flip(1) + bb, torch.zeros_like(b), args=(b,), solver=solver, atol=1e-12,
                   rtol=0, max_iter=500, on_failure="raise")
    torch.testing.assert_close(sol.z, torch.linalg.solve(G, b.T).T, rtol=0, atol=1e-11)
    assert sol.stats.solver == name
