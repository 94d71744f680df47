"""The reasoning-layer experiment runs end to end on its tiny grid."""
import json

import pytest

from iterlayers.experiments import reasoning

REQUIRED = ("train_error", "test_error", "gap", "predicted_rate", "measured_rate", "stability")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reasoning")
    return out, reasoning.run(out=out, tiny=True, seed=0)


def test_tiny_run_writes_metrics_table_and_figures(tiny_run):
    out, metrics = tiny_run
    on_disk = json.loads((out / "metrics.json").read_text())
    per = on_disk["per_algorithm"]
    assert set(per) == {"gd", "nag", "rnn"}
    ks = [str(k) for k in reasoning.SETTINGS["tiny"]["ks"]]
    for algo, per_k in per.items():
        assert list(per_k) == ks
        for k in ks:
            for key in REQUIRED:
                assert key in per_k[k], (algo, k, key)
            m = per_k[k]
            assert m["gap"] == pytest.approx(m["test_error"] - m["train_error"])
            assert m["train_error"] > 0 and m["test_error"] > 0
    # closed-form quantities of the hybrids: GD's predicted rate is exactly (1 - s mu)^k with s = 1, mu = 0.1
    for k in reasoning.SETTINGS["tiny"]["ks"]:
        assert per["gd"][str(k)]["predicted_rate"] == pytest.approx(0.9 ** k)
        # the measured convergence on the teacher energy never beats the worst-case bound
        assert per["gd"][str(k)]["measured_rate"] <= 0.9 ** k + 1e-12
        # any student's error is bounded below by the pinned-eigenvalue floor
        for algo in ("gd", "nag"):
            assert per[algo][str(k)]["train_error"] >= per[algo][str(k)]["error_floor"] - 1e-9
    # k = 1: NAG's first step is a GD step, so the two hybrids are the same model
    assert per["nag"]["1"]["train_error"] == pytest.approx(per["gd"]["1"]["train_error"], rel=1e-9)
    table = (out / "table.md").read_text()
    assert "## Paper's claims vs ours" in table
    assert "| claim (paper) | ours | holds |" in table
    assert len(metrics["claims"]) == 3
    for name in ("errors_vs_k.png", "gap_vs_k.png", "stability_vs_k.png"):
        assert (out / name).stat().st_size > 1000


def test_deeper_layers_fit_better(tiny_run):
    _, metrics = tiny_run
    per = metrics["per_algorithm"]
    k0, k1 = reasoning.SETTINGS["tiny"]["ks"][0], reasoning.SETTINGS["tiny"]["ks"][-1]
    for algo in ("gd", "nag"):
        assert per[algo][str(k1)]["train_error"] < per[algo][str(k0)]["train_error"]
    assert per["nag"][str(k1)]["train_error"] < per["gd"][str(k1)]["train_error"]
