"""DEQ inputs and cell kinds: several inputs, tuple inputs, non-batched keyword arguments, batch norm,
compiled cells, autocast, empty batches, and clear errors for structural mistakes."""
import shutil

import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.errors import OptionTypeError, ShapeMismatchError, ValidationError
from problems import TanhCell, random_matrix

TIGHT = dict(atol=1e-12, rtol=0.0, max_iter=400)


def true_residual(cell, z, *inputs, **shared):
    """||cell(z) - z|| per sample, measured here, not taken from the solver's statistics."""
    with torch.no_grad():
        return (cell(z, *inputs, **shared) - z).flatten(1).norm(dim=1)


class TwoInputs(nn.Module):
    """tanh(W z + A a + B b): samples converge at different speeds (inputs of different scales)."""

    def __init__(self, n=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(random_matrix(n, 0.9, seed=seed))
        self.A = nn.Parameter(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.B = nn.Parameter(torch.randn(n, 3, generator=g, dtype=torch.float64))

    def forward(self, z, a, b):
        return torch.tanh(z @ self.W.T + a @ self.A.T + b @ self.B.T)


class TupleInput(TwoInputs):
    def forward(self, z, ab):
        a, b = ab
        return super().forward(z, a, b)


def spread(n_samples, dim, *, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 0.5, n_samples, dtype=torch.float64)[:, None]
    return scale * torch.randn(n_samples, dim, generator=g, dtype=torch.float64)


def test_several_inputs_and_a_tuple_input_are_sliced_consistently():
    a, b = spread(6, 5, seed=1), spread(6, 3, seed=2)
    cell = TwoInputs()
    for stopping in ("per_sample", "auto"):
        deq = il.DEQ(cell, stopping=stopping, **TIGHT)
        z = deq(a, b)
        st = deq.stats["forward"]
        assert st.status == "converged" and int(st.nstep.min()) < int(st.nstep.max())  # rows were dropped
        assert true_residual(cell, z, a, b).max() < 1e-11
        tcell = TupleInput()
        zt = il.DEQ(tcell, stopping=stopping, **TIGHT)((a, b), z0=torch.zeros_like(a))
        torch.testing.assert_close(zt, z, atol=1e-11, rtol=0)


def test_gradients_flow_to_every_input_and_to_keyword_arguments():
    cell = TwoInputs()
    a, b = spread(4, 5, seed=3).requires_grad_(), spread(4, 3, seed=4).requires_grad_()
    il.DEQ(cell, **TIGHT)(a, b).pow(2).sum().backward()

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = cell

        def forward(self, z, a, *, b):
            return self.inner(z, a, b)

    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    il.DEQ(Kw(), **TIGHT)(a2, b=b2).pow(2).sum().backward()
    torch.testing.assert_close(a2.grad, a.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(b2.grad, b.grad, atol=1e-10, rtol=1e-9)
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


class GraphCell(nn.Module):
    """Nodes are rows: z_next = tanh(A_hat z W + x U), coupled through the (normalised) adjacency."""

    def __init__(self, n=4, seed=0):
        super().__init__()
        self.W = nn.Parameter(random_matrix(n, 0.8, seed=seed))
        self.U = nn.Parameter(random_matrix(n, 1.0, seed=seed + 1))

    def forward(self, z, x, adj):
        return torch.tanh(adj @ z @ self.W + x @ self.U)


def graph(nodes=7, seed=5):
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(nodes, nodes, generator=g) < 0.4).double()
    A = ((A + A.T) > 0).double() + torch.eye(nodes, dtype=torch.float64)
    d = A.sum(1).rsqrt()
    return d[:, None] * A * d[None, :]  # spectral norm 1


def test_keyword_arguments_are_never_sliced_and_graph_rows_are_solved_right():
    cell, adj = GraphCell(), graph()
    x = spread(7, 4, seed=6).requires_grad_()
    deq = il.DEQ(cell, **TIGHT)
    z = deq(x, adj=adj)
    assert true_residual(cell, z, x, adj=adj).max() < 1e-10
    # Against the dense fixed point of the whole graph: vec(z) = tanh((W^T kron A) vec(z) + vec(xU)).
    (gx,) = torch.autograd.grad(z.pow(2).sum(), x)
    zr = z.detach().clone().requires_grad_()
    fz = cell(zr, x, adj)
    J = torch.autograd.functional.jacobian(lambda zz: cell(zz, x.detach(), adj), zr.detach()).reshape(28, 28)
    u = torch.linalg.solve((torch.eye(28, dtype=torch.float64) - J).T, 2 * z.detach().reshape(-1))
    (gref,) = torch.autograd.grad(fz, x, u.reshape(7, 4))
    torch.testing.assert_close(gx, gref, atol=1e-9, rtol=1e-8)


class BNCell(nn.Module):
    def __init__(self, n=5):
        super().__init__()
        torch.manual_seed(7)
        self.lin = nn.Linear(n, n).double()
        self.bn = nn.BatchNorm1d(n, eps=1.0).double()  # eps = 1 keeps z -> bn(z) Lipschitz
        with torch.no_grad():
            self.lin.weight.mul_(0.2 / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z, x):
        # batch statistics of z (spread over the batch by x): a contraction with these inputs
        return torch.tanh(0.3 * self.bn(z) + self.lin(z) + x)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jfb", "unrolled"])
def test_train_mode_batch_norm_is_solved_jointly_and_updates_its_statistics_once(backward):
    cell = BNCell()
    x = 0.3 * spread(6, 5, seed=8)
    deq = il.DEQ(cell, backward=backward, atol=1e-10, rtol=0, max_iter=300)
    before = cell.bn.running_mean.clone()
    z = deq(x)
    z.sum().backward()
    assert int(cell.bn.num_batches_tracked) == 1
    assert not torch.equal(cell.bn.running_mean, before)
    assert deq.stats["forward"].info["stopping"] == "joint"
    # The returned rows are a fixed point of the batch (measured with batch statistics, state untouched).
    saved = {k: v.clone() for k, v in cell.bn.state_dict().items()}
    tol = 1e-9 if backward in ("implicit", "jfb") else 2e-8
    assert true_residual(cell, z, x).max() < tol
    cell.bn.load_state_dict(saved)
    with pytest.raises(ValidationError, match="stopping='per_sample'"):
        il.DEQ(cell, stopping="per_sample")(x)
    with torch.no_grad():
        cell.eval()
        il.DEQ(cell)(x)
        assert int(cell.bn.num_batches_tracked) == 1  # eval mode: running statistics are read, not updated


def test_empty_batch_returns_an_empty_output_and_backward_works():
    cell = TanhCell(4, norm=0.5, seed=9)
    x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    z = il.DEQ(cell)(x)
    assert z.shape == (0, 4)
    z.sum().backward()
    assert x.grad.shape == (0, 4) and cell.W.grad is not None


def test_autocast_bf16_cell_with_a_float32_state():
    # The mixed-precision policy: the cell runs in bf16, the state and the solver's arithmetic stay float32.
    torch.manual_seed(10)
    cell = nn.Sequential()  # placeholder for the repr; the cell is below

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.inj = nn.Linear(8, 8), nn.Linear(8, 8)
            with torch.no_grad():
                self.lin.weight.mul_(0.3 / torch.linalg.matrix_norm(self.lin.weight, 2))

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + self.inj(x))

    cell = Cell()
    x = torch.randn(6, 8, requires_grad=True)
    deq = il.DEQ(cell, atol=2e-2, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(x)
    assert z.dtype == torch.float32 and deq.stats["forward"].status == "converged"
    assert deq.stats["forward"].info["cell_dtype"] == "torch.bfloat16"
    z.float().pow(2).sum().backward()
    assert deq.stats["backward"].status == "converged"
    # Against the float32 implicit gradient: bf16 resolution (eps 7.8e-3) bounds the agreement.
    x32 = x.detach().clone().requires_grad_()
    il.DEQ(cell, atol=1e-6, rtol=0)(x32).pow(2).sum().backward()
    assert (x.grad - x32.grad).norm() < 0.05 * x32.grad.norm()


def test_structural_mistakes_are_reported_before_any_iteration_naming_the_argument():
    cell = TanhCell(4, norm=0.5, seed=11)
    x = torch.randn(3, 4, dtype=torch.float64)
    deq = il.DEQ(cell)
    with pytest.raises(ShapeMismatchError, match="z0 has batch size 2"):
        deq(x, z0=torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ShapeMismatchError, match=r"x has shape \(4,\)"):
        deq(x[0])
    with pytest.raises(OptionTypeError, match="x is a int"):
        deq(3)
    with pytest.raises(OptionTypeError, match="x has dtype torch.int64"):
        deq(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ShapeMismatchError, match="is on meta"):
        deq(x, z0=torch.zeros(3, 4, dtype=torch.float64, device="meta"))
    with pytest.raises(ShapeMismatchError, match="keyword argument"):
        il.DEQ(GraphCell())(spread(7, 4, seed=1), graph()[:5])  # a table passed as a batched input
    with pytest.raises(ValidationError, match="keyword argument that has a dimension of the batch size"):
        il.DEQ(GraphCell(), stopping="per_sample")(spread(7, 4, seed=1), adj=graph())
    for bad in (lambda z, x: [z], lambda z, x: None, lambda z, x: (z, z), lambda z, x: z[:, :2]):
        with pytest.raises(il.IterlayersError):
            il.DEQ(bad)(x)
    with pytest.raises(OptionTypeError, match="atol must be a number"):
        il.DEQ(cell, atol="tight")
    with pytest.raises(OptionTypeError, match="args must be a tuple"):
        il.deq_solve(cell, torch.zeros_like(x), args=x)


def test_the_former_forward_x_z0_call_still_means_z0():
    cell = TanhCell(4, norm=0.5, seed=12)
    x = torch.randn(3, 4, dtype=torch.float64)
    z0 = torch.randn(3, 4, dtype=torch.float64)
    deq = il.DEQ(cell, backward="unrolled", max_iter=1, on_failure="ignore")
    with torch.no_grad():
        torch.testing.assert_close(deq(x, z0), deq(x, z0=z0))
        assert not torch.allclose(deq(x, z0), deq(x))


class ReluCell(nn.Module):
    def __init__(self, norm, n=16):
        super().__init__()
        torch.manual_seed(13)
        self.lin = nn.Linear(n, n)
        self.norm = norm
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z, x):
        return self.norm(torch.relu(self.lin(z)) + x)


def dense_ift(cell, z, x, g):
    """(dL/dx, dL/dparams) from the dense implicit-function theorem at ``z`` for independent rows (eager)."""
    z = z.detach()
    n = z.shape[1]
    u = torch.stack([
        torch.linalg.solve((torch.eye(n) - torch.autograd.functional.jacobian(
            lambda zz: cell(zz[None], x[i : i + 1])[0], z[i])).T, g[i])
        for i in range(z.shape[0])
    ])
    xr = x.detach().requires_grad_()
    gx, *gp = torch.autograd.grad(cell(z, xr), [xr, *cell.parameters()], u)
    return gx, gp


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
@pytest.mark.parametrize("norm", ["identity", "layernorm", "groupnorm"])
def test_compiled_cells_with_inductor_are_exact(norm):
    """The real inductor backend, float32 (where the graph reused by the adjoint's repeated VJPs went wrong:
    92-370% gradient errors before the differentiable evaluations ran eagerly). Each gradient is compared
    with the dense implicit gradient at the solution it returned (ReLU kinks make a comparison of two solves
    at 1e-6 apart ill-posed), and the solution with the eager one."""
    make = {"identity": nn.Identity, "layernorm": lambda: nn.LayerNorm(16), "groupnorm": lambda: nn.GroupNorm(4, 16)}
    x = (torch.randn(32, 16, generator=torch.Generator().manual_seed(14))
         * torch.logspace(0, 0.3, 32)[:, None])
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(15))  # dL/dz (sum z^2 is flat after LN)
    solutions = {}
    for how in ("eager", "method", "wrapper"):
        cell = ReluCell(make[norm]())
        run = cell
        if how == "method":
            cell.compile()  # inductor, the default backend
        elif how == "wrapper":
            run = torch.compile(cell)
        deq = il.DEQ(run, atol=1e-6, rtol=0, max_iter=200, backward_atol=1e-6, backward_rtol=0, on_failure="raise")
        for _ in range(2):  # a second call reuses the compiled graphs
            cell.zero_grad()
            xi = x.clone().requires_grad_()
            z = deq(xi)
            (z * g).sum().backward()
        if how != "eager":
            # Per-sample stopping as in eager mode, the compiled cell evaluated on the whole batch each time.
            assert deq.stats["forward"].info["stopping"].startswith("per_sample")
        solutions[how] = z.detach()
        assert true_residual(cell, z, xi).max() < 2e-6
        gx, gp = dense_ift(cell, z, x, g)
        assert (xi.grad - gx).norm() <= 1e-5 * gx.norm()
        for p, ref in zip(cell.parameters(), gp):
            assert (p.grad - ref).norm() <= 1e-5 * ref.norm()
    for how in ("method", "wrapper"):
        torch.testing.assert_close(solutions[how], solutions["eager"], atol=1e-5, rtol=0)


def test_a_non_finite_sample_is_marked_diverged_or_named_in_the_error():
    cell = TanhCell(4, norm=0.5, seed=16)
    x = torch.randn(4, 4, dtype=torch.float64)
    x[2, 1] = float("nan")
    for hoist in (True, False):
        deq = il.DEQ(cell, hoist=hoist, on_failure="ignore", **{k: v for k, v in TIGHT.items()})
        z = deq(x)
        st = deq.stats["forward"]
        assert bool(st.diverged[2]) and bool(st.converged[[0, 1, 3]].all())
        assert true_residual(cell, z[[0, 1, 3]], x[[0, 1, 3]]).max() < 1e-11
        with pytest.raises(il.NonFiniteInputError, match=r"\bx\b"):
            il.DEQ(cell, hoist=hoist, on_failure="raise")(x)


def test_failure_messages_say_which_solve_failed():
    cell = TanhCell(6, norm=0.95, seed=17)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(il.ConvergenceError, match="forward"):
        il.DEQ(cell, max_iter=1, atol=1e-14, rtol=0, on_failure="raise")(x)
    z = il.DEQ(cell, backward_max_iter=1, backward_atol=1e-14, backward_rtol=0, on_failure="raise")(x)
    with pytest.raises(il.ConvergenceError, match="backward"):
        z.sum().backward()
