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


def test_model_selection_rows_do_not_depend_on_worker_processes(tmp_path):
    # Every row is seeded from the seed and its architecture alone, so the full setting's process pool gives
    # the sequential rows exactly (same torch thread count in both: one).
    import pytest
    import torch

    from iterlayers.data import load_digits, load_mnist1d
    from iterlayers.experiments.frames import SETTINGS, _model_selection

    cfg = dict(SETTINGS["tiny"], depths=[2], widths=[8], dfp_steps=10, epochs={"digits": 1, "mnist1d": 1})
    datasets = {"digits": load_digits(seed=0).subset(200, 100), "mnist1d": load_mnist1d(seed=0, num_samples=300)}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = _model_selection(cfg, datasets, seed=3, workers=1)
        torch.set_num_threads(2)
        pooled = _model_selection(cfg, datasets, seed=3, workers=2)
    finally:
        torch.set_num_threads(threads)
    assert [r["name"] for r in pooled] == [r["name"] for r in sequential] and len(pooled) == 3
    assert pooled == sequential
    with pytest.raises(ValueError, match="workers must be"):
        run(out=tmp_path, tiny=True, workers=0)
    assert not any(tmp_path.iterdir())  # refused before any work
