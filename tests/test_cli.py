"""The `iterlayers` command end to end on tiny settings, and its one-line errors."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from iterlayers import cli, experiments
from iterlayers.training import read_metrics


@pytest.fixture
def npz(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 10
    x = torch.randn(10, 64, generator=g)[y] + 0.5 * torch.randn(96, 64, generator=g)
    path = tmp_path / "toy.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "foo"],
         "--model 'foo' is not valid; choose one of: deq_conv, deq_mlp, deq_transformer, ignn, implicit_linear, mdeq, "
         "mlp, mondeq, mondeq_conv"),
        (["train", "--data", "cifar"], "--data 'cifar' is not valid; choose one of: digits, graph:citeseer_csbm, graph:cora_csbm, "
         "graph:csbm, graph:davis, graph:digits_knn, graph:karate, graph:lesmis, graph:sbm, mnist1d, stdlib_chars "
         "or a .npz/.pt file"),
        (["train", "--optimizer", "lbfgs"], "--optimizer 'lbfgs' is not valid; choose one of: adam, sgd"),
        (["train", "--epochs", "many"], "Invalid value for '--epochs'"),
        (["train", "--epochs", "0", "--model", "mlp"], "epochs must be a positive integer, got 0"),
        (["train", "--colour", "red"], "No such option: --colour"),
        (["train", "--option", "width"], "--option 'width' is not KEY=VALUE"),
        (["train", "--option", "widht=3"], "unknown option(s) ['widht']"),
        (["train", "--device", "abacus"], "device='abacus' is not valid; use cpu, cuda or cuda:N"),
        (["reproduce", "everything"],
         "experiment 'everything' is not valid; choose one of: core, reasoning, frames, implicit_linear, operators, zoo, all"),
        (["analyze", "/nonexistent/run"], "no checkpoint at '/nonexistent/run'"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_options_give_one_line_errors(argv, message, capsys, npz):
    if argv[0] == "train" and "--data" not in argv:
        argv = argv + ["--data", npz, "--n-train", "16", "--quiet"]  # every case fails before any training
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("iterlayers: error: "), err
    assert message in err


def test_console_script_and_module_entry_points_exit_nonzero_with_one_line():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "iterlayers", "train", "--model", "resnet"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("iterlayers: error: --model 'resnet' is not valid; choose one of: "
                           "deq_conv, deq_mlp, deq_transformer, ignn, implicit_linear, mdeq, mlp, mondeq, "
                           "mondeq_conv\n")
    assert proc.stdout == ""


def test_train_then_analyze(tmp_path, npz, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", "deq_mlp", "--data", npz, "--epochs", "2", "--batch-size", "32",
                     "--lr", "0.01", "--option", "width=8", "--out", str(out), "--quiet"])
    assert code == 0
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["fwd_converged"]) == 1.0 and float(r["fwd_iters"]) >= 1 for r in rows)
    capsys.readouterr()
    code = cli.main(["analyze", str(out), "--batch-size", "8", "--plot", str(tmp_path / "a.png")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "forward solve on 8 test samples" in text
    assert "spectral norm" in text and "contraction" in text.lower()
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_experiment(table_claim: str):
    def run(*, out, quick=True, tiny=False, seed=0):
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text('{"x": 1}')
        (out / "table.md").write_text(f"# Fake\n\n## Paper's claims vs ours\n\n| claim (paper) | ours | holds |\n"
                                      f"|---|---|---|\n| {table_claim} | {tiny} | yes |\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1, 1))
        fig.savefig(out / "fig.png")
        plt.close(fig)
        return {"x": 1}

    return types.SimpleNamespace(run=run)


def test_reproduce_all_runs_every_available_experiment_and_records_failures(tmp_path, monkeypatch, capsys):
    def broken(**kw):
        raise RuntimeError("numerical trouble")

    mods = {"fake_core": _fake_experiment("claim A"), "fake_reasoning": types.SimpleNamespace(run=broken),
            "fake_frames": _fake_experiment("claim C"), "fake_zoo": _fake_experiment("claim Z")}
    registry = {"core": "fake_core", "reasoning": "fake_reasoning", "frames": "fake_frames",
                "implicit_linear": "iterlayers.experiments.does_not_exist", "operators": "fake_operators_missing",
                "zoo": "fake_zoo"}
    monkeypatch.setattr(experiments, "EXPERIMENTS", registry)
    real_import = experiments.importlib.import_module
    monkeypatch.setattr(experiments.importlib, "import_module", lambda n: mods[n] if n in mods else real_import(n))
    real_find = experiments.importlib.util.find_spec
    monkeypatch.setattr(experiments.importlib.util, "find_spec",
                        lambda n: object() if n in mods else (None if n.startswith("fake") else real_find(n)))

    code = cli.main(["reproduce", "all", "--tiny", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1  # some experiments did not complete, and the exit status says so
    assert "3 experiment(s) did not complete: reasoning, implicit_linear, operators" in captured.err
    report = (tmp_path / "REPORT.md").read_text()
    assert "claim A" in report and "claim C" in report
    assert "**failed**: RuntimeError: numerical trouble" in report
    assert report.count("**missing**") == 2
    assert "![core: fig](core/fig.png)" in report and (tmp_path / "core" / "fig.png").exists()


def test_bench_runs_the_script_or_prints_the_install_hint(tmp_path, monkeypatch, capsys):
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "bench_torchdeq.py").write_text(
        "import sys, pathlib\nout = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "out.mkdir(parents=True, exist_ok=True)\n(out / 'args.txt').write_text(' '.join(sys.argv[1:]))\n")
    monkeypatch.setattr(cli, "_repo_root", lambda: root)
    import importlib.util

    real = importlib.util.find_spec
    # Whether torchdeq (the bench extra) is installed must not matter here: pretend it is, then that it is not.
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "torchdeq" else real(n, *a))
    assert cli.main(["bench", "--quick", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "args.txt").read_text() == f"--out {tmp_path / 'b'} --quick"

    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchdeq" else real(n, *a))
    assert cli.main(["bench"]) == 2
    assert "pip install -e .[bench]" in capsys.readouterr().err
