"""Forward mode, second order, torch.func and the adjoint's own defaults: exact, or refused with a clear error."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

import iterlayers as il
from iterlayers.errors import OptionTypeError, UnsupportedError, ValidationError
from problems import TanhCell

TIGHT = dict(atol=1e-13, rtol=0.0, max_iter=500)


def dense_jvp(cell, z_star, x, v):
    """(I - J)^{-1} (df/dx) v per sample, with dense Jacobians (float64)."""
    n = z_star.shape[1]
    out = []
    for i in range(z_star.shape[0]):
        J = torch.autograd.functional.jacobian(lambda z: cell(z[None], x[i : i + 1])[0], z_star[i])
        Jx = torch.autograd.functional.jacobian(lambda xx: cell(z_star[i : i + 1], xx[None])[0], x[i])
        out.append(torch.linalg.solve(torch.eye(n, dtype=J.dtype) - J, Jx @ v[i]))
    return torch.stack(out)


def jvp_of(fn, x, v):
    with fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(fn(fwAD.make_dual(x, v)))
    return primal, tangent


@pytest.mark.parametrize("solver", ["anderson", "picard"])
def test_implicit_jvp_equals_dense_formula_and_long_unrolled_forward_ad(solver):
    cell = TanhCell(6, norm=0.9, seed=31)
    x = torch.randn(4, 6, dtype=torch.float64)
    v = torch.randn_like(x)
    deq = il.DEQ(cell, backward_solver=solver, **TIGHT)
    z, t = jvp_of(deq, x, v)
    st = deq.stats["jvp"]
    assert st is not None and st.status == "converged" and int(st.nstep.min()) > 0
    ref = dense_jvp(cell, z.detach(), x, v)
    torch.testing.assert_close(t, ref, atol=1e-10, rtol=1e-9)
    # The df/dx v that the code returned before (the bug) is far from it: the test can fail.
    (_, naive) = jvp_of(lambda xx: cell(z.detach(), xx), x, v)
    assert (naive - ref).norm() > 0.1 * ref.norm()

    def unrolled(xx):
        zz = torch.zeros_like(xx)
        for _ in range(400):
            zz = cell(zz, xx)
        return zz

    _, t_ref = jvp_of(unrolled, x, v)
    torch.testing.assert_close(t, t_ref, atol=1e-10, rtol=1e-9)


def test_implicit_jvp_along_parameter_tangents_and_with_reverse_mode_at_once():
    cell = TanhCell(5, norm=0.8, seed=32)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in cell.named_parameters()]
    tangents = {n: torch.randn_like(p) for n, p in cell.named_parameters()}
    with fwAD.dual_level():
        params = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in cell.named_parameters()}

        def f(z, xx):
            return functional_call(cell, params, (z, xx))

        stats = {}
        out = il.deq_solve(f, torch.zeros_like(x), args=(x,), stats=stats, **TIGHT)
        z, t = fwAD.unpack_dual(out)
        zz = torch.zeros_like(x)
        for _ in range(400):
            zz = f(zz, x.detach())
        t_ref = fwAD.unpack_dual(zz).tangent
        z.pow(2).sum().backward()  # reverse mode on the same output still works
    assert names and stats["jvp"].status == "converged"
    torch.testing.assert_close(t, t_ref, atol=1e-10, rtol=1e-9)
    x2 = x.detach().clone().requires_grad_()
    il.DEQ(cell, **TIGHT)(x2).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-11, rtol=1e-9)


def test_phantom_jfb_and_unrolled_jvp_are_those_of_what_their_backward_differentiates():
    cell = TanhCell(5, norm=0.6, seed=33)
    x = torch.randn(2, 5, dtype=torch.float64)
    v = torch.randn_like(x)
    with torch.no_grad():
        z_star = il.solve(cell, torch.zeros_like(x), args=(x,), **TIGHT).z
    _, t = jvp_of(il.DEQ(cell, backward="jfb", **TIGHT), x, v)
    _, ref = jvp_of(lambda xx: cell(z_star, xx), x, v)
    torch.testing.assert_close(t, ref)
    _, t = jvp_of(il.DEQ(cell, backward="phantom", phantom_steps=3, phantom_damping=0.6, **TIGHT), x, v)

    def phantom(xx):
        z = z_star
        for _ in range(3):
            z = 0.4 * z + 0.6 * cell(z, xx)
        return z

    _, ref = jvp_of(phantom, x, v)
    torch.testing.assert_close(t, ref)
    # unrolled: forward AD through the iteration itself, which converges to the implicit JVP
    _, t = jvp_of(il.DEQ(cell, backward="unrolled", atol=1e-12, rtol=0, max_iter=300), x, v)
    torch.testing.assert_close(t, dense_jvp(cell, z_star, x, v), atol=1e-9, rtol=0)


@pytest.mark.parametrize("backward_solver", ["anderson", "gmres", "picard"])
def test_double_backward_through_implicit_is_refused_not_wrong(backward_solver):
    cell = TanhCell(4, norm=0.8, seed=34)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z = il.DEQ(cell, backward_solver=backward_solver, **TIGHT)(x)
    with pytest.raises(UnsupportedError, match="backward='unrolled'"):
        torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)
    # A first-order backward of the same graph kind still works.
    (g,) = torch.autograd.grad(il.DEQ(cell, **TIGHT)(x).pow(2).sum(), x)
    assert torch.isfinite(g).all()


def test_double_backward_through_unrolled_is_plain_autograd():
    cell = TanhCell(4, norm=0.5, seed=35)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, backward="unrolled", stopping="joint", atol=1e-10, rtol=0, max_iter=200)
    (g,) = torch.autograd.grad(deq(x).pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    n = int(deq.stats["forward"].nstep.max())
    x2 = x.detach().clone().requires_grad_()
    z = torch.zeros_like(x2)
    for _ in range(n):
        z = cell(z, x2)
    (g2,) = torch.autograd.grad(z.pow(2).sum(), x2, create_graph=True)
    (h2,) = torch.autograd.grad(g2.sum(), x2)
    torch.testing.assert_close(h, h2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap", "jvp"])
def test_torch_func_transforms_are_refused_at_the_entry(transform):
    cell = TanhCell(4, norm=0.5, seed=36)
    deq = il.DEQ(cell)
    x = torch.randn(2, 4, dtype=torch.float64)
    calls = {
        "grad": lambda: torch.func.grad(lambda xx: deq(xx).sum())(x),
        "jacrev": lambda: torch.func.jacrev(deq)(x),
        "vmap": lambda: torch.func.vmap(lambda xx: deq(xx[None]))(x),
        "jvp": lambda: torch.func.jvp(deq, (x,), (x,)),
    }
    with pytest.raises(UnsupportedError, match="torch.autograd.forward_ad"):
        calls[transform]()


def test_unrolled_gradient_reaches_a_z0_that_requires_grad():
    cell = TanhCell(4, norm=0.5, seed=37)
    x = torch.randn(3, 4, dtype=torch.float64)
    z0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    il.DEQ(cell, backward="unrolled", stopping="joint", max_iter=3, atol=1e-14, rtol=0, on_failure="ignore")(
        x, z0=z0).pow(2).sum().backward()
    z0b = z0.detach().clone().requires_grad_()
    z = z0b
    for _ in range(3):
        z = cell(z, x)
    z.pow(2).sum().backward()
    torch.testing.assert_close(z0.grad, z0b.grad, atol=1e-14, rtol=0)


def test_adjoint_has_its_own_non_degenerate_defaults():
    # The adjoint's tolerances come from the forward ones, never looser than 1e-5; its limit is at least 50.
    o = il.DEQOptions(atol=1e-9, rtol=1e-6, max_iter=0)
    assert (o.adjoint_atol, o.adjoint_rtol, o.adjoint_max_iter) == (1e-9, 1e-6, 50)
    o = il.DEQOptions(atol=0.5, rtol=0.0, max_iter=200)
    assert (o.adjoint_atol, o.adjoint_rtol, o.adjoint_max_iter) == (1e-5, 0.0, 200)
    assert il.DEQOptions(backward_atol=1e-3, backward_max_iter=7).adjoint_tolerances(torch.bfloat16)[0] == 1e-3
    assert il.DEQOptions().adjoint_tolerances(torch.bfloat16)[0] == torch.finfo(torch.bfloat16).eps
    assert il.DEQOptions().adjoint_tolerances(torch.float32) == (1e-5, 1e-5)
    # The backward solve runs with them: rtol is the forward rtol (not its atol), the limit is not 0.
    cell = TanhCell(6, norm=0.9, seed=38)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(cell, atol=1e-9, rtol=1e-7, max_iter=300, backward_adaptive=False)
    deq(x).sum().backward()
    bst = deq.stats["backward"]
    assert (bst.atol, bst.rtol, bst.max_iter) == (1e-9, 1e-7, 300) and int(bst.nstep.min()) > 0
    # Adaptive (the default): each default is lowered to the forward's reached relative residual where smaller.
    deq = il.DEQ(cell, atol=1e-9, rtol=1e-7, max_iter=300, stopping="joint")
    deq(x).sum().backward()
    fst, bst = deq.stats["forward"], deq.stats["backward"]
    with torch.no_grad():  # the same solve without a graph returns z* itself; its true relative residual:
        z = deq(x)
        fz = cell(z, x)
        rho = float(((fz - z).norm(dim=1) / fz.norm(dim=1)).max())
    balanced = max(rho, 16 * torch.finfo(torch.float64).eps)
    assert bst.rtol == pytest.approx(min(1e-7, balanced), rel=1e-6) and bst.rtol < 1e-7
    assert bst.atol == pytest.approx(min(1e-9, balanced), rel=1e-6)
    assert bst.info["adjoint_tolerance"] == (bst.atol, bst.rtol) and fst.status == "converged"
    # A forward max_iter=0 returns z0 (reported as max_iter) but the gradient is still the implicit one.
    deq0 = il.DEQ(cell, atol=1e-9, rtol=0, max_iter=0, on_failure="ignore")
    deq0(x).sum().backward()
    assert deq0.stats["backward"].max_iter == 50 and int(deq0.stats["backward"].nstep.max()) > 1


@pytest.mark.parametrize("bad, error, match", [
    (dict(backward_max_iter=0), ValidationError, "JFB gradient reported as implicit"),
    (dict(backward_atol=1.0), ValidationError, "backward_atol must be in"),
    (dict(backward_atol=0, backward_rtol=0), ValidationError, "both 0"),
    (dict(atol="1e-5"), OptionTypeError, "atol must be a number"),
    (dict(atol=float("nan")), ValidationError, "atol must be a finite"),
    (dict(rtol=-1e-3), ValidationError, "rtol must be in"),
    (dict(max_iter=True), OptionTypeError, "max_iter must be an integer"),
    (dict(max_iter=2.0), OptionTypeError, "max_iter must be an integer"),
    (dict(stopping="batch"), ValidationError, "stopping must be one of"),
    (dict(hoist="yes"), OptionTypeError, "hoist must be True or False"),
    (dict(phantom_damping=float("nan")), ValidationError, "phantom_damping"),
    (dict(phantom_steps=0), ValidationError, "phantom_steps"),
    (dict(on_failure="loud"), ValidationError, "on_failure must be one of"),
    (dict(solver_options=[("m", 3)]), OptionTypeError, "solver_options must be a dict"),
    (dict(atol=0, rtol=0), ValidationError, "both 0"),
])
def test_every_option_is_checked_with_a_typed_error_naming_it(bad, error, match):
    with pytest.raises(error, match=match):
        il.DEQOptions(**bad)
    with pytest.raises(il.IterlayersError):
        il.DEQ(TanhCell(3), **bad)


def test_solvers_are_built_once_per_options_value_not_per_forward(monkeypatch):
    import iterlayers.implicit as implicit

    deq = il.DEQ(TanhCell(4, norm=0.5), max_iter=30, eval_max_iter=5, on_failure="ignore")
    calls = []
    real = implicit.make_solver
    monkeypatch.setattr(implicit, "make_solver", lambda *a, **k: calls.append(a) or real(*a, **k))
    x = torch.randn(2, 4, dtype=torch.float64)
    deq.eval()
    for _ in range(3):
        deq(x)
    deq.train()
    deq(x)
    assert calls == []
    assert int(deq.stats["forward"].nstep.max()) <= 30
    deq.eval()
    deq(x)
    assert deq.stats["forward"].max_iter == 5
