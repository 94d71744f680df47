"""The core experiment (DEQ classifier on digits) runs end to end on its tiny grid with sane numbers."""
import json
import math

import pytest

from iterlayers.experiments import core
from iterlayers.training import read_metrics


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("core")
    return out, core.run(out=out, tiny=True, seed=0)


def test_writes_metrics_table_and_figures(tiny_run):
    out, metrics = tiny_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["deq_test_acc"] == metrics["deq_test_acc"] and on_disk["claims"] == metrics["claims"]
    table = (out / "table.md").read_text()
    assert "## Paper's claims vs ours" in table and "| claim (paper) | ours | holds |" in table
    # Four claims, each row with exactly three cells (no stray '|' inside a cell).
    rows = [r for r in table.split("## Paper's claims vs ours")[1].splitlines() if r.startswith("| ")][1:]
    assert len(rows) == 4 and all(r.count("|") == 4 for r in rows)
    for png in ("residuals.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_metrics(out / "deq_run" / "metrics.csv")) == core.settings(quick=True, tiny=True)["epochs"]


def test_numbers_agree_with_theory(tiny_run):
    _, m = tiny_run
    assert m["deq_test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert m["fwd_converged"] == 1.0 and m["fwd_residual"] <= 1e-4
    assert m["bwd_iters"] >= 1
    # Spectral normalisation makes the cell's Lipschitz bound exactly gamma.
    assert m["lipschitz"] == pytest.approx(0.9, rel=1e-5)
    # Banach: every Picard residual under L^k r_0, and the a-priori iteration count is never exceeded.
    assert m["banach_ratio"] <= 1 + 1e-6
    assert m["solvers"]["picard"]["max_iters"] <= m["picard_bound_iters"]
    assert all(s["converged"] == 1.0 for s in m["solvers"].values())
    assert m["solvers"]["anderson"]["mean_iters"] <= m["solvers"]["picard"]["mean_iters"]
    assert 0 < m["picard_rate"] <= 0.9 + 1e-6 or math.isnan(m["picard_rate"])
    # Implicit (IFT) gradient = backprop through the converged unrolled iteration, in float64.
    assert m["grad_rel_diff"] < 1e-6
    assert m["claims"]["implicit_equals_unrolled"] and m["claims"]["banach_bound"]
