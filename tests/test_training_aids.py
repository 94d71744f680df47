"""`train` with the Jacobian penalty and the spectral-radius monitor: the loss against a hand-written loop, the
metrics columns, the every-k schedule across a resume, and a 2-process DDP run."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from iterlayers.cli import main as cli_main
from iterlayers.data import load_file
from iterlayers.layers import JacobianPenalty
from iterlayers.models import build_model
from iterlayers.training import TrainConfig, deq_layers, read_metrics, train


@pytest.fixture
def npz(tmp_path):
    g = torch.Generator().manual_seed(1)
    means = torch.randn(10, 64, generator=g)
    y = torch.arange(120) % 10
    x = means[y] + 0.8 * torch.randn(120, 64, generator=g)
    path = tmp_path / "toy.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return str(path)


OPTIONS = {"width": 8, "atol": 1e-6, "max_iter": 100}


def test_loss_adds_weight_times_penalty_like_a_hand_written_loop(tmp_path, npz):
    weight = 0.5
    cfg = TrainConfig(model="deq_mlp", data=npz, epochs=1, batch_size=40, lr=0.05, optimizer="sgd", seed=3,
                      n_train=80, n_test=40, out=str(tmp_path / "run"), model_options=OPTIONS,
                      jacobian_weight=weight, jacobian_every=1, jacobian_samples=2)
    result = train(cfg, progress=False)

    data = load_file(npz, seed=3).subset(80, 40)
    torch.manual_seed(3)
    model = build_model("deq_mlp", 64, 10, **OPTIONS)
    (layer,) = deq_layers(model)
    layer.jacobian_penalty = JacobianPenalty(samples=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator()
    g.manual_seed(3 * 1_000_003)
    penalties = []
    for idx in torch.split(torch.randperm(80, generator=g), 40):
        opt.zero_grad()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]) + weight * layer.penalty
        penalties.append(float(layer.penalty.detach()))
        loss.backward()
        opt.step()
    for a, b in zip(model.parameters(), result.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert result.rows[0]["jac_penalty"] == pytest.approx(sum(penalties) / len(penalties), rel=1e-6)
    assert math.isnan(result.rows[0]["spectral_radius"])  # not measured

    # the control: without the penalty the same run ends elsewhere
    plain = train(TrainConfig(**{**cfg.__dict__, "jacobian_weight": 0.0, "out": str(tmp_path / "plain")}),
                  progress=False)
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(plain.model.parameters(),
                                                                     result.model.parameters()))
    assert moved > 1e-4


def test_cli_columns_and_the_schedule_survives_a_resume(tmp_path, npz):
    common = ["train", "--model", "deq_mlp", "--data", npz, "--batch-size", "16", "--lr", "0.05", "--optimizer",
              "sgd", "--n-train", "80", "--n-test", "40", "--quiet", "--option", "width=8",
              "--jacobian-weight", "0.1", "--jacobian-every", "2", "--jacobian-samples", "2", "--spectral-every", "3"]
    assert cli_main([*common, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert cli_main([*common, "--epochs", "1", "--out", str(tmp_path / "split")]) == 0
    assert cli_main(["train", "--resume", "--epochs", "2", "--quiet", "--out", str(tmp_path / "split")]) == 0
    straight = read_metrics(tmp_path / "straight" / "metrics.csv")
    split = read_metrics(tmp_path / "split" / "metrics.csv")
    assert len(straight) == len(split) == 2
    for row in straight:
        assert 0 < float(row["jac_penalty"]) < 1 and 0 < float(row["spectral_radius"]) < 1
    # 5 steps per epoch, every 2 and every 3: the resumed epoch uses steps 5..9 of the same schedule
    assert straight == split
    assert cli_main(["train", "--out", str(tmp_path / "bad"), "--data", npz, "--jacobian-every", "0"]) == 2


def test_two_processes_run_the_aids(tmp_path, npz):
    args = ["train", "--model", "deq_mlp", "--data", npz, "--epochs", "1", "--batch-size", "16", "--lr", "0.05",
            "--optimizer", "sgd", "--seed", "2", "--n-train", "80", "--n-test", "40", "--quiet",
            "--option", "width=12", "--option", "atol=1e-6", "--option", "max_iter=100",
            "--jacobian-weight", "0.01", "--jacobian-samples", "8", "--spectral-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "iterlayers",
         *args, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    (ddp,), (one,) = read_metrics(tmp_path / "ddp" / "metrics.csv"), read_metrics(tmp_path / "one" / "metrics.csv")
    # the power method converges to tol 1e-3 from any start: the same radius whatever the shards
    assert float(ddp["spectral_radius"]) == pytest.approx(float(one["spectral_radius"]), rel=5e-3)
    # the Hutchinson probes differ (other shapes per rank): the same expectation, within its noise
    assert float(ddp["jac_penalty"]) == pytest.approx(float(one["jac_penalty"]), rel=0.2)
    assert float(ddp["train_loss"]) == pytest.approx(float(one["train_loss"]), rel=1e-3)
