"""The core experiment (DEQ classifier on digits) on its tiny grid: claims as data, sane numbers, figures."""
import json
import math

import pytest

from iterlayers.experiments import core
from iterlayers.training import read_metrics

from claims_checks import assert_claims_valid


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("core")
    return out, core.run(out=out, tiny=True, seed=0)


def test_writes_metrics_table_and_figures(tiny_run):
    out, metrics = tiny_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["deq_test_acc"] == metrics["deq_test_acc"] and on_disk["claims"] == metrics["claims"]
    table = (out / "table.md").read_text()
    assert "## Paper's claims vs ours" in table and "## Sanity checks" in table
    # One row per claim in the claims section, each with exactly 7 cells (no stray '|' inside a cell).
    section = table.split("## Paper's claims vs ours")[1].split("## Sanity checks")[0]
    rows = [r for r in section.splitlines() if r.startswith("| ")][1:]
    assert len(rows) == len(metrics["claims"]) == 3 and all(r.count("|") == 8 for r in rows)
    for png in ("residuals.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    epochs = core.settings(quick=True, tiny=True)["epochs"]
    for sd in metrics["seeds"]:
        assert len(read_metrics(out / f"deq_run_{sd}" / "metrics.csv")) == epochs


def test_claims_are_falsifiable_records(tiny_run):
    _, m = tiny_run
    assert_claims_valid(m, min_claims=3)
    assert m["settings"]["mode"] == "tiny" and m["settings"]["seeds"] == 2 == len(m["seeds"])
    by_id = {c["id"]: c for c in m["claims"]}
    # The permuted-label control cannot beat chance by much: its test accuracy is far below the MLP's.
    assert all(r["control_test_acc"] < 0.4 for r in m["per_seed"])
    assert by_id["deq_matches_mlp"]["n_seeds"] == 2 and by_id["deq_matches_mlp"]["comparison"]
    # The recurrence-free control is solved by Picard in one step, so the ratio is exactly 1 there.
    for name in ("anderson", "broyden"):
        assert by_id[f"{name}_fewer_iterations"]["control"]["value"] == pytest.approx(1.0)
    # What holds by construction is a sanity check, not a claim.
    assert {s["id"] for s in m["sanity_checks"]} == {"implicit_equals_unrolled", "banach_bound", "solves_converged"}
    assert not {"implicit_equals_unrolled", "banach_bound"} & set(by_id)


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
    assert all(s["passed"] for s in m["sanity_checks"])
