"""FixedPointCache: exact counters and ages, LRU bound, tuple states, typed errors, and warm starts that reach
the same fixed point (true residual measured here) with fewer evaluations."""
import pytest
import torch

import iterlayers as il
from iterlayers.cache import FixedPointCache
from iterlayers.errors import OptionTypeError, ShapeMismatchError, ValidationError
from problems import TanhCell


def rows(ids, n=3):
    return torch.tensor([[float(i)] * n for i in ids])


def test_hits_misses_stale_and_ages_are_exact():
    cache = FixedPointCache(capacity=8, max_age=2)
    cache.store(torch.tensor([0, 1, 2]), rows([0, 1, 2]), step=0)
    cache.store([3], rows([3]), step=1)
    assert cache.age(0) == 1 and cache.age(3) == 0 and cache.age(7) is None
    like = torch.full((4, 3), -1.0)
    z0, hit = cache.lookup(torch.tensor([2, 5, 3, 0]), like, step=2)
    assert hit.tolist() == [True, False, True, True]
    torch.testing.assert_close(z0, torch.tensor([[2.0] * 3, [-1.0] * 3, [3.0] * 3, [0.0] * 3]))
    assert torch.equal(like, torch.full((4, 3), -1.0))  # like is not modified
    # step 3: rows stored at step 0 are 3 > max_age = 2 steps old, the one from step 1 is 2 old (fresh).
    z0, hit = cache.lookup([0, 3, 9], torch.zeros(3, 3), step=3)
    assert hit.tolist() == [False, True, False]
    assert cache.age(0, step=3) == 3
    s = cache.stats()
    assert (s["hits"], s["misses"], s["stale"], s["rejected"], s["lookups"]) == (4, 2, 1, 0, 7)
    assert s["hit_rate"] == pytest.approx(4 / 7)
    # Re-storing refreshes the age.
    cache.store([0], rows([10]), step=3)
    z0, hit = cache.lookup([0], torch.zeros(1, 3), step=5)
    assert hit.tolist() == [True] and z0[0, 0] == 10.0


def test_default_clock_is_the_latest_stored_step_and_max_age_none_never_stales():
    cache = FixedPointCache(capacity=4, max_age=0)
    cache.store([0], rows([0]), step=4)
    cache.store([1], rows([1]), step=5)
    _, hit = cache.lookup([0, 1], torch.zeros(2, 3))
    assert hit.tolist() == [False, True]
    forever = FixedPointCache(capacity=4)
    forever.store([0], rows([0]), step=0)
    assert forever.lookup([0], torch.zeros(1, 3), step=10**6)[1].tolist() == [True]


def test_lru_eviction_and_memory_bound():
    cache = FixedPointCache(capacity=3)
    assert cache.nbytes == 0
    cache.store([0, 1, 2], rows([0, 1, 2], n=5), step=0)
    nbytes = cache.nbytes
    assert nbytes == 3 * 5 * 4  # capacity x N x float32
    cache.lookup([0], torch.zeros(1, 5), step=0)  # 0 is now the most recently used; 1 the least
    cache.store([3], rows([3], n=5), step=1)
    assert 1 not in cache and {0, 2, 3} == set(cache.slots)
    assert cache.stats()["evictions"] == 1
    z0, hit = cache.lookup([0, 1, 2, 3], torch.full((4, 5), -1.0), step=1)
    assert hit.tolist() == [True, False, True, True]
    torch.testing.assert_close(z0[:, 0], torch.tensor([0.0, -1.0, 2.0, 3.0]))
    for step in range(2, 50):  # many more ids than rows: the table never grows
        cache.store(torch.arange(step * 3, step * 3 + 3), rows(range(3), n=5), step=step)
    assert len(cache) == 3 and cache.nbytes == nbytes and cache.table.shape == (3, 5)
    assert cache.stats()["evictions"] == 1 + 48 * 3


def test_repeated_ids_keep_the_last_row_and_mask_stores_some_rows():
    cache = FixedPointCache(capacity=4)
    cache.store([7, 7, 8], rows([1, 2, 3]), step=0, mask=torch.tensor([True, True, False]))
    assert 8 not in cache and len(cache) == 1
    z0, hit = cache.lookup([7], torch.zeros(1, 3))
    assert z0[0, 0] == 2.0


def test_tuple_states_round_trip():
    cache = FixedPointCache(capacity=4)
    z = (torch.arange(6.0).reshape(2, 3), torch.arange(16.0).reshape(2, 2, 2, 2))
    cache.store([10, 11], z, step=0)
    assert cache.nbytes == 4 * (3 + 8) * 4
    like = (torch.zeros(3, 3), torch.zeros(3, 2, 2, 2))
    (a, b), hit = cache.lookup([11, 12, 10], like)
    assert hit.tolist() == [True, False, True]
    torch.testing.assert_close(a, torch.stack([z[0][1], torch.zeros(3), z[0][0]]))
    torch.testing.assert_close(b, torch.stack([z[1][1], torch.zeros(2, 2, 2), z[1][0]]))
    with pytest.raises(ShapeMismatchError, match="per-sample shapes"):
        cache.lookup([10], torch.zeros(1, 11))


def test_residual_check_rejects_a_cached_start_worse_than_the_default():
    cell = TanhCell(6, norm=0.5, seed=0)
    x = torch.randn(3, 6, dtype=torch.float64)

    def residual(z):
        return (cell(z, x) - z).norm(dim=1)

    sol = il.solve(cell, torch.zeros_like(x), args=(x,), atol=1e-10, rtol=0.0)
    good = sol.z.clone()
    good[1] = 100.0  # a corrupted entry
    cache = FixedPointCache(capacity=4)
    cache.store([0, 1, 2], good, step=0)
    z0, hit = cache.lookup([0, 1, 2], torch.zeros_like(x), residual=residual)
    assert hit.tolist() == [True, False, True]
    torch.testing.assert_close(z0[1], torch.zeros(6, dtype=torch.float64))
    s = cache.stats()
    assert (s["hits"], s["rejected"]) == (2, 1)


def test_warm_start_reaches_the_same_fixed_point_with_fewer_evaluations():
    # One "training step": the cell's weights move a little between two visits of the same samples.
    torch.manual_seed(0)
    cell = TanhCell(16, norm=0.9, seed=3)
    x = torch.randn(32, 16, dtype=torch.float64)
    ids = torch.arange(100, 132)
    layer = il.DEQ(cell, solver="anderson", atol=1e-9, rtol=0.0, max_iter=200, on_failure="raise")
    cache = FixedPointCache(capacity=64, max_age=1)
    z0, hit = cache.lookup(ids, like=layer.initial_state(x), step=0)
    assert not bool(hit.any())
    with torch.no_grad():
        cache.store(ids, layer(x, z0=z0), step=0, mask=layer.stats["forward"].converged)
        cache.record(layer.stats["forward"].nstep, hit)
        for p in cell.parameters():
            p.add_(1e-3 * torch.randn_like(p))
        cold = layer(x)
        cold_stats = layer.stats["forward"]
        z0, hit = cache.lookup(ids, like=layer.initial_state(x), step=1)
        assert bool(hit.all())
        warm = layer(x, z0=z0)
        warm_stats = layer.stats["forward"]
        cache.record(warm_stats.nstep, hit)
    true = (cell(warm, x) - warm).norm(dim=1)  # measured here, not the solver's statistic
    assert bool((true <= 1e-9).all()), true
    # Both are within tol / (1 - 0.9) of the unique fixed point.
    assert float((warm - cold).norm(dim=1).max()) <= 2 * 1e-9 / (1 - 0.9)
    assert warm_stats.nfe < cold_stats.nfe
    assert bool((warm_stats.nstep < cold_stats.nstep).all())
    s = cache.stats()
    assert s["mean_steps_warm"] == pytest.approx(float(warm_stats.nstep.double().mean()))
    assert s["steps_saved_estimate"] > 0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"capacity": 0}, ValidationError, "capacity"),
    ({"capacity": 2.0}, OptionTypeError, "capacity"),
    ({"capacity": 2, "max_age": -1}, ValidationError, "max_age"),
    ({"capacity": 2, "max_age": True}, OptionTypeError, "max_age"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FixedPointCache(**kwargs)


def test_bad_calls_are_typed_errors():
    cache = FixedPointCache(capacity=2)
    with pytest.raises(OptionTypeError, match="ids must be a 1-d integer tensor"):
        cache.store(torch.tensor([0.0, 1.0]), torch.zeros(2, 3), step=0)
    with pytest.raises(OptionTypeError, match="ids must be"):
        cache.store("ab", torch.zeros(2, 3), step=0)
    with pytest.raises(ShapeMismatchError, match="3 ids for a batch of 2"):
        cache.store([0, 1, 2], torch.zeros(2, 3), step=0)
    with pytest.raises(ValidationError, match="step"):
        cache.store([0, 1], torch.zeros(2, 3), step=-1)
    with pytest.raises(OptionTypeError, match="step"):
        cache.store([0, 1], torch.zeros(2, 3), step=True)
    with pytest.raises(OptionTypeError, match="mask"):
        cache.store([0, 1], torch.zeros(2, 3), step=0, mask=torch.ones(2))
    with pytest.raises(OptionTypeError, match="floating-point"):
        cache.store([0, 1], torch.zeros(2, 3, dtype=torch.long), step=0)
    cache.store([0, 1], torch.zeros(2, 3), step=0)
    with pytest.raises(ShapeMismatchError, match="per-sample shapes"):
        cache.store([0, 1], torch.zeros(2, 4), step=1)
    with pytest.raises(ShapeMismatchError, match="float64"):
        cache.lookup([0], torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(OptionTypeError, match="record"):
        cache.record(torch.ones(2), torch.ones(2))


def test_docs_example_runs_as_written(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cache.md").read_text()
    exec(compile(text.split("```python\n")[1].split("```")[0], "docs/cache.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("hit rate 0.67, iterations warm ")


def test_warm_starts_that_end_unconverged_are_counted():
    # At max_iter the returned state depends on the start, so a cache then changes results: the statistics
    # must say how often (a silent change would be read as "the same answer, faster").
    cell = TanhCell(16, norm=0.99, seed=1)
    x = torch.randn(8, 16, dtype=torch.float64)
    ids = torch.arange(8)
    layer = il.DEQ(cell, solver="picard", atol=1e-12, rtol=0.0, max_iter=3, on_failure="ignore")
    cache = FixedPointCache(capacity=8)
    with torch.no_grad():
        z0, hit = cache.lookup(ids, like=layer.initial_state(x), step=0)
        z = layer(x, z0=z0)
        st = layer.stats["forward"]
        cache.record(st.nstep, hit, st.converged)
        cache.store(ids, z, step=0)  # every row, converged or not (what the guarantee does not cover)
        z0, hit = cache.lookup(ids, like=layer.initial_state(x), step=1)
        assert bool(hit.all())
        z_warm = layer(x, z0=z0)
        st = layer.stats["forward"]
        assert not bool(st.converged.any())  # 3 Picard steps cannot reach 1e-12 at rate 0.99
        cache.record(st.nstep, hit, st.converged)
        z_cold = layer(x)
    s = cache.stats()
    assert s["warm_unconverged"] == 8 and s["warm_unconverged_rate"] == 1.0
    # and the results did change with the start (measured, not assumed)
    assert float((z_warm - z_cold).abs().max()) > 1e-6
    # a converged warm start is not counted
    cache2 = FixedPointCache(capacity=8)
    cache2.record(torch.full((8,), 2), torch.ones(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool))
    assert cache2.stats()["warm_unconverged"] == 0 and cache2.stats()["warm_unconverged_rate"] == 0.0
    with pytest.raises(OptionTypeError, match="converged"):
        cache2.record(torch.ones(2), torch.ones(2, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
