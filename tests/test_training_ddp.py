"""`torchrun --nproc_per_node=2 -m iterlayers train` (DDP, gloo on CPU) equals one process, same global batch."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from iterlayers.checkpoint import load_checkpoint
from iterlayers.training import TrainConfig, read_metrics, train


def test_two_processes_match_one_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    means = torch.randn(10, 64, generator=g)
    y = torch.arange(120) % 10
    x = means[y] + 0.8 * torch.randn(120, 64, generator=g)
    data = tmp_path / "toy.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    # 80 train samples, global batch 16 (8 per rank), 2 epochs = 10 steps; the DEQ solves to 1e-6 so that a
    # sample's fixed point does not depend on which other samples share its batch. SGD, not Adam: Adam's
    # normalisation blows rounding-level gradient differences on near-zero components up to lr-sized steps.
    opts = ["--option", "width=12", "--option", "atol=1e-6", "--option", "max_iter=100"]
    args = ["train", "--model", "deq_mlp", "--data", str(data), "--epochs", "2", "--batch-size", "16",
            "--lr", "0.05", "--optimizer", "sgd", "--seed", "2", "--n-train", "80", "--n-test", "40", "--quiet", *opts]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "iterlayers",
         *args, "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cfg = TrainConfig(model="deq_mlp", data=str(data), epochs=2, batch_size=16, lr=0.05, optimizer="sgd", seed=2, n_train=80,
                      n_test=40, out=str(tmp_path / "one"),
                      model_options={"width": 12, "atol": 1e-6, "max_iter": 100})
    single = train(cfg, progress=False)

    ddp_rows = read_metrics(tmp_path / "ddp" / "metrics.csv")
    assert len(ddp_rows) == 2
    for a, b in zip(ddp_rows, single.rows):
        assert int(a["global_step"]) == b["global_step"] == 5 * b["epoch"]
        for k in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert float(a[k]) == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
        # Iteration counts are integers per sample: one whose residual lands within round-off of the
        # tolerance can take one step more or less when its batch partners (and so the BLAS blocking of the
        # batched matmul) change between 8- and 16-sample batches. Allow that for a few of the 80 samples;
        # the losses above and the weights below are held to 1e-5.
        assert float(a["fwd_iters"]) == pytest.approx(b["fwd_iters"], abs=0.1)
    ddp_state = load_checkpoint(tmp_path / "ddp").model_state
    record = load_checkpoint(tmp_path / "ddp").record
    assert record["world_size"] == 2
    # Sharded, not replicated: the two ranks together saw each training sample once per epoch.
    assert record["progress"]["samples_seen"] == 2 * 80
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], p, rtol=1e-5, atol=1e-5)
    # And the run really moved: the weights differ from their initial values by far more than the tolerance.
    torch.manual_seed(2)
    from iterlayers.models import build_model

    init = build_model("deq_mlp", 64, 10, width=12).state_dict()
    assert max(float((init[k] - v).abs().max()) for k, v in single.model.state_dict().items()) > 1e-2
