"""Every zoo model through the training loop: trains a few steps on CPU, resumes from its checkpoint exactly,
and runs under two-process DistributedDataParallel (one torchrun launch for all of them)."""
import math
import os
import subprocess
import sys

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
    # the same metrics, bit for bit, as the uninterrupted run (NaN marks a column not measured: equal to itself)
    assert _same_rows(resumed.rows, full.rows)
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    row = full.rows[-1]
    assert row["global_step"] == 2 * math.ceil(ZOO[name][3] / 32)
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])
    assert row["fwd_iters"] > 1 and row["fwd_converged"] > 0.5 and row["bwd_iters"] > 0


_WORKER = """
import json, os, sys

import torch.distributed as dist

from iterlayers.training import TrainConfig, train

dist.init_process_group("gloo")
for cfg in json.load(open(sys.argv[1])):
    train(TrainConfig(**cfg), progress=False)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as iterlayers/__main__.py: skip finalisation, where Gloo's threads can abort a finished worker
"""


def test_every_zoo_model_trains_under_two_process_ddp_as_in_one_process(tmp_path):
    import json

    # one torchrun launch trains every model; SGD (linear in the gradient) and tight forward tolerances, so
    # that a sample's fixed point does not depend on which samples share its (8- or 16-sample) batch
    configs = {name: _config(name, tmp_path / f"ddp_{name}", epochs=1, batch_size=16, n_train=32, n_test=32,
                             optimizer="sgd", lr=0.05) for name in ZOO}
    for cfg in configs.values():
        # (ignn too: each process solves the whole graph, but its adjoint stops relative to its own share)
        cfg.model_options.update(atol=1e-6, max_iter=300)
    (tmp_path / "configs.json").write_text(json.dumps([vars(c) for c in configs.values()]))
    (tmp_path / "worker.py").write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), str(tmp_path / "configs.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, cfg in configs.items():
        ddp = read_metrics(tmp_path / f"ddp_{name}" / "metrics.csv")
        assert load_checkpoint(tmp_path / f"ddp_{name}").record["world_size"] == 2
        cfg.out = str(tmp_path / f"one_{name}")
        single = train(cfg, progress=False)
        for k in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert float(ddp[0][k]) == pytest.approx(single.rows[0][k], rel=1e-4, abs=1e-6), (name, k)
        state = load_checkpoint(tmp_path / f"ddp_{name}").model_state
        for k, p in single.model.state_dict().items():
            torch.testing.assert_close(state[k], p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")


def _same_rows(a, b) -> bool:
    def same(x, y):
        return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))

    return len(a) == len(b) and all(r.keys() == q.keys() and all(same(r[k], q[k]) for k in r) for r, q in zip(a, b))
