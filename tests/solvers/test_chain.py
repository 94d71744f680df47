"""The solver fallback chain: samples a solver fails on are finished by the next one, per-sample status exact.

References are closed forms: per-sample affine maps ``f(z) = A_i z + c_i`` whose fixed point solves
``(I - A_i) z = c_i`` (dense solve), and a coupled affine map whose whole-batch system is solved densely.
Residuals are measured here, independently of the solver's statistics.
"""
import pytest
import torch

import iterlayers as il
from iterlayers.errors import NonFiniteInputError, OptionTypeError, ValidationError
from iterlayers.solvers import PicardSolver, solve_chain

N = 4
TOL = 1e-10


def affine_batch(eigs, seed=0):
    """``A[i] = Q_i diag(eigs[i]) Q_i^T`` (symmetric, so Picard's rate is the largest |eigenvalue|) and ``c``."""
    g = torch.Generator().manual_seed(seed)
    A = []
    for e in eigs:
        q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
        A.append(q @ torch.diag(torch.tensor(e, dtype=torch.float64)) @ q.T)
    A = torch.stack(A)
    c = torch.randn(len(eigs), N, generator=g, dtype=torch.float64)
    return A, c


def affine(z, A, c):
    return torch.einsum("bij,bj->bi", A, z) + c


def exact(A, c):
    return torch.linalg.solve(torch.eye(N, dtype=A.dtype) - A, c)


def true_residual(z, A, c):
    return (affine(z, A, c) - z).norm(dim=1)


CONTRACT = [0.5, -0.4, 0.3, 0.1]  # Picard converges (rate 0.5)
FLIP = [-1.6, 0.5, 0.2, -0.3]  # Picard diverges (|lambda| > 1); damped Picard (beta = 0.3) converges
EXPAND = [1.5, 0.4, -0.2, 0.1]  # Picard and damped Picard diverge (lambda > 1); I - A invertible


@pytest.mark.parametrize("fallback", ["anderson", "broyden"])
def test_picard_diverges_on_some_samples_and_the_fallback_finishes_them(fallback):
    kinds = [CONTRACT, FLIP, CONTRACT, FLIP, FLIP, CONTRACT]
    A, c = affine_batch(kinds)
    z, st = solve_chain(affine, torch.zeros_like(c), solvers=["picard", fallback], args=(A, c), atol=TOL, rtol=0.0,
                        max_iter=80, on_failure="raise")
    expected = ["picard" if k is CONTRACT else fallback for k in kinds]
    assert st.info["finished_by"] == expected
    assert st.info["finished_stage"].tolist() == [0 if k is CONTRACT else 1 for k in kinds]
    r = true_residual(z, A, c)
    assert bool((r <= TOL).all()), r
    torch.testing.assert_close(z, exact(A, c), atol=1e-9, rtol=0)
    torch.testing.assert_close(st.abs_residual, r, atol=1e-12, rtol=1e-6)
    assert st.status == "converged" and bool(st.converged.all()) and not bool(st.diverged.any())
    s1, s2 = st.info["stages"]
    assert s1["solver"] == "picard" and s1["stopping"] == "per_sample (verified)" and s1["converged"] == 3
    assert s2["solver"] == fallback and s2["samples"] == 3 and s2["converged"] == 3  # the failed rows alone
    assert st.nfe == s1["nfe"] + s2["nfe"]
    assert st.solver == f"picard -> {fallback}"
    # Picard alone: the same samples diverge.
    alone = il.solve(affine, torch.zeros_like(c), args=(A, c), solver="picard", atol=TOL, rtol=0.0, max_iter=80,
                     on_failure="ignore").stats
    assert alone.diverged.tolist() == [k is FLIP for k in kinds]
    # nstep sums the stages: the diverged rows carry Picard's steps plus the fallback's.
    assert bool((st.nstep[alone.diverged] > alone.nstep[alone.diverged]).all())
    torch.testing.assert_close(st.nstep[~alone.diverged], alone.nstep[~alone.diverged])


def test_three_solvers_each_finish_their_own_samples():
    kinds = [EXPAND, CONTRACT, FLIP, EXPAND, FLIP]
    A, c = affine_batch(kinds, seed=1)
    chain = ["picard", PicardSolver(damping=0.3), "anderson"]
    z, st = solve_chain(affine, torch.zeros_like(c), solvers=chain, args=(A, c), atol=TOL, rtol=0.0, max_iter=150,
                        on_failure="raise")
    stage = {id(CONTRACT): 0, id(FLIP): 1, id(EXPAND): 2}
    assert st.info["finished_stage"].tolist() == [stage[id(k)] for k in kinds]
    assert st.info["finished_by"] == [["picard", "picard", "anderson"][stage[id(k)]] for k in kinds]
    assert [s["samples"] for s in st.info["stages"]] == [5, 4, 2]
    assert bool((true_residual(z, A, c) <= TOL).all())
    torch.testing.assert_close(z, exact(A, c), atol=1e-9, rtol=0)


def test_samples_that_only_ran_out_of_iterations_are_handed_on():
    A, c = affine_batch([CONTRACT, CONTRACT, CONTRACT])
    z, st = solve_chain(affine, torch.zeros_like(c), solvers=["picard", "anderson"], args=(A, c), atol=TOL,
                        rtol=0.0, max_iter=12, on_failure="raise")
    assert st.info["stages"][0]["status"] == "max_iter" and st.info["stages"][0]["converged"] == 0
    assert st.info["finished_by"] == ["anderson"] * 3
    assert bool((true_residual(z, A, c) <= TOL).all())


def test_first_solver_enough_is_one_plain_solve():
    A, c = affine_batch([CONTRACT, CONTRACT])
    z, st = solve_chain(affine, torch.zeros_like(c), solvers=["anderson", "picard"], args=(A, c), atol=TOL,
                        rtol=0.0, max_iter=50)
    ref = il.solve(affine, torch.zeros_like(c), args=(A, c), solver="anderson", atol=TOL, rtol=0.0, max_iter=50)
    torch.testing.assert_close(z, ref.z, atol=0, rtol=0)
    assert st.nfe == ref.stats.nfe and len(st.info["stages"]) == 1
    assert st.info["finished_by"] == ["anderson", "anderson"]


def test_closure_map_runs_the_fallback_on_the_whole_batch_and_keeps_finished_rows():
    # No batched args: f only sees whole batches, so the second stage gets every row; the rows Picard finished
    # pass their test at its start, take no step there and stay credited to Picard, unchanged.
    kinds = [CONTRACT, FLIP, CONTRACT]
    A, c = affine_batch(kinds, seed=2)

    def f(z):
        return affine(z, A, c)

    first = il.solve(f, torch.zeros_like(c), solver="picard", atol=TOL, rtol=0.0, max_iter=80, on_failure="ignore")
    z, st = solve_chain(f, torch.zeros_like(c), solvers=["picard", "broyden"], atol=TOL, rtol=0.0, max_iter=80,
                        on_failure="raise")
    assert st.info["stages"][1]["samples"] == 3
    assert st.info["finished_by"] == ["picard", "broyden", "picard"]
    torch.testing.assert_close(z[[0, 2]], first.z[[0, 2]], atol=0, rtol=0)
    torch.testing.assert_close(st.nstep[[0, 2]], first.stats.nstep[[0, 2]])
    assert bool((true_residual(z, A, c) <= TOL).all())


def coupled_system(B, seed=3):
    """Row ``i``: ``f_i(z) = s_i z_i + k mean_j z_j + c_i``: an affine map coupling every row through the mean."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor([0.5, -1.6, 0.4, -1.7, 0.3][:B], dtype=torch.float64).unsqueeze(1)
    c = torch.randn(B, N, generator=g, dtype=torch.float64)
    k = 0.2

    def f(z, s, c):
        return s * z + k * z.mean(0, keepdim=True) + c

    M = torch.kron(torch.diag(s.flatten()) + k / B * torch.ones(B, B, dtype=torch.float64),
                   torch.eye(N, dtype=torch.float64))
    ref = torch.linalg.solve(torch.eye(B * N, dtype=torch.float64) - M, c.flatten()).reshape(B, N)
    return f, s, c, ref


@pytest.mark.parametrize("stopping", ["verify", "joint"])
def test_coupled_system_is_re_solved_jointly(stopping):
    f, s, c, ref = coupled_system(5)
    # (Anderson mixes per row even in a joint solve, so a coupled system converges more slowly: tolerance 1e-8.)
    z, st = solve_chain(f, torch.zeros_like(c), solvers=["picard", "anderson"], args=(s, c), atol=1e-8, rtol=0.0,
                        max_iter=80, stopping=stopping, on_failure="raise")
    s1, s2 = st.info["stages"]
    assert s1["stopping"].startswith("joint") and s1["status"] == "diverged"
    assert s2["stopping"] == "joint" and s2["samples"] == 5  # the whole system, not the failed rows
    assert st.info["stopping"].startswith("joint")
    assert st.info["finished_by"] == ["anderson"] * 5
    r = (f(z, s, c) - z).norm(dim=1)
    assert bool((r <= 1e-8).all()), r
    torch.testing.assert_close(z, ref, atol=1e-7, rtol=0)
    # Every row took part in every joint iteration of the second stage.
    assert len(set((st.nstep - st.nstep[0]).tolist())) == 1


def test_tuple_state():
    kinds = [CONTRACT, FLIP, CONTRACT]
    A, c = affine_batch(kinds, seed=4)

    def f(z, A, c):
        a, b = z
        return affine(a, A, c), 0.5 * b + a.sum(1, keepdim=True).unsqueeze(2)

    z0 = (torch.zeros_like(c), torch.zeros(3, 2, 3, dtype=torch.float64))
    (a, b), st = solve_chain(f, z0, solvers=["picard", "anderson"], args=(A, c), atol=TOL, rtol=0.0, max_iter=80,
                             on_failure="raise")
    assert a.shape == (3, N) and b.shape == (3, 2, 3)
    assert st.info["finished_by"] == ["picard", "anderson", "picard"]
    fa, fb = f((a, b), A, c)
    r = torch.cat([(fa - a), (fb - b).flatten(1)], 1).norm(dim=1)
    assert bool((r <= TOL).all())
    torch.testing.assert_close(a, exact(A, c), atol=1e-9, rtol=0)


def test_nothing_converges_reports_none_and_raises_or_warns():
    c = torch.ones(3, N, dtype=torch.float64)

    def f(z, c):
        return z + c  # no fixed point: every solver fails

    with pytest.raises(il.ConvergenceError, match="picard -> anderson") as info:
        solve_chain(f, torch.zeros_like(c), solvers=["picard", "anderson"], args=(c,), max_iter=5, on_failure="raise")
    st = info.value.stats
    assert st.info["finished_by"] == ["none"] * 3 and st.info["finished_stage"].tolist() == [-1] * 3
    assert len(st.info["stages"]) == 2 and not bool(st.converged.any())
    with pytest.warns(il.ConvergenceWarning):
        solve_chain(f, torch.zeros_like(c), solvers=["picard", "anderson"], args=(c,), max_iter=5, on_failure="warn")


def test_nonfinite_input_row_is_excluded_not_handed_on_and_refused_with_raise():
    kinds = [CONTRACT, FLIP, CONTRACT]
    A, c = affine_batch(kinds, seed=5)
    c[2, 0] = float("nan")
    z, st = solve_chain(affine, torch.zeros_like(c), solvers=["picard", "anderson"], args=(A, c), atol=TOL,
                        rtol=0.0, max_iter=80, on_failure="ignore", arg_names=["A", "c"])
    assert st.info["finished_by"] == ["picard", "anderson", "none"]
    assert st.info["stages"][1]["samples"] == 1  # the NaN row is not handed on
    assert "c (samples [2])" in st.info["nonfinite_input"]
    assert bool((true_residual(z[:2], A[:2], c[:2]) <= TOL).all())
    with pytest.raises(NonFiniteInputError, match="c contains NaN"):
        solve_chain(affine, torch.zeros_like(c), solvers=["picard", "anderson"], args=(A, c), on_failure="raise",
                    arg_names=["A", "c"])


def test_trace_spans_the_stages():
    kinds = [CONTRACT, FLIP]
    A, c = affine_batch(kinds, seed=6)
    z, st = solve_chain(affine, torch.zeros_like(c), solvers=["picard", "anderson"], args=(A, c), atol=TOL,
                        rtol=0.0, max_iter=80, return_trace=True)
    s1, s2 = st.info["stages"]
    assert len(st.trace) == 1 + s1["iterations"] + s2["iterations"]
    assert all(t.shape == (2,) for t in st.trace)
    # During the fallback's iterations the finished row keeps the residual Picard left it with.
    assert len({float(t[0]) for t in st.trace[1 + s1["iterations"]:]}) == 1
    torch.testing.assert_close(st.trace[-1], st.abs_residual)


def test_empty_batch():
    z, st = solve_chain(lambda z: 0.5 * z, torch.zeros(0, 3), solvers=["picard", "anderson"])
    assert z.shape == (0, 3) and st.status == "converged" and st.info["finished_by"] == []


@pytest.mark.parametrize("solvers, error, match", [
    ("anderson", OptionTypeError, r"write \['anderson'\]"),
    ([], ValidationError, "solvers is empty"),
    (["anderson", "nope"], ValidationError, "unknown solver 'nope'"),
    (["anderson", 3], OptionTypeError, "solver must be a name"),
    (None, OptionTypeError, "solvers must be a list"),
    (PicardSolver(), OptionTypeError, "for one solver"),
])
def test_bad_solvers_are_typed_errors(solvers, error, match):
    with pytest.raises(error, match=match):
        solve_chain(lambda z: 0.5 * z, torch.zeros(2, 3), solvers=solvers)


@pytest.mark.parametrize("options, error, match", [
    ({"atol": -1.0}, ValidationError, "atol"),
    ({"atol": 0.0, "rtol": 0.0}, ValidationError, "both 0"),
    ({"max_iter": 2.5}, OptionTypeError, "max_iter"),
    ({"on_failure": "loud"}, ValidationError, "on_failure"),
    ({"divergence_ratio": 1.0}, ValidationError, "divergence_ratio"),
    ({"args": torch.zeros(2, 3)}, OptionTypeError, "wrap one as"),
    ({"stopping": "sometimes"}, ValidationError, "stopping"),
])
def test_bad_options_are_typed_errors(options, error, match):
    with pytest.raises(error, match=match):
        solve_chain(lambda z, *a: 0.5 * z, torch.zeros(2, 3), solvers=["picard", "anderson"], **options)


def test_f_not_callable():
    with pytest.raises(OptionTypeError, match="f must be callable"):
        solve_chain(3, torch.zeros(2, 3), solvers=["picard"])


def test_docs_example_runs_as_written(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "chain.md").read_text()
    exec(compile(text.split("```python\n")[1].split("```")[0], "docs/chain.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "['picard', 'anderson', 'picard', 'picard', 'anderson', 'picard']"
    assert lines[1] == "[6, 2]" and float(lines[2]) <= 1e-10
