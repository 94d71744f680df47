"""SHINE: the adjoint from the forward Broyden estimate, against dense references."""
import pytest
import torch

import iterlayers as il
from iterlayers.errors import UnsupportedError, ValidationError
from iterlayers.solvers import BroydenSolver, LoopOptions
from problems import TanhCell
from test_implicit import dense_ift_grads

BROYDEN = dict(solver="broyden", atol=1e-9, rtol=0.0, max_iter=200, solver_options={"memory": 50})


def test_apply_inverse_t_is_the_transpose_of_the_dense_estimate():
    g = torch.Generator().manual_seed(0)
    B, k, n = 3, 4, 6
    U, V = torch.randn(B, 7, n, generator=g, dtype=torch.float64), torch.randn(B, 7, n, generator=g, dtype=torch.float64)
    state = {"U": U, "V": V, "k": k}
    x = torch.randn(B, n, generator=g, dtype=torch.float64)
    out = BroydenSolver().apply_inverse_t(state, x)
    for i in range(B):
        H = -torch.eye(n, dtype=torch.float64) + U[i, :k].T @ V[i, :k]  # H = -I + sum_j u_j v_j^T
        torch.testing.assert_close(out[i], H.T @ x[i], atol=1e-12, rtol=0)


def _dense_J(cell, z, x):
    return torch.autograd.functional.jacobian(lambda zz: cell(zz[None], x[None])[0], z)


def test_shine_gradient_is_minus_h_transpose_g_and_its_residual_is_measured():
    torch.manual_seed(1)
    cell = TanhCell(6, norm=0.8, seed=2)
    x = torch.randn(1, 6, dtype=torch.float64)
    g = torch.randn(1, 6, dtype=torch.float64)
    deq = il.DEQ(cell, backward="shine", **BROYDEN)
    z = deq(x)
    (z * g).sum().backward()
    st, bst = deq.stats["forward"], deq.stats["backward"]
    with torch.no_grad():
        zs = deq(x)  # z* itself (no graph)
        f = cell(zs, x)
    # Recover u from the bias gradient: dL/db = diag(1 - f^2) u for one sample.
    u = cell.b.grad / (1 - f[0] ** 2)
    k = int(st.state["k"])
    H = -torch.eye(6, dtype=torch.float64) + st.state["U"][0, :k].T @ st.state["V"][0, :k]
    torch.testing.assert_close(u, -(H.T @ g[0]), atol=1e-10, rtol=1e-9)
    J = _dense_J(cell, zs[0], x[0])
    measured = float(((J.T @ u + g[0] - u).norm() / g[0].norm()))
    assert float(bst.abs_residual[0]) == pytest.approx(measured, rel=1e-6)
    assert bst.solver == "shine" and bst.info["broyden_pairs"] == k > 0 and bst.nfe == 1
    # An approximation, reported as one: not the exact adjoint, and its status says so at the default tolerance.
    u_exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - J.T, g[0])
    assert (u - u_exact).norm() > 1e-4 * u_exact.norm()
    assert bst.status != "converged" and measured > 1e-5


def test_refinement_moves_shine_to_the_exact_gradient_faster_than_a_cold_start():
    torch.manual_seed(2)
    cell = TanhCell(16, norm=0.9, seed=3)
    x = torch.randn(8, 16, dtype=torch.float64)
    g = torch.randn(8, 16, dtype=torch.float64)

    def grad(backward):
        xx = x.clone().requires_grad_()
        deq = il.DEQ(cell, backward=backward, on_failure="ignore", **BROYDEN)
        (deq(xx) * g).sum().backward()
        return xx.grad

    ref = grad("implicit")
    err = lambda gx: float((gx - ref).norm() / ref.norm())
    shine, refined, cold = grad("shine"), grad(il.ShineGradient(refine=3)), grad(il.ImplicitGradient(max_iter=3))
    jfb = grad("jfb")
    assert err(refined) < err(shine) / 10
    assert err(refined) < err(cold)  # the estimate is a better start than the right-hand side
    assert err(shine) < err(jfb)  # and better than no adjoint at all
    # The dense reference agrees with the implicit mode (so the comparisons above are against the truth).
    gx, _ = dense_ift_grads(cell, x.clone().requires_grad_(), grad_z_star(cell, x), g)
    torch.testing.assert_close(ref, gx, atol=1e-7, rtol=1e-6)


def grad_z_star(cell, x):
    with torch.no_grad():
        return il.DEQ(cell, **BROYDEN)(x)


def test_frozen_samples_keep_their_estimate_across_restarts():
    # memory=2 restarts every 2 steps; per-sample stopping freezes the easy sample early, and a restart of the
    # others must not wipe its pairs.
    torch.manual_seed(3)
    cell = TanhCell(5, norm=0.9, seed=4)
    x = torch.randn(2, 5, dtype=torch.float64)
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    with torch.no_grad():  # sample 0 starts next to its fixed point: it converges in a step or two
        z0[0] = il.DEQ(cell, atol=1e-13, rtol=0, max_iter=500)(x[:1])[0] + 1e-7
    z, st = il.solvers.run_loop(cell, z0, args=(x,), solver=BroydenSolver(memory=2), stopping='per_sample', keep_state=True, options=LoopOptions(atol=1e-09, rtol=0, max_iter=200, on_failure='raise', return_trace=False, divergence_ratio=1000000.0))
    assert int(st.nstep[0]) < int(st.nstep[1]) and st.info["broyden_restarts"] > 0
    assert st.state["U"][0].abs().sum() > 0


def test_shine_is_refused_where_it_has_no_estimate():
    with pytest.raises(ValidationError, match="solver='broyden'"):
        il.DEQOptions(backward="shine")
    with pytest.raises(ValidationError, match="solver='broyden'"):
        il.DEQOptions(backward="shine", solver=["broyden", "picard"])
    with pytest.raises(UnsupportedError, match="trajectory"):
        il.DEQOptions(backward="shine", solver="broyden", trajectory=(2,))
    cell = TanhCell(4, norm=0.5)
    x = torch.randn(2, 4, dtype=torch.float64)
    deq = il.DEQ(cell, backward="shine", solver="broyden")
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(UnsupportedError, match="forward-mode"):
        deq(fwAD.make_dual(x, torch.ones_like(x)))
