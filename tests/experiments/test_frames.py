"""The frames experiment in its tiny setting writes the contract's files, keys and claims table."""
import json

from iterlayers.experiments.frames import run


def test_tiny_frames_experiment(tmp_path):
    m = run(out=tmp_path, tiny=True, seed=0)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("spearman_dfp", "spearman_params", "architectures", "recurrent"):
        assert key in m and key in saved
    rows = saved["architectures"]
    assert len(rows) == 12
    for r in rows:
        for k in ("name", "structure", "depth", "width", "params", "dfp", "val_error"):
            assert k in r
        # the minimised potential never goes below the bound, nor above the random start
        for ds in ("digits", "mnist1d"):
            assert r[f"dfp_lower_bound_{ds}"] * (1 - 1e-6) <= r[f"dfp_{ds}"] <= r[f"dfp_initial_{ds}"]
            assert 0.0 <= r[f"val_error_{ds}"] <= 1.0
    assert -1.0 <= saved["spearman_dfp"] <= 1.0 and -1.0 <= saved["spearman_params"] <= 1.0
    # residual/dense of equal depth and width never have a higher minimal DFP than the chain
    by = {(r["depth"], r["width"], r["structure"]): r["dfp"] for r in rows}
    for (d, w, s), v in by.items():
        if s != "chain":
            assert v <= by[(d, w, "chain")] * (1 + 1e-3)
    table = (tmp_path / "table.md").read_text()
    assert "## Paper's claims vs ours" in table
    assert "| claim (paper) | ours | holds |" in table
    assert (tmp_path / "dfp_vs_error.png").stat().st_size > 1000
    assert (tmp_path / "recurrent_robustness.png").stat().st_size > 1000
    assert [r["T"] for r in saved["recurrent"]] == [1, 3]
