"""Gradient modes as values (iterlayers.implicit): each equals its keyword shortcut, the implicit one the dense
implicit-function-theorem gradient; the trajectory (fixed-point correction) states against hand-iterated ones."""
import pytest
import torch

import iterlayers as il
from iterlayers.errors import OptionTypeError, ValidationError

B, D = 3, 5


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    return f, W, x


def grad_of(f, x, **options):
    xg = x.clone().requires_grad_()
    st = {}
    z = il.deq_solve(f, torch.zeros_like(x), args=(xg,), stats=st, atol=1e-12, rtol=0, max_iter=500,
                     on_failure="raise", **options)
    extra = sum(v.sum() for v in st.get("trajectory", {}).values()) if "trajectory" in st else 0
    (z.sum() + extra).backward()
    return z.detach(), xg.grad, st


def dense_ift_grad(f, W, x, z):
    """d sum(z*) / dx by the dense formula: per sample, g^T (I - J)^{-1} df/dx with J = diag(s) W, df/dx = diag(s)."""
    out = []
    for i in range(B):
        s = 1 - f(z[i : i + 1], x[i : i + 1])[0] ** 2
        J = s[:, None] * W
        u = torch.linalg.solve((torch.eye(D, dtype=torch.float64) - J).T, torch.ones(D, dtype=torch.float64))
        out.append(s * u)
    return torch.stack(out)


@pytest.mark.parametrize("name,value,keywords", [
    ("implicit", il.ImplicitGradient(solver="gmres", atol=1e-11), dict(backward_solver="gmres", backward_atol=1e-11)),
    ("phantom", il.PhantomGradient(steps=3, damping=0.7), dict(phantom_steps=3, phantom_damping=0.7)),
    ("jfb", il.JFBGradient(), {}),
    ("unrolled", il.UnrolledGradient(damping=0.9), dict(unrolled_damping=0.9)),
])
def test_a_mode_value_equals_its_keyword_shortcut(name, value, keywords):
    f, _, x = problem()
    _, g_value, _ = grad_of(f, x, backward=value)
    _, g_keyword, _ = grad_of(f, x, backward=name, **keywords)
    # the same computation; not asserted bitwise: BLAS may split reductions differently between two calls
    torch.testing.assert_close(g_value, g_keyword, rtol=1e-12, atol=1e-14)
    assert il.DEQOptions(backward=name, **keywords).gradient == value


def test_the_implicit_value_gives_the_dense_ift_gradient():
    f, W, x = problem(1)
    z, g, st = grad_of(f, x, backward=il.ImplicitGradient(solver="gmres", atol=1e-12))
    torch.testing.assert_close(g, dense_ift_grad(f, W, x, z), rtol=1e-9, atol=1e-10)
    assert st["backward"].status == "converged" and st["backward"].solver == "gmres"


def test_different_modes_give_different_gradients():
    """Negative control for the equality test above: the modes are not all the same map."""
    f, _, x = problem()
    grads = [grad_of(f, x, backward=m)[1] for m in ("implicit", "phantom", "jfb")]
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[0], grads[2])


def test_a_value_and_its_keywords_together_are_refused():
    with pytest.raises(ValidationError, match="phantom_steps"):
        il.DEQOptions(backward=il.PhantomGradient(steps=2), phantom_steps=3)
    with pytest.raises(ValidationError, match="backward_solver"):
        il.DEQOptions(backward=il.ImplicitGradient(), backward_solver="gmres")


@pytest.mark.parametrize("make,err", [
    (lambda: il.PhantomGradient(steps=0), ValidationError),
    (lambda: il.PhantomGradient(damping=0.0), ValidationError),
    (lambda: il.ImplicitGradient(max_iter=0), ValidationError),
    (lambda: il.ImplicitGradient(atol=1.0), ValidationError),
    (lambda: il.ImplicitGradient(atol=0.0, rtol=0.0), ValidationError),
    (lambda: il.ImplicitGradient(solver="nope"), ValidationError),
    (lambda: il.ImplicitGradient(solver_options=[1]), OptionTypeError),
    (lambda: il.UnrolledGradient(damping=1.5), ValidationError),
    (lambda: il.DEQOptions(backward="nope"), ValidationError),
])
def test_bad_mode_options_are_typed_errors(make, err):
    with pytest.raises(err):
        make()


def test_implicit_defaults_follow_the_forward_options():
    o = il.DEQOptions(atol=1e-3, rtol=0.0, max_iter=7)
    assert o.gradient.tolerances(o.atol, o.rtol, torch.float32) == (1e-5, 0.0)
    assert o.gradient.limit(o.max_iter) == 50
    assert o.adjoint_max_iter == 50 and o.adjoint_tolerances(torch.bfloat16)[0] == torch.finfo(torch.bfloat16).eps


# -- trajectory (fixed-point correction) ---------------------------------------------------------------------


def picard_states(f, x, ks):
    z, out = torch.zeros_like(x), {}
    for k in range(1, max(ks) + 1):
        z = f(z, x)
        if k in ks:
            out[k] = z
    return out


def test_trajectory_states_are_the_solver_iterates():
    f, _, x = problem()
    ks = (1, 2, 5)
    _, _, st = grad_of(f, x, solver="picard", stopping="joint", backward="jfb", trajectory=ks)
    ref = picard_states(f, x, ks)
    for k in ks:  # jfb attaches f(z_k): one more Picard step
        torch.testing.assert_close(st["trajectory"][k].detach(), f(ref[k], x), rtol=0, atol=0)


def test_trajectory_gradient_jfb_is_the_one_step_gradient_at_each_state():
    f, _, x = problem()
    ks = (2, 4)
    _, g, st = grad_of(f, x, solver="picard", stopping="joint", backward="jfb", trajectory=ks)
    ref_states = picard_states(f, x, ks)
    xg = x.clone().requires_grad_()
    z_star = st["forward"]  # the gradient of sum(z*) by JFB plus that of each kept state by one step
    with torch.no_grad():
        zs = il.deq_solve(f, torch.zeros_like(x), args=(x,), solver="picard", stopping="joint", atol=1e-12,
                          rtol=0, max_iter=500)
    loss = f(zs, xg).sum() + sum(f(ref_states[k].detach(), xg).sum() for k in ks)
    loss.backward()
    torch.testing.assert_close(g, xg.grad, rtol=1e-12, atol=1e-12)
    assert z_star.status == "converged"


def test_trajectory_gradient_implicit_is_the_ift_formula_at_each_state():
    f, W, x = problem(2)
    ks = (3,)
    xg = x.clone().requires_grad_()
    st = {}
    il.deq_solve(f, torch.zeros_like(x), args=(xg,), stats=st, solver="picard", stopping="joint", atol=1e-12,
                 rtol=0, max_iter=500, backward_solver="gmres", backward_atol=1e-12, trajectory=ks)
    st["trajectory"][3].sum().backward()
    zk = picard_states(f, x, ks)[3]
    # the hook solves u = J(z_k)^T u + 1 at the kept state and returns u^T df/dx there (the implicit formula
    # applied at z_k, as fixed-point correction does)
    torch.testing.assert_close(xg.grad, dense_ift_grad(f, W, x, zk), rtol=1e-9, atol=1e-10)
    assert st["trajectory_backward"][3].status == "converged" and st["backward"] is None


def test_trajectory_unrolled_states_are_the_differentiable_iterates():
    f, _, x = problem()
    ks = (1, 3)
    xg = x.clone().requires_grad_()
    st = {}
    il.deq_solve(f, torch.zeros_like(x), args=(xg,), stats=st, backward="unrolled", stopping="joint",
                 atol=1e-12, rtol=0, max_iter=500, trajectory=ks)
    st["trajectory"][3].sum().backward()
    x2 = x.clone().requires_grad_()
    picard_states(f, x2, (3,))[3].sum().backward()
    torch.testing.assert_close(xg.grad, x2.grad, rtol=0, atol=1e-14)


def test_an_iteration_beyond_the_solve_is_the_returned_state():
    f, _, x = problem()
    z, _, st = grad_of(f, x, backward="jfb", trajectory=(10_000,))
    # both are f(z*) for the returned iterate z* (jfb attaches one step)
    torch.testing.assert_close(st["trajectory"][10_000].detach(), z, rtol=0, atol=0)


@pytest.mark.parametrize("bad,err", [((0,), ValidationError), ("3", OptionTypeError), ((1.5,), OptionTypeError),
                                     (-1, ValidationError), (True, OptionTypeError), (2.0, OptionTypeError)])
def test_bad_trajectory_is_a_typed_error(bad, err):
    with pytest.raises(err):
        il.DEQOptions(trajectory=bad)


def test_run_loop_keeps_the_requested_iterates():
    f, _, x = problem()
    sol = il.solve(f, torch.zeros_like(x), args=(x,), solver="picard", stopping="joint", atol=1e-12, rtol=0,
                   max_iter=500, keep=(0, 2, 10_000))
    ref = picard_states(f, x, (2,))
    assert torch.equal(sol.stats.iterates[0], torch.zeros_like(x))
    torch.testing.assert_close(sol.stats.iterates[2], ref[2], rtol=0, atol=0)
    assert torch.equal(sol.stats.iterates[10_000], sol.z)


@pytest.mark.parametrize("mode", ["implicit", "phantom", "jfb"])
def test_trajectory_updates_running_statistics_once_per_call(mode):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(D, dtype=torch.float64).train()
    W = 0.3 * torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0]

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, z, x):
            return torch.tanh(0.5 * self.bn(z @ W.T) + x)

    x = torch.randn(8, D, dtype=torch.float64, requires_grad=True)
    layer = il.DEQ(Cell(), backward=mode, trajectory=(1, 2, 3), atol=1e-10, rtol=0, max_iter=200)
    z = layer(x)
    assert int(bn.num_batches_tracked) == 1
    (z.sum() + sum(s.sum() for s in layer.stats["trajectory"].values())).backward()


def test_a_trajectory_count_spreads_the_states_over_the_iterations_taken():
    f, _, x = problem()
    _, _, st = grad_of(f, x, solver="picard", stopping="joint", backward="jfb", trajectory=3)
    n_it = int(st["forward"].nstep.max())
    ks = sorted({-(-i * n_it // 3) for i in range(1, 4)})  # ceil(i N / 3)
    assert sorted(st["trajectory"]) == ks and n_it > 3
    ref = picard_states(f, x, tuple(ks))
    for k in ks:
        torch.testing.assert_close(st["trajectory"][k].detach(), f(ref[k], x), rtol=1e-12, atol=1e-12)
