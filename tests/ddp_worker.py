"""Worker for the two-process DistributedDataParallel test (importable by spawned processes)."""
import os
import sys

import torch
from torch import nn

import iterlayers as il
from problems import TanhCell


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.deq = il.DEQ(TanhCell(4, norm=0.8, dtype=torch.float64), atol=1e-12, rtol=0, max_iter=200)
        self.head = nn.Linear(4, 2, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.deq(x))


def make_model():
    return Model()


def run_worker(rank, world, port, folder):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = torch.load(os.path.join(folder, "inputs.pt"), weights_only=True)
        model = make_model()
        model.load_state_dict(data["state"])
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = data["x"], data["y"]
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        # DDP averages gradients over ranks: the mean of per-shard mean losses is the full-batch mean loss.
        nn.functional.mse_loss(ddp(x[shard]), y[shard]).backward()
        if rank == 0:
            torch.save({k: p.grad for k, p in model.named_parameters()}, os.path.join(folder, "grads.pt"))
    finally:
        torch.distributed.destroy_process_group()
    # Everything is written and the group is destroyed: skip interpreter finalisation. There, Gloo's C++
    # threads can still hold objects whose destruction needs the interpreter, and under load that aborts a
    # worker that succeeded ("terminate called without an active exception", SIGABRT); the CLI's torchrun
    # workers do the same (iterlayers/__main__.py). An exception above still propagates to mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
