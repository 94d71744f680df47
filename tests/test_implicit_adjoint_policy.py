"""The adjoint's policy: tolerances tied to the forward residual reached, and the opt-in recorded fallback."""
import warnings

import pytest
import torch

import iterlayers as il
from iterlayers.errors import ConvergenceError, ConvergenceWarning, OptionTypeError, ValidationError
from problems import BatchNormCell, TanhCell
from test_implicit import dense_ift_grads


def _solve_and_grad(cell, x, g, **options):
    x = x.detach().requires_grad_()
    for p in cell.parameters():
        p.grad = None
    deq = il.DEQ(cell, **options)
    z = deq(x)
    (z * g).sum().backward()
    return deq, x.grad.clone(), {n: p.grad.clone() for n, p in cell.named_parameters()}


def _z_star(deq, x):
    with torch.no_grad():  # without a graph the layer returns the fixed point itself
        return deq(x)


def test_adaptive_adjoint_follows_a_forward_solved_past_its_tolerance():
    # Picard on a 0.3-contraction stops at atol 1e-6 with a residual up to 0.3x smaller; the fixed rule solves the
    # adjoint to 1e-6 (per-sample units), the adaptive one to the forward's reached relative residual.
    torch.manual_seed(0)
    cell = TanhCell(8, norm=0.3, seed=5)
    x = torch.randn(4, 8, dtype=torch.float64)
    g = torch.randn(4, 8, dtype=torch.float64)
    opts = dict(solver="picard", backward_solver="picard", atol=1e-6, rtol=0.0, stopping="joint", max_iter=200)
    errors = {}
    for adaptive in (False, True):
        deq, gx, _ = _solve_and_grad(cell, x, g, backward_adaptive=adaptive, **opts)
        bst = deq.stats["backward"]
        zs = _z_star(deq, x)
        # The exact implicit gradient at the returned z*: what the adjoint solve approximates.
        with torch.no_grad():
            y = cell(zs, x)
        ref_x, _ = dense_ift_grads(cell, x.clone().requires_grad_(), zs, g)
        errors[adaptive] = float((gx - ref_x).norm() / ref_x.norm())
        rho = float(((y - zs).norm(dim=1) / y.norm(dim=1)).max())
        if adaptive:
            assert bst.atol == pytest.approx(max(rho, 16 * torch.finfo(torch.float64).eps), rel=1e-9)
            assert bst.atol < 1e-6
        else:
            assert bst.atol == 1e-6
    assert errors[True] < errors[False] / 3, errors


def test_adaptive_never_loosens_and_explicit_tolerances_are_kept():
    mode = il.ImplicitGradient()
    assert mode.tolerances(1e-5, 1e-5, torch.float64, forward_residual=1e-2) == (1e-5, 1e-5)
    assert mode.tolerances(1e-5, 1e-5, torch.float64, forward_residual=1e-9) == (1e-9, 1e-9)
    assert mode.tolerances(1e-5, 0.0, torch.float64, forward_residual=1e-9) == (1e-9, 0.0)
    eps = torch.finfo(torch.float32).eps
    assert mode.tolerances(1e-5, 1e-5, torch.float32, forward_residual=0.0) == (16 * eps, 16 * eps)
    assert mode.tolerances(1e-5, 1e-5, torch.float64, forward_residual=float("nan")) == (1e-5, 1e-5)
    fixed = il.ImplicitGradient(atol=1e-4, rtol=1e-3)
    assert fixed.tolerances(1e-5, 1e-5, torch.float64, forward_residual=1e-12) == (1e-4, 1e-3)
    assert il.ImplicitGradient(adaptive=False).tolerances(1e-5, 1e-5, torch.float64, 1e-12) == (1e-5, 1e-5)


def _failing(**extra):
    # One Anderson iteration cannot reach 1e-12 on a 0.9-contraction: the adjoint fails on every sample with a
    # non-zero incoming gradient.
    return dict(solver="anderson", atol=1e-12, rtol=0.0, max_iter=300, backward_max_iter=1, backward_atol=1e-12,
                backward_rtol=0.0, **extra)


@pytest.mark.parametrize("fallback", ["jfb", "phantom"])
def test_fallback_gives_that_modes_gradient_and_says_so(fallback):
    torch.manual_seed(1)
    cell = TanhCell(6, norm=0.9, seed=7)
    x = torch.randn(3, 6, dtype=torch.float64)
    g = torch.randn(3, 6, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match=f"the {fallback} gradient was used"):
        deq, gx, gp = _solve_and_grad(cell, x, g, backward_fallback=fallback, on_failure="raise", **_failing())
    bst = deq.stats["backward"]
    assert bst.status != "converged"
    assert bst.info["fallback"] == {"mode": fallback, "samples": [0, 1, 2]} and bst.info["fallback_samples"] == 3
    assert bst.summary()["fallback_samples"] == 3
    # The reference: the mode itself (phantom: its own damped steps with autograd, from the same z*).
    ref_opts = dict(solver="anderson", atol=1e-12, rtol=0.0, max_iter=300, backward=fallback)
    _, rx, rp = _solve_and_grad(cell, x, g, **ref_opts)
    torch.testing.assert_close(gx, rx, atol=1e-9, rtol=1e-8)
    for n in gp:
        torch.testing.assert_close(gp[n], rp[n], atol=1e-9, rtol=1e-8)
    # ... and it is not the implicit gradient (the fallback did something).
    _, ix, _ = _solve_and_grad(cell, x, g, solver="anderson", atol=1e-12, rtol=0.0, max_iter=300)
    assert (gx - ix).norm() > 1e-3 * ix.norm()


def test_fallback_replaces_only_the_failed_samples_of_independent_rows():
    torch.manual_seed(2)
    cell = TanhCell(6, norm=0.9, seed=8)
    x = torch.randn(4, 6, dtype=torch.float64)
    g = torch.randn(4, 6, dtype=torch.float64)
    g[1] = 0.0  # a zero incoming gradient: its adjoint is 0, converged at once
    with pytest.warns(ConvergenceWarning, match="3 of 4 samples"):
        deq, gx, _ = _solve_and_grad(cell, x, g, backward_fallback="jfb", **_failing())
    assert deq.stats["backward"].info["fallback"]["samples"] == [0, 2, 3]
    _, jx, _ = _solve_and_grad(cell, x, g, solver="anderson", atol=1e-12, rtol=0.0, max_iter=300, backward="jfb")
    torch.testing.assert_close(gx, jx, atol=1e-12, rtol=0)  # row 1 is 0 in both


def test_fallback_on_coupled_rows_replaces_the_whole_batch():
    torch.manual_seed(3)
    cell = BatchNormCell(4).double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    g = torch.randn(5, 4, dtype=torch.float64)
    g[2] = 0.0
    with pytest.warns(ConvergenceWarning):
        deq, _, _ = _solve_and_grad(cell, x, g, backward_fallback="jfb", **_failing())
    assert str(deq.stats["forward"].info["stopping"]).startswith("joint")
    assert deq.stats["backward"].info["fallback"]["samples"] == [0, 1, 2, 3, 4]


def test_without_fallback_a_failed_adjoint_raises_and_ignore_records_silently():
    cell = TanhCell(6, norm=0.9, seed=9)
    x = torch.randn(2, 6, dtype=torch.float64)
    g = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="backward solve"):
        _solve_and_grad(cell, x, g, on_failure="raise", **_failing())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq, _, _ = _solve_and_grad(cell, x, g, on_failure="ignore", backward_fallback="jfb", **_failing())
    assert deq.stats["backward"].info["fallback_samples"] == 2


def test_fallback_options_are_validated():
    with pytest.raises(ValidationError, match="backward_fallback"):
        il.DEQOptions(backward_fallback="unrolled")
    with pytest.raises(OptionTypeError, match="fallback"):
        il.ImplicitGradient(fallback=il.UnrolledGradient())
    assert isinstance(il.ImplicitGradient(fallback="phantom").fallback, il.PhantomGradient)
    o = il.DEQOptions(backward_fallback="phantom", phantom_steps=3)
    assert o.gradient.fallback == il.PhantomGradient(3, 0.5)
    with pytest.raises(ValidationError, match="again as keywords"):
        il.DEQOptions(backward=il.ImplicitGradient(), backward_fallback="jfb")


def test_adjoint_warm_start_changes_iterations_not_the_gradient():
    torch.manual_seed(4)
    cell = TanhCell(8, norm=0.9, seed=10)
    x = torch.randn(5, 8, dtype=torch.float64)
    g = torch.randn(5, 8, dtype=torch.float64)
    opts = dict(atol=1e-11, rtol=0.0, max_iter=300, backward_atol=1e-10, backward_rtol=0.0)
    cold, cx, _ = _solve_and_grad(cell, x, g, **opts)
    u, cold_steps = cold.stats["adjoint"], int(cold.stats["backward"].nstep.max())
    assert u.shape == x.shape and not u.requires_grad
    # u is the adjoint: (I - J^T) u = g per sample, against the dense Jacobian at z*.
    zs = _z_star(cold, x)
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda zz: cell(zz[None], x[i:i + 1])[0], zs[i])
        torch.testing.assert_close(u[i] - J.T @ u[i], g[i], atol=1e-8, rtol=1e-8)
    # Started from it, the adjoint solve has nothing left to do; from a poor start it still gets there.
    xx = x.clone().requires_grad_()
    warm = il.DEQ(cell, **opts)
    (warm(xx, adjoint_start=u) * g).sum().backward()
    bst = warm.stats["backward"]
    assert bst.info["adjoint_warm_start"] and int(bst.nstep.max()) <= 1 < cold_steps
    torch.testing.assert_close(xx.grad, cx, atol=1e-8, rtol=1e-7)
    xx = x.clone().requires_grad_()
    (warm(xx, adjoint_start=10 * torch.randn_like(x)) * g).sum().backward()
    assert warm.stats["backward"].status == "converged"
    torch.testing.assert_close(xx.grad, cx, atol=1e-8, rtol=1e-7)
    with pytest.raises(il.ShapeMismatchError, match="adjoint_start"):
        warm(x.clone().requires_grad_(), adjoint_start=u[:2])
    with pytest.raises(il.NonFiniteInputError, match="adjoint_start"):
        warm(x.clone().requires_grad_(), adjoint_start=torch.full_like(u, float("nan")))
