"""The implicit backward's options against exact references: which tolerance stops the adjoint solve (exact
step counts of the Picard adjoint iteration on a linear cell), its iteration limit, the scaling of the
incoming gradient, and the closed-form gradients of the damped phantom and unrolled modes."""
import pytest
import torch

import iterlayers as il
from problems import LinearCell, random_matrix

F64 = torch.float64
N, B = 6, 3


def linear_problem(seed=21, norm=0.8):
    A = random_matrix(N, norm, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, N, generator=g, dtype=F64)
    grad = torch.randn(B, N, generator=g, dtype=F64) * torch.tensor([[1e-4], [1.0], [1e3]], dtype=F64)
    return A, x, grad


def reference_adjoint_steps(A, grad, atol, rtol, max_iter):
    """Picard on the adjoint u = A^T u + r (row form u <- u A + r) with r = grad / ||grad|| per sample, from
    u0 = r, stopped by ||f(u) - u|| <= atol + rtol ||f(u)||; the number of steps per sample."""
    steps = []
    for g in grad:
        r = g / g.norm()
        u, k = r.clone(), 0
        while True:
            fu = u @ A + r
            if float((fu - u).norm()) <= atol + rtol * float(fu.norm()) or k == max_iter:
                break
            u, k = fu, k + 1
        steps.append(k)
    return steps


def backward_stats(A, x, grad, **opts):
    cell = LinearCell(A)
    deq = il.DEQ(cell, solver="anderson", atol=1e-13, rtol=0.0, max_iter=300, backward_solver="picard",
                 on_failure="ignore", **opts)
    xg = x.clone().requires_grad_()
    z = deq(xg)
    (z * grad).sum().backward()
    return deq, deq.stats["backward"], xg.grad


@pytest.mark.parametrize("batol,brtol", [(1e-4, 1e-12), (1e-13, 1e-4), (1e-6, 1e-6)])
def test_the_adjoint_stops_by_its_own_tolerances(batol, brtol):
    A, x, grad = linear_problem()
    deq, st, gx = backward_stats(A, x, grad, backward_atol=batol, backward_rtol=brtol, backward_max_iter=400)
    assert (st.atol, st.rtol) == (batol, brtol)
    steps = reference_adjoint_steps(A, grad, batol, brtol, 400)
    # The adjoint rows iterate jointly (J^T couples rows whenever the cell does): every row takes the steps of
    # the slowest one, and stops exactly when that one meets the tolerance.
    assert st.nstep.tolist() == [max(steps)] * len(steps)
    # the gradient meets the tolerance it was solved to: (I - A)^{-T} g up to that accuracy
    exact = torch.linalg.solve((torch.eye(N, dtype=F64) - A).T, grad.T).T
    err = (gx - exact).norm(dim=1) / grad.norm(dim=1)
    assert float(err.max()) <= 20 * (batol + brtol * 5)


def test_the_two_adjoint_tolerances_give_different_counts():
    # the test above could not tell atol from rtol if both stopped at the same step
    A, _, grad = linear_problem()
    assert reference_adjoint_steps(A, grad, 1e-4, 1e-12, 400) != reference_adjoint_steps(A, grad, 1e-12, 1e-4, 400)


def test_an_unset_adjoint_rtol_is_not_the_forward_atol():
    # With backward_rtol=None the adjoint uses min(forward rtol, 1e-5) (documented; never looser than 1e-5, so a
    # loose forward tolerance cannot degenerate the gradient): never the forward atol, which equal defaults
    # would hide. Likewise an unset backward_atol is min(forward atol, 1e-5).
    o = il.DEQOptions(atol=1e-3, rtol=1e-9, backward_atol=1e-12)
    assert o.adjoint_rtol == 1e-9 and o.adjoint_atol == 1e-12
    o = il.DEQOptions(atol=1e-3, rtol=1e-9, backward_rtol=1e-12)
    assert o.adjoint_atol == 1e-5 and o.adjoint_rtol == 1e-12
    o = il.DEQOptions(atol=1e-7, rtol=1e-2)
    assert o.adjoint_atol == 1e-7 and o.adjoint_rtol == 1e-5
    A, x, grad = linear_problem()
    deq, st, _ = backward_stats(A, x, grad, backward_atol=1e-13, backward_max_iter=400)
    assert st.rtol == 0.0  # the forward rtol of backward_stats
    assert st.nstep.tolist() == [max(reference_adjoint_steps(A, grad, 1e-13, 0.0, 400))] * len(grad)


def test_backward_max_iter_limits_the_adjoint_solve():
    A, x, grad = linear_problem()
    deq, st, gx = backward_stats(A, x, grad, backward_atol=1e-14, backward_rtol=0.0, backward_max_iter=3)
    assert st.max_iter == 3 and st.nstep.tolist() == [3, 3, 3]
    assert st.status == "max_iter"
    # three Picard steps from the right-hand side: the Neumann sum g (I + A + A^2 + A^3)
    I = torch.eye(N, dtype=F64)
    expected = grad @ (I + A + A @ A + A @ A @ A)
    torch.testing.assert_close(gx, expected, rtol=1e-12, atol=1e-15 * float(grad.abs().max()))


def test_gradients_of_any_scale_are_exact():
    # the adjoint is solved for grad / ||grad|| and rescaled: gradients of norm 1e-4 to 1e3 are all exact
    A, x, grad = linear_problem()
    _, st, gx = backward_stats(A, x, grad, backward_atol=1e-13, backward_rtol=0.0, backward_max_iter=400)
    exact = torch.linalg.solve((torch.eye(N, dtype=F64) - A).T, grad.T).T
    torch.testing.assert_close(gx, exact, rtol=1e-10, atol=0)


@pytest.mark.parametrize("damping", [0.5, 1.0])
def test_unrolled_gradient_is_the_damped_loop_in_closed_form(damping):
    # z_{k+1} = M z_k + beta x with M = (1 - beta) I + beta A, from z0 = 0: z_K = beta sum_{j<K} M^j x, so
    # d(c . z_K)/dx = beta c sum_{j<K} M^j   (row form: c @ (beta sum_j M^j)^T ... with z A^T rows)
    A, x, _ = linear_problem(norm=0.7)
    K = 9
    deq = il.DEQ(LinearCell(A), backward="unrolled", unrolled_damping=damping, atol=1e-300, rtol=0.0, max_iter=K,
                 on_failure="ignore")
    xg = x.clone().requires_grad_()
    z = deq(xg)
    assert deq.stats["forward"].nstep.tolist() == [K] * B
    c = torch.linspace(-1, 2, N, dtype=F64).expand(B, N)
    (z * c).sum().backward()
    I = torch.eye(N, dtype=F64)
    M = (1 - damping) * I + damping * A
    S = damping * sum(torch.linalg.matrix_power(M, j) for j in range(K))
    torch.testing.assert_close(z.detach(), x @ S.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(xg.grad, c @ S, rtol=1e-12, atol=1e-14)


def test_phantom_gradient_is_the_damped_steps_in_closed_form():
    # k steps z <- (1 - lam) z + lam (A z + x) from z*: d(c . z_k)/dx = c (M^k dz*/dx + lam sum_{j<k} M^j)
    # with M = (1 - lam) I + lam A; z* is detached, so only the second term is differentiated.
    A, x, _ = linear_problem(norm=0.7)
    k, lam = 4, 0.3
    deq = il.DEQ(LinearCell(A), backward="phantom", phantom_steps=k, phantom_damping=lam, atol=1e-13, rtol=0.0,
                 max_iter=300)
    xg = x.clone().requires_grad_()
    c = torch.linspace(-1, 2, N, dtype=F64).expand(B, N)
    (deq(xg) * c).sum().backward()
    I = torch.eye(N, dtype=F64)
    M = (1 - lam) * I + lam * A
    S = lam * sum(torch.linalg.matrix_power(M, j) for j in range(k))
    torch.testing.assert_close(xg.grad, c @ S, rtol=1e-12, atol=1e-14)
