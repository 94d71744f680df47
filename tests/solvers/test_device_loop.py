"""The loop's device mode (``check_every`` > 1): no host synchronisation between checks, per-sample results."""
import math

import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.errors import ValidationError
from iterlayers.solvers import LoopOptions, make_solver, run_loop
from problems import TanhCell, expanding_cell

LOOP = dict(rtol=0.0, on_failure="ignore", return_trace=False, divergence_ratio=1e6)


def _batch(seed=0, B=6, n=8):
    g = torch.Generator().manual_seed(seed)
    # Inputs of very different sizes: the samples converge at different iterations.
    return torch.randn(B, n, generator=g, dtype=torch.float64) * torch.logspace(-3, 0.5, B, dtype=torch.float64)[:, None]


def _true_residual(cell, z, x):
    with torch.no_grad():
        return (cell(z, x) - z).norm(dim=1)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
@pytest.mark.parametrize("every", [2, 5, 7])
def test_device_mode_gives_the_per_sample_results(solver, every):
    cell = TanhCell(8, norm=0.9, seed=1)
    x = _batch()
    z0 = torch.zeros_like(x)
    ref, rst = run_loop(cell, z0, args=(x,), solver=make_solver(solver), stopping='per_sample', options=LoopOptions(**LOOP, atol=1e-10, max_iter=200))
    z, st = run_loop(cell, z0, args=(x,), solver=make_solver(solver), stopping='per_sample', options=LoopOptions(**LOOP, atol=1e-10, max_iter=200, check_every=every))
    assert rst.status == st.status == "converged"
    assert len(set(rst.nstep.tolist())) > 1  # the samples did stop at different iterations
    assert torch.equal(st.nstep, rst.nstep)
    torch.testing.assert_close(z, ref, atol=1e-12, rtol=0)
    assert bool((_true_residual(cell, z, x) <= 1e-10).all())
    assert st.info["stopping"].startswith("per_sample (whole batch, masked")
    # one evaluation to start, one per iteration (whole batch); the last check may follow up to every - 1
    # iterations in which no row moved
    longest = int(rst.nstep.max())
    assert longest + 1 <= st.nfe <= longest + every


def test_device_mode_joint_equals_joint():
    cell = TanhCell(8, norm=0.9, seed=2)
    x = _batch(1)
    z0 = torch.zeros_like(x)
    ref, rst = run_loop(cell, z0, args=(x,), solver=make_solver('anderson'), stopping='joint', options=LoopOptions(**LOOP, atol=1e-09, max_iter=100))
    z, st = run_loop(cell, z0, args=(x,), solver=make_solver('anderson'), stopping='joint', options=LoopOptions(**LOOP, atol=1e-09, max_iter=100, check_every=4))
    torch.testing.assert_close(z, ref, atol=1e-12, rtol=0)
    assert torch.equal(st.nstep, rst.nstep) and st.status == "converged"


class BatchMeanCell(nn.Module):
    """``tanh(W z + x) - 0.4 mean_batch(z)``: every row depends on every other."""

    def __init__(self):
        super().__init__()
        self.inner = TanhCell(8, norm=0.5, seed=3)

    def forward(self, z, x):
        return self.inner(z, x) - 0.4 * z.mean(0, keepdim=True)


def test_device_mode_is_right_on_coupled_rows_without_verification():
    cell = BatchMeanCell()
    x = _batch(2)
    z0 = torch.zeros_like(x)
    # Declared per-sample stopping (no verification) freezes rows that the others then move: wrong.
    bad, _ = run_loop(cell, z0, args=(x,), solver=make_solver('picard'), stopping='per_sample', options=LoopOptions(**LOOP, atol=1e-10, max_iter=300))
    assert float(_true_residual(cell, bad, x).max()) > 1e-8
    # The device mode re-reads every row's residual from each whole-batch evaluation: right.
    z, st = run_loop(cell, z0, args=(x,), solver=make_solver('picard'), stopping='per_sample', options=LoopOptions(**LOOP, atol=1e-10, max_iter=300, check_every=3))
    assert st.status == "converged"
    assert bool((_true_residual(cell, z, x) <= 1e-10).all())


class _SyncCounter:
    """Counts host reads of tensor values (bool/int/float/item/tolist) while active."""

    names = ("__bool__", "__int__", "__float__", "item", "tolist")

    def __enter__(self):
        self.count, self.saved = 0, {}
        for name in self.names:
            orig = getattr(torch.Tensor, name)
            self.saved[name] = orig

            def wrapped(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self.saved.items():
            setattr(torch.Tensor, name, orig)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_device_mode_reads_the_host_once_per_check(solver):
    cell = TanhCell(8, norm=0.95, seed=4)
    x = _batch(3)
    z0 = torch.zeros_like(x)
    counts = {}
    for every in (1, 10):
        with _SyncCounter() as c:
            _, st = run_loop(cell, z0, args=(x,), solver=make_solver(solver), stopping='per_sample', check_inputs=False, options=LoopOptions(**LOOP, atol=1e-30, max_iter=60, check_every=every))
        counts[every] = c.count
        assert int(st.nstep.max()) == 60  # never converges: every solve runs all 60 iterations
    # start + 6 checks + result (statistics) only; the per-iteration loop reads the host at every iteration
    assert counts[1] >= 60
    assert counts[10] <= math.ceil(60 / 10) + 12, counts


def test_device_mode_reports_divergence_and_stops_at_max_iter():
    cell = expanding_cell(5)
    x = torch.ones(3, 5, dtype=torch.float64)
    z, st = run_loop(cell, torch.zeros_like(x), args=(x,), solver=make_solver('picard'), stopping='per_sample', options=LoopOptions(**LOOP, atol=1e-08, max_iter=200, check_every=4))
    assert st.status == "diverged" and bool(st.diverged.all())
    cell = TanhCell(8, norm=0.99, seed=5)
    x = _batch(4)
    _, st = run_loop(cell, torch.zeros_like(x), args=(x,), solver=make_solver('picard'), stopping='per_sample', options=LoopOptions(**LOOP, atol=1e-30, max_iter=13, check_every=5))
    assert int(st.nstep.max()) == 13 and st.status == "max_iter"


def test_deq_with_check_every_gives_the_same_gradient():
    cell = TanhCell(8, norm=0.9, seed=6)
    x = _batch(5)
    grads = []
    for every in (1, 4):
        xx = x.clone().requires_grad_()
        deq = il.DEQ(cell, atol=1e-11, rtol=0.0, max_iter=300, check_every=every)
        deq(xx).pow(2).sum().backward()
        assert deq.stats["forward"].status == deq.stats["backward"].status == "converged"
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-8)
    with pytest.raises(ValidationError, match="check_every"):
        il.DEQOptions(check_every=0)
