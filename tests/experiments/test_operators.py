"""The operators experiment (Zappala et al., arXiv 2310.01618) in its tiny setting: files, keys, claims table."""
import json

from iterlayers.experiments.operators import run


def test_tiny_run_writes_required_outputs(tmp_path):
    metrics = run(out=tmp_path, quick=True, tiny=True, seed=0)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("accuracy_by_iterations", "baseline_accuracy", "deep_gnn_accuracy", "contraction", "mad",
                "transformer_rel_l2", "denoiser_mse", "claims"):
        assert key in metrics and key in on_disk
    acc = on_disk["accuracy_by_iterations"]["0.5"]
    assert set(acc) == {"1", "2"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert 0.0 <= on_disk["baseline_accuracy"]["0.5"] <= 1.0
    c = on_disk["contraction"]["p=0.5"]
    # the Banach factor is a + (1 - a) q by definition, and q never exceeds the global bound ||W||_2
    assert abs(c["banach_rate"] - (c["alpha"] + (1 - c["alpha"]) * c["q_at_H_N"])) < 1e-9
    assert c["q_at_H_N"] <= c["lipschitz_bound_W"] * (1 + 1e-3)
    table = (tmp_path / "table.md").read_text()
    assert "## Paper's claims vs ours" in table and "| claim (paper) | ours | holds |" in table
    assert len(metrics["claims"]) >= 5
    for name in metrics["figures"]:
        assert (tmp_path / name).stat().st_size > 1000
