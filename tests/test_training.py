"""The training loop: exact semantics against a hand-written loop, solver statistics, resume after a kill."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from iterlayers.cli import main as cli_main
from iterlayers.data import load_file
from iterlayers.models import build_model
from iterlayers.training import CRASH_ENV, METRIC_COLUMNS, TrainConfig, read_metrics, resolve_device, train


@pytest.fixture
def npz(tmp_path):
    """A small 10-class problem with 64 features (class means + noise), as a user's .npz file."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 64, generator=g)
    y = torch.arange(200) % 10
    x = means[y] + 0.8 * torch.randn(200, 64, generator=g)
    path = tmp_path / "toy.npz"
    import numpy as np

    np.savez(path, x=x.numpy(), y=y.numpy())
    return str(path)


@pytest.fixture
def one_thread():
    # Bitwise comparisons across processes need the same kernels: one thread here as in the subprocesses.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_loop_equals_a_hand_written_adam_loop(tmp_path, npz):
    """Data order, global batches, loss scaling and the reported epoch metrics, recomputed by hand."""
    cfg = TrainConfig(model="mlp", data=npz, epochs=2, batch_size=50, lr=1e-2, seed=3, n_train=120, n_test=40,
                      out=str(tmp_path / "run"), model_options={"width": 8})
    result = train(cfg, progress=False)

    data = load_file(npz, seed=3).subset(120, 40)
    torch.manual_seed(3)
    model = build_model("mlp", 64, 10, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(2):
        g = torch.Generator()
        g.manual_seed(3 * 1_000_003 + epoch)
        perm = torch.randperm(120, generator=g)
        loss_sum, correct = 0.0, 0
        for idx in torch.split(perm, 50):  # 50, 50, 20
            opt.zero_grad()
            logits = model(data.x_train[idx])
            loss = F.cross_entropy(logits, data.y_train[idx])
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == data.y_train[idx]).sum())
        row = result.rows[epoch]
        assert row["train_loss"] == pytest.approx(loss_sum / 120, rel=1e-6)
        assert row["train_acc"] == correct / 120
        with torch.no_grad():
            logits = model(data.x_test)
        assert row["test_acc"] == float((logits.argmax(1) == data.y_test).double().mean())
        assert row["test_loss"] == pytest.approx(float(F.cross_entropy(logits, data.y_test)), rel=1e-5)
    for a, b in zip(model.parameters(), result.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The CSV holds exactly the returned rows.
    csv_rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [list(r) for r in csv_rows] == [list(METRIC_COLUMNS)] * 2
    assert [float(r["train_loss"]) for r in csv_rows] == [r["train_loss"] for r in result.rows]


def test_deq_solver_statistics_are_recorded(tmp_path, npz):
    cfg = TrainConfig(model="deq_mlp", data=npz, epochs=1, batch_size=32, lr=5e-3, n_train=64, n_test=32,
                      out=str(tmp_path), model_options={"width": 16, "atol": 1e-4, "max_iter": 100})
    row = train(cfg, progress=False).rows[0]
    assert row["fwd_converged"] == 1.0  # a 0.9-contraction converges within max_iter
    assert 1 <= row["fwd_iters"] <= 100 and 1 <= row["test_fwd_iters"] <= 100
    assert 0 < row["fwd_residual"] <= 1e-4
    assert row["bwd_iters"] >= 1 and row["bwd_residual"] <= 1e-4 * (1 + 1e-6)


def test_models_calling_deq_solve_themselves_report_their_statistics(tmp_path, npz):
    cfg = TrainConfig(model="implicit_linear", data=npz, epochs=1, batch_size=32, lr=1e-2, n_train=64, n_test=32,
                      out=str(tmp_path), model_options={"width": 16, "gamma": 0.5})
    row = train(cfg, progress=False).rows[0]
    # gamma sigma(A) has spectral radius <= gamma = 0.5: Anderson needs a handful of iterations, all converge.
    assert row["fwd_converged"] == 1.0 and 1 <= row["fwd_iters"] <= 30 and row["bwd_iters"] >= 1


def test_compile_option_gives_the_same_run(tmp_path, npz):
    base = dict(model="deq_mlp", data=npz, epochs=1, batch_size=32, n_train=32, n_test=16, model_options={"width": 8})
    plain = train(TrainConfig(out=str(tmp_path / "a"), **base), progress=False).rows
    compiled = train(TrainConfig(out=str(tmp_path / "b"), compile=True, compile_backend="eager", **base),
                     progress=False).rows
    for k in ("train_loss", "test_loss", "fwd_iters"):
        assert compiled[0][k] == pytest.approx(plain[0][k], rel=1e-5)


def test_device_and_config_validation():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="use cpu, cuda or cuda:N"):
        resolve_device("tpu9")
    with pytest.raises(ValueError, match="unknown model 'nope'; valid: .*deq_mlp"):
        TrainConfig(model="nope").validate()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="lr must be a positive"):
        TrainConfig(lr=float("nan")).validate()


def test_resume_after_kill_mid_epoch_gives_identical_metrics(tmp_path, npz, one_thread):
    # 96 samples / batch 16 = 6 steps per epoch; checkpoints every 4 steps; killed after step 10 (mid epoch 2),
    # so the resume starts from the checkpoint at step 8 (epoch 2, step 2 of 6) with a partial epoch's sums.
    args = ["train", "--model", "deq_mlp", "--data", npz, "--epochs", "3", "--batch-size", "16", "--lr", "0.01",
            "--n-train", "96", "--n-test", "32", "--option", "width=8", "--checkpoint-every", "4", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **{CRASH_ENV: "10"})
    killed = subprocess.run([sys.executable, "-m", "iterlayers", *args, "--out", str(tmp_path / "killed")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 86, killed.stderr
    assert len(read_metrics(tmp_path / "killed" / "metrics.csv")) == 1  # it died during epoch 2
    saved = json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["progress"]
    assert saved == {"epoch": 1, "step_in_epoch": 2, "global_step": 8, "samples_seen": 128}  # mid-epoch
    assert cli_main(["train", "--resume", "--out", str(tmp_path / "killed"), "--quiet"]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "full")]) == 0
    full = (tmp_path / "full" / "metrics.csv").read_text()
    assert len(read_metrics(tmp_path / "full" / "metrics.csv")) == 3
    # Byte-identical CSVs: the same losses, accuracies and solver statistics in every epoch.
    assert (tmp_path / "killed" / "metrics.csv").read_text() == full


def test_resume_refuses_to_change_the_run(tmp_path, npz, capsys):
    assert cli_main(["train", "--model", "mlp", "--data", npz, "--epochs", "1", "--n-train", "32", "--quiet",
                     "--out", str(tmp_path)]) == 0
    assert cli_main(["train", "--resume", "--lr", "0.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "iterlayers: error: --resume continues the saved run; these options cannot change: lr"
