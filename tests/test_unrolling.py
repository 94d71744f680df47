"""The one differentiable iteration engine (iterlayers.unrolling.unroll) against hand-written loops."""
import pytest
import torch

import iterlayers as il
from iterlayers.errors import OptionTypeError, ShapeMismatchError, ValidationError
from iterlayers.unrolling import unroll


def _linear(n=4, q=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    return q * W / torch.linalg.matrix_norm(W, ord=2)


def _cell(W, x):
    return lambda z: torch.tanh(z @ W.T + x)


def test_fixed_steps_equal_a_hand_written_loop_exactly():
    W = _linear()
    x = torch.randn(3, 4, dtype=torch.float64)
    f = _cell(W, x)
    for damping in (1.0, 0.4):
        z = torch.zeros(3, 4, dtype=torch.float64)
        hand = [z]
        for _ in range(6):
            fz = f(z)
            z = fz if damping == 1.0 else z + damping * (fz - z)
            hand.append(z)
        out = unroll(f, torch.zeros(3, 4, dtype=torch.float64), max_iter=6, damping=damping,
                     return_iterates=True, return_trace=True)
        assert torch.equal(out.z, hand[-1])
        assert len(out.iterates) == 7 and all(torch.equal(a, b) for a, b in zip(out.iterates, hand))
        st = out.stats
        assert st.nfe == 7 and st.nstep.tolist() == [6, 6, 6] and st.info["stopping"] == "fixed"
        # residuals measured here, independently of the engine's statistics
        for k, zk in enumerate(hand):
            torch.testing.assert_close(st.trace[k], (f(zk) - zk).norm(dim=1), rtol=1e-15, atol=0)
        torch.testing.assert_close(st.abs_residual, (f(hand[-1]) - hand[-1]).norm(dim=1), rtol=1e-15, atol=0)
        assert st.status == "max_iter" and not bool(st.converged.any())


def test_a_schedule_sequence_and_callable_are_applied_step_by_step():
    W = _linear(seed=1)
    x = torch.randn(2, 4, dtype=torch.float64)
    f = _cell(W, x)
    sched = (0.2, 0.5, 0.9)
    z = torch.zeros(2, 4, dtype=torch.float64)
    for k in range(5):
        d = sched[min(k, 2)]
        z = z + d * (f(z) - z)
    a = unroll(f, torch.zeros(2, 4, dtype=torch.float64), max_iter=5, damping=sched).z
    b = unroll(f, torch.zeros(2, 4, dtype=torch.float64), max_iter=5, damping=lambda k: sched[min(k, 2)]).z
    assert torch.equal(a, z) and torch.equal(b, z)


def test_per_sample_freezing_and_joint_stopping():
    # sample-wise contraction with per-sample rates: sample 0 converges much faster than sample 1
    q = torch.tensor([[0.1], [0.8]], dtype=torch.float64)
    x = torch.ones(2, 3, dtype=torch.float64)
    f = lambda z: q * z + x  # noqa: E731
    atol = 1e-8
    z = torch.zeros(2, 3, dtype=torch.float64)
    nstep = [0, 0]
    for _ in range(200):  # the hand-written per-sample loop: freeze a row once it passes
        fz = f(z)
        r = (fz - z).norm(dim=1)
        active = r > atol
        if not bool(active.any()):
            break
        z = torch.where(active[:, None], fz, z)
        nstep = [n + int(a) for n, a in zip(nstep, active)]
    out = unroll(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=200, atol=atol)
    assert torch.equal(out.z, z) and out.stats.nstep.tolist() == nstep and nstep[0] < nstep[1]
    assert bool(out.stats.converged.all()) and out.stats.status == "converged"
    assert bool(((f(out.z) - out.z).norm(dim=1) <= atol).all())
    joint = unroll(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=200, atol=atol, stopping="joint")
    assert joint.stats.nstep.tolist() == [nstep[1], nstep[1]]
    assert joint.stats.nfe == nstep[1] + 1
    # the frozen row really is frozen: per-sample differs from joint on sample 0
    assert not torch.equal(joint.z[0], out.z[0])
    # a tolerance that cannot be met within max_iter: status max_iter, not converged
    short = unroll(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=5, atol=atol)
    assert short.stats.status == "max_iter" and short.stats.converged.tolist() == [False, False]


def test_a_frozen_row_resumes_when_a_coupled_row_moves_it():
    # row 0 depends on row 1 (a batch coupling): at z = 0 row 0 passes at once, then row 1 moves it
    def f(z):
        return torch.stack([0.1 * z[0] + z[1], 0.9 * z[1] + 1.0])

    out = unroll(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=500, atol=1e-10)
    assert out.stats.trace is None and bool(out.stats.converged.all())
    assert int(out.stats.nstep[0]) > 0  # it did resume
    assert bool(((f(out.z) - out.z).norm(dim=1) <= 1e-10).all())
    torch.testing.assert_close(out.z[0], torch.full((3,), 10.0 / 0.9, dtype=torch.float64), rtol=0, atol=1e-8)


def test_tuple_states_equal_the_flat_iteration():
    A = _linear(n=3, seed=2)
    B = _linear(n=2, seed=3)

    def f(z):
        u, v = z
        return torch.tanh(u @ A.T + 0.1 * v.sum(1, keepdim=True)), torch.tanh(v @ B.T + 0.2 * u[:, :2])

    def flat(w):
        u, v = f((w[:, :3], w[:, 3:]))
        return torch.cat([u, v], 1)

    u0 = torch.randn(4, 3, dtype=torch.float64)
    v0 = torch.randn(4, 2, dtype=torch.float64)
    t = unroll(f, (u0, v0), max_iter=50, damping=0.7, atol=1e-9, return_trace=True)
    w = unroll(flat, torch.cat([u0, v0], 1), max_iter=50, damping=0.7, atol=1e-9, return_trace=True)
    assert isinstance(t.z, tuple) and len(t.z) == 2
    torch.testing.assert_close(torch.cat(t.z, 1), w.z, rtol=0, atol=1e-15)
    assert t.stats.nstep.tolist() == w.stats.nstep.tolist()
    torch.testing.assert_close(t.stats.trace_tensor(), w.stats.trace_tensor(), rtol=1e-13, atol=0)


def test_gradcheck_through_the_steps_float64():
    W = _linear(n=3, seed=4)

    def run(x, d):
        return unroll(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), max_iter=5, damping=d).z

    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    d = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (x, d))
    assert torch.autograd.gradgradcheck(run, (x, d))

    def run_tol(x):  # tolerance stopping with per-sample masks
        return unroll(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), max_iter=30, atol=1e-3).z

    assert torch.autograd.gradcheck(run_tol, (x,))


def test_the_last_measurement_does_not_advance_the_random_stream():
    drop = torch.nn.Dropout(0.5)
    x = torch.randn(3, 8)
    torch.manual_seed(0)
    out = unroll(lambda z: drop(z + x), torch.zeros_like(x), max_iter=3)
    after = torch.rand(1)
    torch.manual_seed(0)
    z = torch.zeros_like(x)
    for _ in range(3):
        z = drop(z + x)
    assert torch.equal(out.z, z) and torch.equal(torch.rand(1), after)


def test_non_finite_rows_are_frozen_and_reported_diverged():
    def f(z):
        return torch.stack([0.5 * z[:, 0], z[:, 1] * float("inf")], 1)

    out = unroll(f, torch.ones(2, 2, dtype=torch.float64), max_iter=10, atol=1e-8)
    assert out.stats.status == "diverged" and bool(out.stats.diverged.all())
    assert out.stats.nstep.tolist() == [0, 0] and torch.equal(out.z, torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("kw, err", [
    ({"max_iter": -1}, ValidationError),
    ({"max_iter": 2.0}, OptionTypeError),
    ({"max_iter": True}, OptionTypeError),
    ({"max_iter": 3, "damping": 0.0}, ValidationError),
    ({"max_iter": 3, "damping": 1.5}, ValidationError),
    ({"max_iter": 3, "damping": float("nan")}, ValidationError),
    ({"max_iter": 3, "damping": ()}, ValidationError),
    ({"max_iter": 3, "damping": (0.5, 2.0)}, ValidationError),
    ({"max_iter": 3, "damping": "half"}, OptionTypeError),
    ({"max_iter": 3, "damping": torch.ones(2)}, OptionTypeError),
    ({"max_iter": 3, "damping": lambda k: 0.0}, ValidationError),
    ({"max_iter": 3, "atol": -1.0}, ValidationError),
    ({"max_iter": 3, "rtol": float("nan")}, ValidationError),
    ({"max_iter": 3, "atol": "1e-6"}, OptionTypeError),
    ({"max_iter": 3, "stopping": "sometimes"}, ValidationError),
    ({"max_iter": 3, "return_trace": 1}, OptionTypeError),
])
def test_bad_options_raise_typed_errors_naming_the_argument(kw, err):
    name = [k for k in kw if k != "max_iter"] or ["max_iter"]
    with pytest.raises(err, match=name[0]):
        unroll(lambda z: 0.5 * z, torch.ones(2, 3), **kw)


def test_bad_states_and_maps_raise_typed_errors():
    with pytest.raises(OptionTypeError, match="z0"):
        unroll(lambda z: z, torch.ones(2, 3, dtype=torch.long), max_iter=2)
    with pytest.raises(ShapeMismatchError, match="f\\(z\\)"):
        unroll(lambda z: z[:, :2], torch.ones(2, 3), max_iter=2)
    with pytest.raises(OptionTypeError, match="f"):
        unroll("not callable", torch.ones(2, 3), max_iter=2)


def test_exported_at_top_level():
    assert il.unroll is unroll


def test_one_implementation_per_idea_no_duplicate_comes_back():
    """Issue 14: the removed duplicates stay removed (the engine, the statistics, the rate fit, the imports)."""
    import re
    from pathlib import Path

    from iterlayers import operators

    src = Path(il.__file__).parent
    texts = {p.relative_to(src).as_posix(): p.read_text() for p in src.rglob("*.py")}
    for name in ("PicardStats", "observed_rate", "GRADIENT_MODES"):
        assert not hasattr(operators, name), name
    assert [k for k, t in texts.items() if re.search(r"^def fit_linear_rate\b", t, re.M)] == ["analysis/rates.py"]
    assert [k for k, t in texts.items() if "last_stats" in t] == []
    assert "reasoning/_equilibrium.py" not in texts
    paper = ("reasoning/", "frames/", "implicit_linear/", "operators/", "models/", "analysis/")
    for k, t in texts.items():
        if k.startswith(paper):
            assert "except ImportError" not in t and "imported late" not in t, k
            # the core is imported at top level: no function-level import of the iterlayers core
            assert not re.search(r"^[ \t]+from (iterlayers|\.\.)(\.\w+)* import .*\b(deq_solve|DEQ|solve|unroll)\b",
                                 t, re.M), k


def test_fista_momentum_is_beck_teboulle_and_shared():
    import math

    from iterlayers.errors import ValidationError
    from iterlayers.unrolling import fista_momentum

    t = [1.0]
    for _ in range(40):
        t.append((1 + math.sqrt(1 + 4 * t[-1] ** 2)) / 2)
    assert fista_momentum(0) == 0.0
    for k in range(39):
        assert fista_momentum(k) == pytest.approx((t[k] - 1) / t[k + 1], rel=1e-15)
    assert 0.9 < fista_momentum(100) < 1.0  # tends to 1 like (k - 1) / (k + 2)
    with pytest.raises(ValidationError):
        fista_momentum(-1)
    # frames.apg (non-negative l1 prox) is the same iteration: at lam = 0 and a huge step it is FISTA on least
    # squares, which after one step from 0 gives the projected gradient step exactly.
    from iterlayers.frames.sparse_coding import apg, prox_grad_step
    B = torch.eye(3, dtype=torch.float64)
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    lam = torch.zeros(3, dtype=torch.float64)
    one = apg(x, B, lam, max_iter=1, step=0.5)
    torch.testing.assert_close(one, prox_grad_step(torch.zeros(1, 3, dtype=torch.float64), x, B, lam, 0.5))
