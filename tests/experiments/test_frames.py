"""The frames experiment: claims as data (tiny setting), selection blind to the test split, verdicts that flip."""
import json

import numpy as np
import pytest
import torch

from iterlayers.errors import ValidationError
from iterlayers.experiments.frames import (
    PLATEAU, SETTINGS, _conv_claims, _model_selection, _order_fraction, _regularised, _select_one, _selection_claims,
    plateaued, run, select_epoch,
)

from claims_checks import assert_claims_valid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("frames_tiny")
    return out, run(out=out, tiny=True, seed=0)


def test_tiny_frames_experiment_claims_and_files(tiny):
    out, m = tiny
    saved = json.loads((out / "metrics.json").read_text())
    assert_claims_valid(saved, min_claims=10)
    assert saved["settings"]["mode"] == "tiny"
    ids = {c["id"] for c in saved["claims"]}
    for name in ("digits", "mnist1d"):  # per dataset, never a Spearman of dataset averages
        assert {f"dfp_rank_{name}", f"dfp_beats_params_{name}", f"dfp_beats_mean_width_{name}",
                f"dfp_partial_{name}", f"within_depth_{name}", f"within_width_{name}"} <= ids
    assert {"fc_cifar10_readouts", "skip_lower_dfp_nonzero", "skip_lower_dfp_full", "recurrent_robust"} <= ids
    ref = saved["paper_reference"]["fc_cifar10"]
    assert [r["widths"] for r in ref] == [[8, 16, 32, 64], [64, 32, 64], [128, 256], [400, 800, 1600, 3200]]
    for r in ref:
        assert r["input_dim"] == 3072 and r["structure"] == "chain" and r["minimum_dfp"] > 0 and r["paper"] > 0
    for r in saved["architectures"]:
        for ds in ("digits", "mnist1d"):
            d = r[ds]
            assert d["dfp_lower_bound"] * (1 - 1e-6) <= d["dfp"] <= d["dfp_initial"]
            assert len(d["runs"]) == SETTINGS["tiny"]["seeds"]
            assert all(0.0 <= run_["test_error"] <= 1.0 and 1 <= run_["epoch"] for run_ in d["runs"])
    conv = saved["paper_reference"]["conv_efficiency"]
    assert {r["structure"] for r in conv} == {"chain", "residual", "dense"}
    for r in conv:
        assert {"structure", "params", "minimum_dfp"} <= set(r) and r["minimum_dfp"] >= r["lower_bound"] * (1 - 1e-6)
        assert r["exact"] == (r["structure"] != "dense")
    assert {"conv_dfp_falls_with_params", "conv_structure_order", "dfp_regularisation_digits",
            "dfp_regularisation_mnist1d"} <= ids
    conv_ids = {f"dfp_rank_digits_conv", "dfp_partial_digits_conv", "within_depth_digits_conv"}
    assert conv_ids <= ids
    assert {r["structure"] for r in saved["conv_architectures"]} == {"chain", "residual", "dense"}
    for r in saved["conv_architectures"]:
        d = r["digits_conv"]
        assert r["kind"] == "conv" and d["dfp_lower_bound"] * (1 - 1e-6) <= d["dfp"] <= d["dfp_initial"]
        assert isinstance(d["converged"], bool) and len(d["runs"]) == SETTINGS["tiny"]["seeds"]
    reg = saved["dfp_regularisation"]
    assert {r["kind"] for r in reg} == {"plain", "regularised"} and all(r["dfp"] > 0 for r in reg)
    assert {r["dataset"] for r in reg} == {"digits", "mnist1d"}
    for name in ("digits", "mnist1d", "digits_conv"):  # every net reports its convergence; claims use converged ones
        sel = saved["selection_statistics"][name]
        rows = saved["conv_architectures" if name == "digits_conv" else "architectures"]
        assert sel["dropped"] == [r["name"] for r in rows if not r[name]["converged"]]
        assert sel["n_nets"] == sum(r[name]["converged"] for r in rows)
        for r in rows:
            assert all(1 <= x["epoch"] <= x["epochs_run"] and 0 <= x["final_train_accuracy"] <= 1 for x in r[name]["runs"])
    assert all(r["dfp_weight"] == 0.0 for r in reg if r["kind"] == "plain")
    table = (out / "table.md").read_text()
    assert "## Paper's claims vs ours" in table and "## Sanity checks" in table and "Conv parameter efficiency" in table
    for f in ("dfp_vs_error.png", "paper_reference.png", "recurrent_robustness.png", "conv_efficiency.png"):
        assert (out / f).stat().st_size > 1000


def test_selection_never_sees_the_test_split():
    from iterlayers.data import load_digits

    cfg = dict(SETTINGS["tiny"], dfp_steps=5, epochs={"digits": 5}, seeds=2)
    data = load_digits(seed=0).subset(300, 120)
    poisoned = type(data)(data.name, data.x_train, data.y_train, data.x_test + 5 * torch.randn_like(data.x_test),
                          data.y_test[torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(1))],
                          data.num_classes)
    clean = _select_one(((16, 16), "chain"), cfg, {"digits": data}, seed=0)["digits"]["runs"]
    dirty = _select_one(((16, 16), "chain"), cfg, {"digits": poisoned}, seed=0)["digits"]["runs"]
    for a, b in zip(clean, dirty):
        assert (a["epoch"], a["val_error"], a["train_accuracy"]) == (b["epoch"], b["val_error"], b["train_accuracy"])
    assert [a["test_error"] for a in clean] != [b["test_error"] for b in dirty]  # the poison did reach the test


def _synthetic_rows(sign, n=16):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        dfp = 0.01 * (i + 1)
        err = 0.1 + sign * dfp + 0.002 * rng.normal()
        rows.append({"widths": [8 * (1 + i % 4)] * (1 + i // 8), "structure": "chain", "depth": 1 + i // 8,
                     "mean_width": 8.0 * (1 + i % 4),
                     "name": f"net{i}",
                     "d": {"dfp": dfp, "test_error": err, "params": int(rng.integers(100, 10_000)),
                           "runs": [{}, {}, {}], "converged": True}})
    return rows


def test_verdict_flips_on_a_synthetic_false_result():
    cfg = dict(SETTINGS["tiny"], n_perm=100)
    good = {c["id"]: c for c in _selection_claims(_synthetic_rows(+1), ["d"], cfg, "quick", 0)[0]}
    bad = {c["id"]: c for c in _selection_claims(_synthetic_rows(-1), ["d"], cfg, "quick", 0)[0]}
    assert good["dfp_rank_d"]["verdict"] == "holds" and good["dfp_rank_d"]["control"]["verdict"] == "does not hold"
    assert bad["dfp_rank_d"]["verdict"] == "does not hold"
    assert good["dfp_partial_d"]["verdict"] == "holds" and bad["dfp_partial_d"]["verdict"] == "does not hold"


def test_model_selection_rows_do_not_depend_on_worker_processes(tmp_path):
    from iterlayers.data import load_digits, load_mnist1d

    cfg = dict(SETTINGS["tiny"], depths=[2], widths=[8], dfp_steps=10, epochs={"digits": 1, "mnist1d": 1}, seeds=1)
    datasets = {"digits": load_digits(seed=0).subset(200, 100), "mnist1d": load_mnist1d(seed=0, num_samples=300)}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = _model_selection(cfg, datasets, seed=3, workers=1)
        torch.set_num_threads(2)
        pooled = _model_selection(cfg, datasets, seed=3, workers=2)
    finally:
        torch.set_num_threads(threads)
    assert [r["name"] for r in pooled] == [r["name"] for r in sequential] and len(pooled) == 4
    assert pooled == sequential
    with pytest.raises(ValueError, match="workers must be"):
        run(out=tmp_path, tiny=True, workers=0)
    assert not any(tmp_path.iterdir())  # refused before any work


def test_conv_order_statistic_flips_when_the_order_is_reversed():
    def row(structure, c, params, dfp):
        return {"structure": structure, "channels": c, "depth": 3, "params": params, "minimum_dfp": dfp}

    good = [row("chain", c, 100 * c, 1.0 / c) for c in (1, 2, 4)] + \
        [row("residual", c, 100 * c, 0.9 / c) for c in (1, 2, 4)] + [row("dense", c, 150 * c, 0.5 / c) for c in (1, 2)]
    bad = [dict(r, minimum_dfp=r["minimum_dfp"] * (3.0 if r["structure"] == "dense" else 1.0)) for r in good]
    assert _order_fraction(good)[0] == 1.0
    frac, comps = _order_fraction(bad)
    assert frac == 3 / 5 and len(comps) == 5  # the dense comparisons fail, chain vs residual still hold
    cfg = dict(SETTINGS["tiny"], n_perm=20)
    falling = [dict(r, minimum_dfp=1.0 / r["params"]) for r in good]
    rising = [dict(r, minimum_dfp=float(r["params"])) for r in good]
    ok = {c["id"]: c for c in _conv_claims({"conv_efficiency": falling}, cfg, "quick", 0)[0]}
    assert ok["conv_dfp_falls_with_params"]["value"] == pytest.approx(-1.0)
    assert ok["conv_dfp_falls_with_params"]["verdict"] == "holds"
    no = {c["id"]: c for c in _conv_claims({"conv_efficiency": rising}, cfg, "quick", 0)[0]}
    assert no["conv_dfp_falls_with_params"]["verdict"] == "does not hold"


def test_dfp_weight_selection_never_sees_the_test_split():
    from iterlayers.data import load_digits

    cfg = dict(SETTINGS["tiny"], reg_widths=(16, 16), reg_weights=[1.0, 300.0], reg_epochs=2)
    data = load_digits(seed=0).subset(300, 120)
    poisoned = type(data)(data.name, data.x_train, data.y_train, data.x_test + 5 * torch.randn_like(data.x_test),
                          data.y_test.flip(0), data.num_classes)
    clean, dirty = _regularised(cfg, data, 0, 2), _regularised(cfg, poisoned, 0, 2)
    keys = ("seed", "kind", "dfp_weight", "epoch", "val_error", "train_accuracy", "dfp")
    assert [tuple(r[k] for k in keys) for r in clean] == [tuple(r[k] for k in keys) for r in dirty]
    assert [r["test_error"] for r in clean] != [r["test_error"] for r in dirty]
    # the penalty acts: the same training with a large weight ends at a lower DFP
    from iterlayers.frames import DeepFrameNet, FrameArchitecture

    arch = FrameArchitecture((64,), (16, 16))
    dfps = []
    for w in (0.0, 300.0):
        torch.manual_seed(0)
        net = DeepFrameNet(arch, 10)
        select_epoch(net, data.x_train, data.y_train, data.x_train, data.y_train, max_epochs=2, seed=0, dfp_weight=w)
        with torch.no_grad():
            dfps.append(float(arch.potential([m.weight for m in net.layers])))
    assert dfps[1] < 0.99 * dfps[0]
    with pytest.raises(ValidationError, match="dfp_weight"):
        select_epoch(torch.nn.Linear(2, 2), data.x_train, data.y_train, data.x_train, data.y_train, max_epochs=1, seed=0,
                     dfp_weight=-1.0)


def test_claims_use_converged_nets_only():
    # 16 nets where DFP and error agree, plus 8 unconverged nets whose errors run the other way: dropped, the
    # verdict is that of the 16; marked converged, they flip it.
    good = _synthetic_rows(+1)
    bad = _synthetic_rows(-1, n=8)
    for i, r in enumerate(bad):
        r["name"], r["d"] = f"bad{i}", dict(r["d"], dfp=0.2 + 0.05 * i, converged=False)
    cfg = dict(SETTINGS["tiny"], n_perm=100)
    claims, stats = _selection_claims(good + bad, ["d"], cfg, "quick", 0)
    by = {c["id"]: c for c in claims}
    assert stats["d"]["dropped"] == [f"bad{i}" for i in range(8)] and stats["d"]["n_nets"] == 16
    assert by["dfp_rank_d"]["verdict"] == "holds"
    flipped = [dict(r, d=dict(r["d"], converged=True)) for r in bad]
    by2 = {c["id"]: c for c in _selection_claims(good + flipped, ["d"], cfg, "quick", 0)[0]}
    assert by2["dfp_rank_d"]["value"] < by["dfp_rank_d"]["value"] - 0.3
    few = {c["id"]: c for c in _selection_claims(bad + good[:3], ["d"], cfg, "quick", 0)[0]}
    assert few["dfp_rank_d"]["verdict"] == "not testable here"  # < MIN_NETS converged nets: nothing to rank


def test_plateau_rule():
    rule = dict(window=3, rtol=0.02, loss_floor=0.01)
    falling = [1.0 * 0.9 ** t for t in range(30)]  # -10% per epoch: never a plateau until the floor
    assert not any(plateaued(falling[: t + 1], **rule) for t in range(20))
    assert plateaued([0.5] * 6, **rule) and not plateaued([0.5] * 5, **rule)  # needs two full windows
    assert plateaued([2.0, 0.009], **rule)  # the training set is fitted
    assert plateaued([1.0, 1.0, 1.0, 0.995, 0.99, 0.985], **rule)  # 1.2% over a window: a plateau
    assert set(PLATEAU) == {"window", "rtol", "loss_floor"}


def test_select_epoch_trains_to_the_plateau_and_reports_it():
    from iterlayers.data import load_digits
    from iterlayers.frames import DeepFrameNet, FrameArchitecture

    data = load_digits(seed=0).subset(300, 50)
    x, y, xv, yv = data.x_train[:240], data.y_train[:240], data.x_train[240:], data.y_train[240:]
    torch.manual_seed(0)
    net = DeepFrameNet(FrameArchitecture((64,), (32,)), 10)
    out = select_epoch(net, x, y, xv, yv, max_epochs=200, seed=0, lr=1e-2, batch=64)
    assert out["converged"] and out["epochs_run"] < 200 and 1 <= out["epoch"] <= out["epochs_run"]
    assert out["final_train_loss"] <= PLATEAU["loss_floor"] or out["epochs_run"] >= 2 * PLATEAU["window"]
    assert out["final_train_accuracy"] > 0.95  # digits: a 32-unit net fits its training split
    torch.manual_seed(0)
    capped = select_epoch(DeepFrameNet(FrameArchitecture((64,), (32,)), 10), x, y, xv, yv, max_epochs=2, seed=0)
    assert not capped["converged"] and capped["epochs_run"] == 2
    with pytest.raises(ValidationError, match="max_epochs"):
        select_epoch(net, x, y, xv, yv, max_epochs=0, seed=0)
    with pytest.raises(ValidationError, match="plateau"):
        select_epoch(net, x, y, xv, yv, max_epochs=1, seed=0, plateau={"patience": 3})


def test_chain_candidates_match_the_explicit_global_frame():
    # The closed-form / circulant candidate values of a chain with tight (harmonic or orthonormal) layer
    # frames against the explicitly assembled, column-normalised frame and its Gram matrix, averaged over the
    # chain's structural support (blocks (j, j) and (j, j +- 1); the frames' own exact zeros do not count).
    from iterlayers.experiments.frames import _chain_candidates, _tight_frame
    from iterlayers.frames import assemble_global_frame, gram_matrix

    widths, d0 = (6, 10, 4), 4
    dims = (d0,) + widths
    frame = assemble_global_frame([_tight_frame(dims[j], dims[j + 1]) for j in range(3)], structure="chain",
                                  normalize_atoms=True)
    G = gram_matrix(frame.matrix)
    block = torch.repeat_interleave(torch.arange(3), torch.tensor(widths))
    support = (block.view(-1, 1) - block.view(1, -1)).abs() <= 1
    off = support & ~torch.eye(len(block), dtype=torch.bool)
    c = _chain_candidates(widths, d0)
    assert c["nonzero"] == pytest.approx(float(G[support].pow(2).sum() / support.sum()), rel=1e-10)
    assert c["offdiagonal"] == pytest.approx(float(G[off].pow(2).mean()), rel=1e-10)
    assert c["rms"] == pytest.approx(float(G[off].pow(2).mean().sqrt()), rel=1e-10)
    assert c["mean_abs"] == pytest.approx(float(G[off].abs().mean()), rel=1e-10)
