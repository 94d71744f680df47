"""Every zoo model through the training loop: trains a few steps on CPU, resumes from its checkpoint exactly,
and runs under two-process DistributedDataParallel (one torchrun launch for all of them)."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from iterlayers.checkpoint import load_checkpoint
from iterlayers.training import TrainConfig, read_metrics, train

#: (model, data, model options, n_train, n_test): sizes that train in about a second on one core
ZOO = {
    "mdeq": ("mdeq", "digits", {"channels": [4, 8]}, 96, 64),
    "ignn": ("ignn", "graph:csbm", {"graph": "csbm", "width": 16}, 140, 360),
    "deq_transformer": ("deq_transformer", "stdlib_chars", {"width": 16}, 64, 32),
    "mondeq": ("mondeq", "digits", {"width": 32}, 96, 64),
    "mondeq_conv": ("mondeq_conv", "digits", {"channels": 4}, 96, 64),
}


def _config(name, out, **changes):
    model, data, options, n_train, n_test = ZOO[name]
    cfg = dict(model=model, data=data, epochs=2, batch_size=32, lr=5e-3, seed=1, n_train=n_train, n_test=n_test,
               out=str(out), model_options=dict(options))
    cfg.update(changes)
    return TrainConfig(**cfg)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_trains_and_resumes_exactly(name, tmp_path):
    full = train(_config(name, tmp_path / "full"), progress=False)
    first = train(_config(name, tmp_path / "part", epochs=1), progress=False)
    assert len(first.rows) == 1
    resumed = train(_config(name, tmp_path / "part"), resume=True, progress=False)
    assert resumed.rows == full.rows  # the same metrics, bit for bit, as the uninterrupted run
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    row = full.rows[-1]
    assert row["global_step"] == 2 * math.ceil(ZOO[name][3] / 32)
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])
    assert row["fwd_iters"] > 1 and row["fwd_converged"] > 0.5 and row["bwd_iters"] > 0
