"""The CLI's user errors: --out checked before any work, no silent overwrite of a run, one line for every
OSError and every error of the family (a corrupted checkpoint included), and a real bug keeps its traceback."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import typer

from iterlayers import cli, training
from iterlayers.training import TrainConfig, read_metrics


@pytest.fixture
def npz(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 4
    x = torch.randn(4, 16, generator=g)[y] + 0.5 * torch.randn(48, 16, generator=g)
    path = tmp_path / "toy.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return str(path)


def _train_args(npz, out, *extra):
    return ["train", "--model", "mlp", "--data", npz, "--epochs", "1", "--batch-size", "16", "--option", "width=4",
            "--out", str(out), "--quiet", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("iterlayers: error: "), err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any training or experiment starts."""
    def boom(*a, **k):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(training, "train", boom)
    from iterlayers import experiments

    monkeypatch.setattr(experiments, "run_experiment", boom)


@pytest.mark.parametrize("command", ["train", "reproduce", "analyze", "bench"])
def test_an_unwritable_out_fails_before_any_work(command, tmp_path, npz, capsys, no_work, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = blocker / "sub"
    if command == "train":
        argv = _train_args(npz, bad)
    elif command == "reproduce":
        argv = ["reproduce", "core", "--tiny", "--out", str(bad)]
    elif command == "bench":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "torchdeq" else real(n, *a))
        monkeypatch.setattr(cli.subprocess, "call", lambda *a, **k: pytest.fail("bench ran"))
        argv = ["bench", "--out", str(bad)]
    else:
        run = tmp_path / "run"
        monkeypatch.undo()  # a real (tiny) run to analyse
        assert cli.main(_train_args(npz, run)) == 0
        monkeypatch.setattr(cli, "_format_report", lambda r: pytest.fail("report ran"))
        argv = ["analyze", str(run), "--plot", str(bad / "fig.png")]
    assert cli.main(argv) == 2
    err = _one_line_error(capsys)
    option = "--plot" if command == "analyze" else "--out"
    assert f"{option} '{bad if command != 'analyze' else bad}' is not a writable directory: Not a directory" in err


def test_out_is_created_probed_and_left_clean(tmp_path, npz):
    out = tmp_path / "a" / "b" / "run"
    assert cli.main(_train_args(npz, out)) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".safetensors")) == ["checkpoint.json",
                                                                                             "metrics.csv"]
    assert not list(out.glob(".iterlayers-probe-*"))


def test_a_failed_run_leaves_no_empty_directories(tmp_path, npz, capsys):
    out = tmp_path / "x" / "y"
    assert cli.main(_train_args(npz, out, "--option", "colour=red")) == 2
    assert "colour" in _one_line_error(capsys)
    assert not (tmp_path / "x").exists()


def test_train_refuses_to_overwrite_a_run(tmp_path, npz, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_args(npz, out)) == 0
    before = (out / "checkpoint.json").read_text()
    assert cli.main(_train_args(npz, out, "--seed", "1")) == 2
    err = _one_line_error(capsys)
    assert f"--out '{out}' already holds a training run; pass --resume to continue it or --overwrite" in err
    assert (out / "checkpoint.json").read_text() == before  # untouched
    # a partial run (only the weights of an interrupted first save) counts as a run too
    other = tmp_path / "partial"
    other.mkdir()
    (other / "checkpoint-000000001.safetensors").write_bytes(b"")
    assert cli.main(_train_args(npz, other)) == 2
    assert "already holds a training run" in _one_line_error(capsys)

    # --overwrite replaces it: a new run, the old files gone
    (out / "checkpoint-000000099.safetensors").write_bytes(b"stale")
    assert cli.main(_train_args(npz, out, "--seed", "1", "--overwrite")) == 0
    record = json.loads((out / "checkpoint.json").read_text())
    assert record["config"]["seed"] == 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == [record["weights"]]
    assert len(read_metrics(out / "metrics.csv")) == 1
    # --resume continues it (a longer run), and the two flags exclude each other
    assert cli.main(["train", "--resume", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    assert [int(r["epoch"]) for r in read_metrics(out / "metrics.csv")] == [1, 2]
    assert cli.main(["train", "--resume", "--overwrite", "--out", str(out)]) == 2
    assert "--resume and --overwrite exclude each other" in _one_line_error(capsys)
    # a directory holding other files but no run is fine
    assert cli.main(_train_args(npz, tmp_path)) == 0


def test_resume_keeps_every_saved_value_not_given(tmp_path, npz):
    out = tmp_path / "run"
    assert cli.main(_train_args(npz, out, "--lr", "0.02", "--checkpoint-every", "2")) == 0
    assert cli.main(["train", "--resume", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "checkpoint.json").read_text())["config"]
    assert cfg["lr"] == 0.02 and cfg["checkpoint_every"] == 2 and cfg["epochs"] == 2 and cfg["model"] == "mlp"


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EACCES"])
def test_every_oserror_is_one_line_with_status_2(tmp_path, npz, capsys, monkeypatch, errno_name):
    import errno

    def full(*a, **k):
        raise OSError(getattr(errno, errno_name), "simulated", str(tmp_path / "run" / "checkpoint.json"))

    monkeypatch.setattr(training, "save_checkpoint", full)
    assert cli.main(_train_args(npz, tmp_path / "run")) == 2
    err = _one_line_error(capsys)
    assert "simulated" in err and "checkpoint.json" in err


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug"), TypeError("a bug")])
def test_a_bug_is_not_posed_as_a_user_error(tmp_path, npz, monkeypatch, bug):
    def buggy(*a, **k):
        raise bug

    monkeypatch.setattr(training, "train", buggy)
    with pytest.raises(type(bug), match="a bug"):
        cli.main(_train_args(npz, tmp_path / "run"))


def _corrupt(out, how):
    record = json.loads((out / "checkpoint.json").read_text())
    weights = out / record["weights"]
    if how == "flip":
        data = bytearray(weights.read_bytes())
        data[-2] ^= 0x55
        weights.write_bytes(bytes(data))
    elif how == "truncate-weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "truncate-json":
        text = (out / "checkpoint.json").read_text()
        (out / "checkpoint.json").write_text(text[: len(text) // 3])
    elif how == "config":
        record["config"]["epochs"] = 0
        (out / "checkpoint.json").write_text(json.dumps(record))
    elif how == "model":
        record["config"]["model_options"] = {"width": 5}  # the weights have width 4
        (out / "checkpoint.json").write_text(json.dumps(record))
    return weights


@pytest.mark.parametrize("how, expected", [
    ("flip", "SHA-256"), ("truncate-weights", "SHA-256"), ("truncate-json", "not valid JSON"),
    ("config", "the saved training config is not valid: epochs must be a positive integer, got 0"),
    ("model", "the weights do not fit MLPClassifier: shape mismatch"),
])
@pytest.mark.parametrize("command", ["analyze", "resume"])
def test_a_corrupted_checkpoint_is_one_line_with_status_2(tmp_path, npz, capsys, command, how, expected):
    out = tmp_path / "run"
    assert cli.main(_train_args(npz, out)) == 0
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    weights = _corrupt(out, how)
    capsys.readouterr()
    argv = ["analyze", str(out)] if command == "analyze" else ["train", "--resume", "--epochs", "2", "--out", str(out)]
    assert cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert expected in err
    assert str(weights if how in ("flip", "truncate-weights", "model") else out / "checkpoint.json") in err
    if command == "resume":  # nothing was written over the damaged run
        assert sorted(p.name for p in out.iterdir()) == sorted(saved)
    shutil.rmtree(out)


def test_train_defaults_are_train_config_defaults():
    command = typer.main.get_command(cli.app).commands["train"]
    defaults = {p.name: p.default for p in command.params}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for name in cli._CONFIG_PARAMS:
        if name == "option":
            continue
        assert defaults[name] == fields[name].default, name
        checked += 1
    assert str(defaults["out"]) == TrainConfig.out
    assert checked == len(cli._CONFIG_PARAMS) - 1
    # every TrainConfig field is a CLI option, except what the CLI fixes itself
    assert set(fields) - {"model_options", "out", "eval_batch_size"} <= set(defaults)


def test_the_resume_rule_is_train_config_s():
    saved = TrainConfig(model="mlp", lr=0.1)
    assert saved.resumed({"epochs": 9, "device": "cpu"}).epochs == 9
    with pytest.raises(ValueError, match="these options cannot change: lr, seed"):
        saved.resumed({"lr": 0.2, "epochs": 3, "seed": 1})
    assert set(TrainConfig.RESUMABLE) < {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="inductor needs a C compiler")
def test_train_compile_with_inductor_runs_through_a_short_batch_and_matches_eager(tmp_path):
    # The default model (deq_mlp) with its implicit backward; 40 samples in batches of 16 end with a short
    # batch of 8, where `train --compile` used to crash ("donated buffers") once dynamo went dynamic.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 4
    x = torch.randn(4, 16, generator=g)[y] + 0.5 * torch.randn(48, 16, generator=g)
    np.savez(tmp_path / "toy.npz", x=x.numpy(), y=y.numpy())
    args = ["train", "--data", str(tmp_path / "toy.npz"), "--n-train", "40", "--n-test", "8", "--batch-size", "16",
            "--epochs", "1", "--option", "width=8", "--quiet"]
    assert cli.main([*args, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "eager")]) == 0
    (compiled,), (eager,) = read_metrics(tmp_path / "compiled" / "metrics.csv"), read_metrics(tmp_path / "eager" / "metrics.csv")
    assert int(compiled["global_step"]) == 3  # 16 + 16 + 8: the short batch was trained on
    for k in ("train_loss", "test_loss"):
        assert np.isfinite(float(compiled[k]))
        assert float(compiled[k]) == pytest.approx(float(eager[k]), rel=1e-5), k
    assert float(compiled["fwd_converged"]) == 1.0 and float(compiled["bwd_iters"]) >= 1
    assert json.loads((tmp_path / "compiled" / "checkpoint.json").read_text())["config"]["compile"] is True
