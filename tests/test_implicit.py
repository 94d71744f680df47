"""Gradient modes against exact references."""
import pytest
import torch
from torch.func import functional_call

import iterlayers as il
from problems import ConvCell, LinearCell, TanhCell, random_matrix

TIGHT = dict(atol=1e-13, rtol=0.0, max_iter=500)


def dense_ift_grads(cell, x, z_star, grad_out):
    """dL/dx and dL/dtheta from the dense implicit-function theorem: u = (I - J)^{-T} g."""
    B, n = z_star.shape
    params = dict(cell.named_parameters())
    u = torch.empty_like(grad_out)
    for i in range(B):
        J = torch.autograd.functional.jacobian(lambda z: cell(z[None], x[i : i + 1].detach())[0], z_star[i])
        u[i] = torch.linalg.solve((torch.eye(n, dtype=J.dtype) - J).T, grad_out[i])
    xd = x.detach().requires_grad_()
    fz = functional_call(cell, params, (z_star.detach(), xd))
    gx, *gp = torch.autograd.grad(fz, [xd, *params.values()], u)
    return gx, dict(zip(params, gp))


@pytest.mark.parametrize("backward_solver", ["anderson", "picard", "gmres"])
def test_implicit_gradient_equals_dense_ift(backward_solver):
    cell = TanhCell(7, norm=0.9, seed=11)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, backward_solver=backward_solver, **TIGHT)
    z = deq(x)
    g = torch.randn_like(z)
    (z * g).sum().backward()
    assert deq.stats["backward"].status == "converged"
    gx, gp = dense_ift_grads(cell, x, z.detach(), g)
    torch.testing.assert_close(x.grad, gx, atol=1e-10, rtol=1e-8)
    for name, p in cell.named_parameters():
        torch.testing.assert_close(p.grad, gp[name], atol=1e-10, rtol=1e-8)


def test_implicit_gradient_on_linear_cell_closed_form():
    """z* = (I - A)^{-1} x, so dL/dx = (I - A)^{-T} g exactly."""
    A = random_matrix(6, 0.8, seed=12)
    cell = LinearCell(A)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    z = il.DEQ(cell, **TIGHT)(x)
    g = torch.randn_like(z)
    (z * g).sum().backward()
    expected = torch.linalg.solve((torch.eye(6, dtype=A.dtype) - A).T, g.T).T
    torch.testing.assert_close(x.grad, expected, atol=1e-11, rtol=0)


@pytest.mark.parametrize("solver", ["anderson", "broyden", "picard"])
def test_gradcheck_wrt_input_and_parameters(solver):
    cell = TanhCell(5, norm=0.7, seed=13)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, solver=solver, **TIGHT)
    assert torch.autograd.gradcheck(lambda x: deq(x), (x,))
    names = [n for n, _ in cell.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in cell.parameters())

    def by_params(*ps):
        return il.deq_solve(
            lambda z, x: functional_call(cell, dict(zip(names, ps)), (z, x)), torch.zeros_like(x), args=(x,),
            solver=solver, **TIGHT,
        )

    assert torch.autograd.gradcheck(by_params, params)


def test_gradcheck_with_gmres_backward_conv_cell():
    cell = ConvCell(2, seed=14)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, backward_solver="gmres", **TIGHT)
    # GMRES is deterministic given its input, but gradcheck re-runs the backward with one-hot vectors whose
    # Krylov bases differ in the last bits from one call to the next through the adjoint residual threshold;
    # allow round-off, never more.
    assert torch.autograd.gradcheck(lambda x: deq(x), (x,), nondet_tol=1e-12)


def test_unrolled_equals_autograd_through_plain_loop():
    cell = TanhCell(6, norm=0.8, seed=15)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, backward="unrolled", atol=1e-9, rtol=0, max_iter=200)
    z = deq(x)
    z.pow(2).sum().backward()
    steps = deq.stats["forward"].nstep
    gx = x.grad.clone()
    # Reference: the plain loop, each sample run for exactly its own number of steps.
    x2 = x.detach().clone().requires_grad_()
    ref = []
    for i in range(4):
        zi = torch.zeros(1, 6, dtype=torch.float64)
        for _ in range(int(steps[i])):
            zi = cell(zi, x2[i : i + 1])
        ref.append(zi)
    torch.stack(ref).pow(2).sum().backward()
    torch.testing.assert_close(gx, x2.grad, atol=1e-12, rtol=0)
    # ...and it agrees with the implicit gradient up to the forward tolerance.
    x3 = x.detach().clone().requires_grad_()
    il.DEQ(cell, **TIGHT)(x3).pow(2).sum().backward()
    torch.testing.assert_close(gx, x3.grad, atol=1e-7, rtol=0)


def test_jfb_and_phantom_definitions():
    cell = TanhCell(5, norm=0.6, seed=16)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        z_star = il.solve(cell, torch.zeros_like(x), args=(x,), **TIGHT).z
    jfb = il.DEQ(cell, backward="jfb", **TIGHT)(x)
    (gj,) = torch.autograd.grad(jfb.sum(), x)
    (ref,) = torch.autograd.grad(cell(z_star, x).sum(), x)
    torch.testing.assert_close(gj, ref)
    ph = il.DEQ(cell, backward="phantom", phantom_steps=3, phantom_damping=0.6, **TIGHT)(x)
    (gp,) = torch.autograd.grad(ph.sum(), x)
    z = z_star
    for _ in range(3):
        z = 0.4 * z + 0.6 * cell(z, x)
    (ref,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(gp, ref)


def test_implicit_keeps_one_evaluation_in_the_graph():
    """The graph holds one evaluation of the cell whatever the number of forward iterations."""
    graph_calls = []

    class Spy(TanhCell):
        def forward(self, z, x):
            if torch.is_grad_enabled():
                graph_calls.append(1)
            return super().forward(z, x)

    cell = Spy(6, norm=0.95, seed=17)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, **TIGHT)
    deq(x).sum().backward()
    assert deq.stats["forward"].nfe > 10
    assert len(graph_calls) == 1


def test_backward_non_convergence_is_reported():
    cell = TanhCell(6, norm=0.95, seed=18)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, backward_solver="picard", backward_max_iter=2, backward_atol=1e-14, backward_rtol=0,
                 on_failure="raise", atol=1e-12, rtol=0, max_iter=300)
    z = deq(x)
    with pytest.raises(il.ConvergenceError, match="did not converge"):
        z.sum().backward()
    deq.on_failure = "warn"
    z = deq(x)
    with pytest.warns(il.ConvergenceWarning):
        z.sum().backward()
    assert deq.stats["backward"].status == "max_iter"


def test_no_grad_returns_detached_fixed_point():
    cell = TanhCell(4, seed=19)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, **TIGHT)
    with torch.no_grad():
        z = deq(x)
    assert not z.requires_grad
    assert deq.stats["backward"] is None and deq.stats["forward"].status == "converged"


def test_small_incoming_gradients_are_not_silently_zeroed():
    """The adjoint tolerance is relative to ||g||: a tiny loss scale must not make u = 0 look converged."""
    cell = TanhCell(6, norm=0.9, seed=21)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, atol=1e-6, rtol=0, max_iter=300, backward_atol=1e-6, backward_rtol=0)
    z = deq(x)
    g = 1e-9 * torch.randn_like(z)
    (z * g).sum().backward()
    assert int(deq.stats["backward"].nstep.min()) > 0
    gx, _ = dense_ift_grads(cell, x, z.detach(), g)
    torch.testing.assert_close(x.grad, gx, atol=0, rtol=1e-4)


def test_unrolled_stats_follow_the_solver_loop_rules():
    # Same stopping rule and status vocabulary as the generic loop: converged per sample, NaN reported as an
    # infinite residual and status "diverged" (never a silent NaN), max_iter otherwise.
    cell = TanhCell(4, norm=0.5, seed=21)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, backward="unrolled", atol=1e-8, rtol=0, max_iter=100)
    deq(x)
    st = deq.stats["forward"]
    assert st.status == "converged" and bool(st.converged.all()) and st.solver == "picard(unrolled)"
    assert bool((st.abs_residual <= 1e-8).all())
    torch.testing.assert_close(st.rel_residual, st.abs_residual / cell(deq(x), x).norm(dim=1), rtol=1e-6, atol=0)

    deq = il.DEQ(cell, backward="unrolled", atol=1e-14, rtol=0, max_iter=2, on_failure="ignore")
    deq(x)
    assert deq.stats["forward"].status == "max_iter" and not bool(deq.stats["forward"].diverged.any())

    def blows_up(z, x):
        return torch.where(z.abs() > 0, z * float("inf"), z + 1.0) * x

    with pytest.raises(il.ConvergenceError, match="diverged"):
        il.deq_solve(blows_up, torch.zeros(2, 3, dtype=torch.float64), args=(torch.ones(2, 3, dtype=torch.float64,
                     requires_grad=True),), backward="unrolled", max_iter=5, on_failure="raise")
    st_holder: dict = {}
    il.deq_solve(blows_up, torch.zeros(2, 3, dtype=torch.float64),
                 args=(torch.ones(2, 3, dtype=torch.float64, requires_grad=True),), backward="unrolled",
                 max_iter=5, on_failure="ignore", stats=st_holder)
    st = st_holder["forward"]
    assert st.status == "diverged" and bool(st.diverged.all()) and bool(torch.isinf(st.abs_residual).all())
