"""The implicit-deep-learning experiment (Kawaguchi, ICLR 2021) in its tiny setting.

(Named test_experiment_implicit.py: tests/test_implicit.py already exists and test directories have no
__init__.py, so a second test_implicit.py would clash under pytest's default import mode.)
"""
import json

import pytest

from iterlayers.experiments.implicit import run, settings


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("implicit")
    return out, run(out=out, tiny=True, seed=0)


def test_tiny_run_writes_metrics_table_and_figures(tiny_run):
    out, metrics = tiny_run
    for name in ("metrics.json", "table.md", "loss_squared.png", "loss_logistic.png", "rates.png",
                 "trust_region.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "metrics.json").read_text())
    widths = settings(quick=True, tiny=True)["widths"]
    assert sorted(on_disk["widths"]) == sorted(str(w) for w in widths)
    for w in widths:
        r = on_disk["widths"][str(w)]
        assert set(r) >= {"final_loss", "initial_loss", "fitted_rate", "theory_rate"}
        # gradient descent lowered the loss towards the shallow optimum, at a linear rate within the bound
        assert r["final_loss"] < r["initial_loss"]
        assert 0 < r["fitted_rate"] < 1 and r["fitted_rate"] <= r["theory_rate"] < 1
        full = on_disk["results"]["squared"][str(w)]
        assert full["final_loss"] >= full["optimum"] - 1e-9 * abs(full["optimum"])
        assert full["bound_holds_pointwise"] and full["direct_vs_iterative"] < 1e-8
    assert min(widths) < metrics["num_classes"]  # a width below the output dimension is part of the grid
    table = (out / "table.md").read_text()
    assert "## Paper's claims vs ours" in table
    assert "| claim (paper) | ours | holds |" in table
    assert len(metrics["claims"]) >= 5 and all(c["holds"] in (True, False, "partly") for c in metrics["claims"])


def test_tiny_run_shows_the_trust_region_relation(tiny_run):
    _, metrics = tiny_run
    tr = metrics["trust_region"]
    # the TR-Newton step of the shallow model agrees with the implicit step to first order in eta
    assert 0.8 < tr["eta_sweep_order"] < 1.3
    assert tr["max_trajectory_deviation"] < 0.1
    assert tr["mean_cosine_implicit_step_vs_neg_gradient"] < 0.999
