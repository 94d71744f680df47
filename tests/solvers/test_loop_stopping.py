"""Stopping rules on cells that couple samples: a differential test against a long reference solve.

Each cell of the zoo is solved with every stopping rule and compared with an explicit fixed point of the whole
batch (many damped Picard iterations in float64, written here); the residual is recomputed on the whole batch,
independently of the solver's statistics. ``stopping="per_sample"`` on a coupled cell is the negative control:
it reports convergence at a point that is not a fixed point.
"""
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import iterlayers as il

B, D = 12, 5
ATOL = 1e-9


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    # samples of very different scales converge at different iterations: the active set shrinks
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * torch.logspace(-3, 0.5, B, dtype=torch.float64)[:, None]
    adj = (torch.rand(B, B, generator=g) < 0.3).double() + torch.eye(B, dtype=torch.float64)
    adj = adj / adj.sum(1, keepdim=True)  # row-stochastic: ||adj||_inf = 1
    return W, x, adj


def _zoo():
    """name -> (f, args, kwargs, whole-batch map z -> f(z)); every cell is a contraction of the whole batch."""
    W, x, adj = _data()
    bn = torch.nn.BatchNorm1d(D, dtype=torch.float64).train()
    with torch.no_grad():
        bn.weight.fill_(0.1)

    def indep(z, x):
        return torch.tanh(z @ W.T + x)

    def zmean(z, x):
        return torch.tanh(z @ W.T + x) - 0.4 * z.mean(0)

    def xmean(z, x):
        return torch.tanh(z @ W.T + x - x.mean(0))

    def batchnorm(z, x):
        return torch.tanh(bn(z @ W.T) + x)

    def graph_kw(z, x, adj):
        return torch.tanh(0.8 * adj @ z @ W.T + x)

    def graph_args(z, x, adj):  # the adjacency passed as a batched input: sliced by rows
        return torch.tanh(0.8 * adj @ z @ W.T + x)

    def graph_closure(z):
        return torch.tanh(0.8 * adj @ z @ W.T + x)

    return {
        "independent": (indep, (x,), None, lambda z: indep(z, x)),
        "z_minus_batch_mean": (zmean, (x,), None, lambda z: zmean(z, x)),
        "x_minus_batch_mean": (xmean, (x,), None, lambda z: xmean(z, x)),
        "train_batchnorm": (batchnorm, (x,), None, lambda z: batchnorm(z, x)),
        "graph_kwargs": (graph_kw, (x,), {"adj": adj}, lambda z: graph_kw(z, x, adj)),
        "graph_args": (graph_args, (x, adj), None, lambda z: graph_args(z, x, adj)),
        "graph_closure": (graph_closure, (), None, graph_closure),
    }


ZOO = _zoo()
COUPLED = [k for k in ZOO if k != "independent"]


def _reference(full, n=3000):
    """The fixed point of the whole batch by damped Picard iteration (independent of the loop)."""
    z = torch.zeros(B, D, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            z = 0.5 * z + 0.5 * full(z)
        assert float((full(z) - z).norm(dim=1).max()) < 1e-13
    return z


REFERENCE = {name: _reference(c[3]) for name, c in ZOO.items()}


@pytest.mark.parametrize("solver", ["anderson", "picard"])
@pytest.mark.parametrize("stopping", ["verify", "joint"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_solution_is_the_whole_batch_fixed_point(name, stopping, solver):
    f, args, kwargs, full = ZOO[name]
    sol = il.solve(f, torch.zeros(B, D, dtype=torch.float64), args=args, kwargs=kwargs, solver=solver, atol=ATOL,
                   rtol=0, max_iter=300, on_failure="raise", stopping=stopping)
    with torch.no_grad():
        true = (full(sol.z) - sol.z).norm(dim=1)
    assert sol.stats.status == "converged"
    assert float(true.max()) <= ATOL * (1 + 1e-6)
    # every cell is a whole-batch contraction with constant <= 0.9: ||z - z*|| <= ||r|| / (1 - 0.9)
    assert float((sol.z - REFERENCE[name]).norm()) <= 10 * float(true.norm()) + 1e-13
    info = sol.stats.info["stopping"]
    if stopping == "joint":
        assert info == "joint" and len(set(sol.stats.nstep.tolist())) == 1
    elif name == "independent":
        assert info == "per_sample (verified)" and len(set(sol.stats.nstep.tolist())) > 1
    else:
        assert info.startswith("joint ("), info


@pytest.mark.parametrize("name", ["x_minus_batch_mean", "graph_closure"])
def test_per_sample_stopping_on_a_coupled_cell_is_wrong(name):
    """The negative control: freezing samples of a coupled cell reports convergence away from the fixed point."""
    f, args, kwargs, full = ZOO[name]
    sol = il.solve(f, torch.zeros(B, D, dtype=torch.float64), args=args, kwargs=kwargs, solver="anderson",
                   atol=ATOL, rtol=0, max_iter=300, on_failure="ignore", stopping="per_sample")
    with torch.no_grad():
        true = (full(sol.z) - sol.z).norm(dim=1)
    assert bool((sol.stats.converged & (true > 2 * ATOL)).any())


def test_verify_costs_one_evaluation_on_independent_samples():
    """Sliced solve: the probe rides in the first sub-batch call (one row here), the final check is one call."""
    sizes = {}

    def run(stopping):
        sizes[stopping] = []

        def f(z, x):
            sizes[stopping].append(z.shape[0])
            return x * z

        x = torch.tensor([[0.01], [0.5], [0.9]], dtype=torch.float64)
        return il.solve(f, torch.ones(3, 1, dtype=torch.float64), args=(x,), solver="picard", atol=1e-8, rtol=0,
                        max_iter=500, stopping=stopping, on_failure="raise")

    ps, vf = run("per_sample"), run("verify")
    assert torch.equal(ps.z, vf.z) and torch.equal(ps.stats.nstep, vf.stats.nstep)
    assert vf.stats.nfe == ps.stats.nfe + 1 == len(sizes["verify"])
    # per-sample stopping still saves evaluations: rows, not calls, decide the cost
    assert sum(sizes["verify"]) == sum(sizes["per_sample"]) + 1 + 3
    assert vf.stats.info["stopping"] == "per_sample (verified)"


def test_verify_on_a_closure_costs_no_evaluation():
    x = torch.tensor([[0.01], [0.5], [0.9]], dtype=torch.float64)
    ps = il.solve(lambda z: x * z, torch.ones(3, 1, dtype=torch.float64), solver="anderson", atol=1e-10, rtol=0,
                  stopping="per_sample")
    vf = il.solve(lambda z: x * z, torch.ones(3, 1, dtype=torch.float64), solver="anderson", atol=1e-10, rtol=0)
    assert vf.stats.nfe == ps.stats.nfe and torch.equal(vf.z, ps.z)
    assert vf.stats.info["stopping"] == "per_sample (verified)"


def test_samples_that_stop_together_need_no_verification():
    x = torch.ones(4, 3, dtype=torch.float64)
    ps = il.solve(lambda z, xx: 0.5 * z + xx, torch.zeros(4, 3, dtype=torch.float64), args=(x,), solver="picard",
                  atol=1e-9, rtol=0, stopping="per_sample")
    vf = il.solve(lambda z, xx: 0.5 * z + xx, torch.zeros(4, 3, dtype=torch.float64), args=(x,), solver="picard",
                  atol=1e-9, rtol=0)
    assert vf.stats.nfe == ps.stats.nfe
    assert vf.stats.info["stopping"] == "per_sample (no row stopped early)"


def test_coupling_found_by_the_probe_costs_one_evaluation():
    """x - mean(x) over the sub-batch differs at once: joint from the first sub-batch step on."""
    f, args, kwargs, full = ZOO["x_minus_batch_mean"]
    (x,) = args
    seen = []

    def counted(z, xx):
        seen.append(xx)
        return f(z, xx)

    kw = dict(solver="picard", atol=ATOL, rtol=0, max_iter=300, on_failure="raise")
    ps = il.solve(f, torch.zeros(B, D, dtype=torch.float64), args=args, stopping="per_sample", **kw)
    n0 = int(ps.stats.nstep.min())  # the first sample freezes after n0 steps: step n0 + 1 is a sub-batch one
    sol = il.solve(counted, torch.zeros(B, D, dtype=torch.float64), args=args, **kw)
    assert sol.stats.info["stopping"] == f"joint (coupling detected at iteration {n0 + 1})"  # by the probe ...
    whole = [s.shape == x.shape and torch.equal(s, x) for s in seen]
    assert all(whole[: n0 + 1]) and not whole[n0 + 1]  # call n0 + 1 is the first sub-batch call (with the probe)
    assert all(whole[n0 + 2:])  # ... then one whole evaluation, and joint steps
    assert sol.stats.nfe == len(seen) == n0 + 3 + (int(sol.stats.nstep[0]) - (n0 + 1))


def test_kwargs_are_never_sliced_and_args_are():
    _, x, adj = _data()
    seen = []

    def f(z, x, *, adj, scale):
        seen.append((z.shape[0], x.shape[0], tuple(adj.shape), scale))
        return 0.5 * z + x

    sol = il.solve(f, torch.zeros(B, D, dtype=torch.float64), args=(x,), kwargs={"adj": adj, "scale": 2},
                   solver="picard", atol=1e-9, rtol=0, stopping="per_sample")
    assert sol.stats.status == "converged"
    assert all(zb == xb and a == (B, B) and s == 2 for zb, xb, a, s in seen)
    assert min(zb for zb, *_ in seen) < B  # sub-batches happened, with x sliced alongside z


def test_joint_divergence_of_one_row_is_not_frozen():
    """A NaN in one row of a coupled system ends the solve, reported diverged, every row with the same nstep."""
    def f(z, x):
        out = 0.5 * z + x - 0.1 * z.mean(0)
        return torch.where((z[:, :1] > 1.5) & (x[:, :1] > 0.9), torch.full_like(out, float("nan")), out)

    x = torch.tensor([[1.0, 0.0], [0.1, 0.2], [0.3, 0.1]], dtype=torch.float64)
    for stopping in ("joint", "verify"):
        sol = il.solve(f, torch.zeros(3, 2, dtype=torch.float64), args=(x,), solver="picard", atol=1e-12, rtol=0,
                       stopping=stopping, on_failure="ignore")
        assert sol.stats.status == "diverged" and sol.stats.diverged.tolist()[0]
        assert torch.isfinite(sol.z).all()
        with torch.no_grad():
            true = torch.nan_to_num((f(sol.z, x) - sol.z).norm(dim=1), nan=float("inf"))
        torch.testing.assert_close(sol.stats.abs_residual, true, rtol=1e-12, atol=0)
        assert len(set(sol.stats.nstep.tolist())) == 1 and sol.stats.info["stopping"].startswith("joint")


def _coupled_case(seed: int, variant: str):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    b, d = rnd.randint(2, 9), rnd.randint(1, 4)
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    # a random batch-mixing matrix with a random zero/non-zero structure, ||M||_2 = 0.3 (or M = 0)
    mask = torch.rand(b, b, generator=g) < rnd.random()
    M = torch.where(mask, 0.05 + 0.95 * torch.rand(b, b, generator=g, dtype=torch.float64), torch.zeros(b, b).double())
    if float(M.abs().sum()) > 0:
        M = 0.3 * M / torch.linalg.matrix_norm(M, 2)
    x = torch.randn(b, d, generator=g, dtype=torch.float64) * 3 * torch.rand(b, 1, generator=g, dtype=torch.float64)
    w = torch.where(torch.rand(b, generator=g) < 0.5, torch.rand(b, generator=g, dtype=torch.float64),
                    torch.zeros(b, dtype=torch.float64))
    ids = torch.arange(b)

    def cell(z, x):
        return torch.tanh(z @ W.T + x)

    if variant == "closure":
        return b, d, (lambda z: cell(z, x) + M @ z), (), None, (lambda z: cell(z, x) + M @ z)
    if variant == "kwargs":
        return b, d, (lambda z, x, M: cell(z, x) + M @ z), (x,), {"M": M}, (lambda z: cell(z, x) + M @ z)
    if variant == "args":
        return b, d, (lambda z, x, M: cell(z, x) + M @ z), (x, M), None, (lambda z: cell(z, x) + M @ z)
    if variant == "node_ids":  # evaluates on any sub-batch, with the sub-matrix of the rows present
        return b, d, (lambda z, x, i: cell(z, x) + M[i][:, i] @ z), (x, ids), None, (lambda z: cell(z, x) + M @ z)

    def wmean(z, x, w):  # a weighted batch mean over the rows present
        return cell(z, x) + 0.3 * (w[:, None] * z).sum(0) / w.sum().clamp_min(1e-3)

    return b, d, wmean, (x, w), None, (lambda z: wmean(z, x, w))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 100_000), variant=st.sampled_from(["closure", "kwargs", "args", "node_ids", "wmean"]),
       solver=st.sampled_from(["picard", "anderson"]))
def test_random_coupling_is_never_reported_converged_off_the_fixed_point(seed, variant, solver):
    b, d, f, args, kwargs, full = _coupled_case(seed, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = il.solve(f, torch.zeros(b, d, dtype=torch.float64), args=args, kwargs=kwargs, solver=solver, atol=1e-8,
                       rtol=0, max_iter=300, on_failure="ignore")
    with torch.no_grad():
        true = (full(sol.z) - sol.z).norm(dim=1)
    # the documented guarantee: no converged sample above its tolerance by more than 16 eps ||f_i|| (round-off)
    limit = 1e-8 + 16 * torch.finfo(torch.float64).eps * full(sol.z).norm(dim=1)
    assert not bool((sol.stats.converged & (true > limit)).any()), sol.stats.info
    assert sol.stats.status == "converged"  # every case is a whole-batch contraction (constant <= 0.8)
