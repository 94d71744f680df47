"""The verdicts of verified stopping, cached per cell (iterlayers.implicit.VERDICTS).

Every solve's residual is recomputed here on the whole batch, independently of the solver's statistics.
"""
import torch
from torch import nn

import iterlayers as il
from iterlayers.implicit import REVERIFY_EVERY, VERDICTS

B, D = 16, 6


class Cell(nn.Module):
    """Independent rows unless ``gate`` (a buffer: a tensor, invisible to the fingerprint) or ``couple`` (a Python
    attribute, part of the fingerprint) switches on a batch-mean coupling."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(0.5 * W / torch.linalg.matrix_norm(W, 2))
        self.register_buffer("gate", torch.zeros((), dtype=torch.float64))
        self.couple = False

    def forward(self, z, x):
        out = torch.tanh(z @ self.W.T + x)
        if self.couple:
            out = out - 0.4 * z.mean(0)
        return out - self.gate * z.mean(0)


def inputs():
    g = torch.Generator().manual_seed(1)
    # samples of very different scales converge at different iterations: the active set shrinks
    return torch.randn(B, D, generator=g, dtype=torch.float64) * torch.logspace(-3, 0.5, B, dtype=torch.float64)[:, None]


def solve(deq, x):
    with torch.no_grad():
        z = deq(x)
        true = (deq.cell(z, x) - z).norm(dim=1)
    st = deq.stats["forward"]
    assert st.status == "converged"
    assert bool((true <= 1e-9 + 16 * torch.finfo(torch.float64).eps * deq.cell(z, x).norm(dim=1)).all()), st.info
    return z, st


def make(cell, **kw):
    return il.DEQ(cell, solver="anderson", atol=1e-9, rtol=0, max_iter=300, on_failure="raise", **kw)


def test_an_independent_cell_is_verified_once_then_probed_and_reverified_periodically():
    cell, x = Cell(), inputs()
    deq = make(cell)
    z1, s1 = solve(deq, x)
    assert s1.info["stopping"] == "per_sample (verified)"
    z2, s2 = solve(deq, x)
    assert s2.info["stopping"] == "per_sample (verified by an earlier solve; probe passed)"
    assert s2.nfe == s1.nfe - 1  # the final whole-batch check is the one evaluation saved
    assert torch.equal(z1, z2) and torch.equal(s1.nstep, s2.nstep)
    seen = [s2.info["stopping"]]
    for _ in range(REVERIFY_EVERY - 1):
        seen.append(solve(deq, x)[1].info["stopping"])
    # solves 2..REVERIFY_EVERY reuse the verdict; the next one verifies in full again
    assert seen[: REVERIFY_EVERY - 1] == [s2.info["stopping"]] * (REVERIFY_EVERY - 1)
    assert seen[REVERIFY_EVERY - 1] == "per_sample (verified)"


def test_a_coupled_cell_is_solved_jointly_from_the_start_next_time():
    cell, x = Cell(), inputs()
    cell.couple = True
    deq = make(cell)
    _, s1 = solve(deq, x)
    assert s1.info["stopping"].startswith("joint (coupling detected")
    _, s2 = solve(deq, x)
    assert s2.info["stopping"] == "joint (coupling found by an earlier verified solve of this cell)"
    assert bool((s2.nstep == s2.nstep[0]).all())  # joint from the first iteration: every sample took every step
    assert s2.nfe == int(s2.nstep[0]) + 1  # no verification evaluation: one call per iteration plus f(z0)


def test_a_changed_fingerprint_discards_the_verdict():
    cell, x = Cell(), inputs()
    deq = make(cell)
    solve(deq, x)
    solve(deq, x)
    cell.couple = True  # a Python attribute: the fingerprint changes, the cell is verified in full again
    _, st = solve(deq, x)
    assert st.info["stopping"].startswith("joint (coupling detected")


def test_a_changed_training_flag_discards_the_verdict():
    cell, x = Cell(), inputs()
    deq = make(cell)
    solve(deq, x)
    cell.eval()
    _, st = solve(deq, x)
    assert st.info["stopping"] == "per_sample (verified)"


def test_coupling_that_the_fingerprint_cannot_see_is_caught_by_the_probe():
    cell, x = Cell(), inputs()
    deq = make(cell)
    solve(deq, x)
    with torch.no_grad():
        cell.gate.fill_(0.4)  # a tensor value: same fingerprint, same signature, the verdict is reused
    _, st = solve(deq, x)
    assert st.info["stopping"].startswith("joint (coupling detected"), st.info


def test_negative_control_without_the_probe_the_cached_verdict_would_be_wrong():
    """What the probe guards against: the same change with per-sample stopping (no verification at all) gives a
    point that is not the whole-batch fixed point, while it reports convergence."""
    cell, x = Cell(), inputs()
    with torch.no_grad():
        cell.gate.fill_(0.4)
    deq = make(cell, stopping="per_sample")
    with torch.no_grad():
        z = deq(x)
        true = (cell(z, x) - z).norm(dim=1)
    assert deq.stats["forward"].status == "converged"
    assert float(true.max()) > 1e-6


def test_other_stopping_rules_neither_read_nor_write_verdicts():
    cell, x = Cell(), inputs()
    solve(make(cell, stopping="joint"), x)
    solve(make(cell, stopping="per_sample"), x)
    _, st = solve(make(cell), x)
    assert st.info["stopping"] == "per_sample (verified)"
