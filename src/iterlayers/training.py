"""The generic training loop: any registered model on any dataset, resumable and multi-process.

What one run does (``train(config)``):

- Data order. Epoch e visits the training set in the order ``randperm(n)`` drawn from a ``torch.Generator``
  seeded with ``seed * 1_000_003 + e``; the generator's state is stored in every checkpoint. The order is
  cut into *global* batches of ``batch_size`` samples.
- Multi-process. Launched by ``torchrun``, every rank sees the same global batches and takes its contiguous
  share (``torch.tensor_split(batch, world_size)[rank]``); the per-rank loss is
  ``sum_i l_i * world_size / |global batch|``, so after DistributedDataParallel averages gradients over ranks
  the update is exactly the gradient of the global mean loss -- the same update one process makes on the whole
  global batch. A final batch smaller than ``world_size`` is skipped (it could not give every rank a sample).
  Backend: gloo on CPU, nccl on CUDA.
- Metrics. Per epoch: train loss/accuracy (accumulated over the epoch's steps), test loss/accuracy, and the
  solver statistics of every :class:`iterlayers.DEQ` in the model -- mean forward iterations, mean final
  forward residual ||f(z) - z||, fraction of samples converged, mean backward (adjoint) iterations and residual.
  Sums are all-reduced at every step, so every rank holds the global numbers and rank 0 writes
  ``metrics.csv``. The CSV holds no wall-clock times: two runs that compute the same thing produce identical
  files.
- Checkpoints (:mod:`iterlayers.checkpoint`) every ``checkpoint_every`` optimizer steps and at the end of every
  epoch: weights + optimizer tensors (safetensors), config, progress within the epoch, data-order generator
  state, RNG state, the epoch's running sums and the metrics rows (JSON). ``resume=True`` restarts at the saved
  position and produces the same metrics as an uninterrupted run.

Fault injection for tests: the environment variable ``ITERLAYERS_CRASH_AFTER_STEPS=N`` makes the process exit
abruptly (``os._exit``, no clean-up) right after global optimizer step N.
"""
from __future__ import annotations

import base64
import csv
import io
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from iterlayers.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

__all__ = ["TrainConfig", "TrainResult", "train", "deq_layers", "resolve_device", "METRIC_COLUMNS", "read_metrics"]

CRASH_ENV = "ITERLAYERS_CRASH_AFTER_STEPS"
OPTIMIZERS = ("adam", "sgd")

METRIC_COLUMNS = (
    "epoch",
    "global_step",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "fwd_iters",
    "fwd_residual",
    "fwd_converged",
    "bwd_iters",
    "bwd_residual",
    "test_fwd_iters",
)

# Running sums of one epoch, in this order (float64, all-reduced across ranks at every step).
_ACC = ("loss", "correct", "n", "fwd_iters", "fwd_res", "fwd_conv", "fwd_n", "bwd_iters", "bwd_res", "bwd_n")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    ``batch_size`` is the *global* batch: with N processes each one takes ``batch_size / N`` samples per step.
    """

    model: str = "deq_mlp"
    data: str = "digits"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    compile: bool = False
    compile_backend: str = "inductor"
    out: str = "runs/train"
    checkpoint_every: int = 0
    model_options: dict[str, Any] = field(default_factory=dict)
    n_train: int | None = None
    n_test: int | None = None
    eval_batch_size: int = 512

    def validate(self) -> "TrainConfig":
        from iterlayers.models import MODELS

        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid: {', '.join(sorted(MODELS))}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0: only at epoch ends), got {self.checkpoint_every!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not valid; choose one of {', '.join(OPTIMIZERS)}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.model_options, dict):
            raise TypeError(f"model_options must be a dict, got {type(self.model_options).__name__}")
        resolve_device(self.device, check_only=True)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TypeError(f"unknown TrainConfig fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


@dataclass
class TrainResult:
    model: nn.Module
    rows: list[dict[str, Any]]
    out: Path
    config: TrainConfig


# ------------------------------------------------------------------------------------------- helpers
def resolve_device(device: str, *, local_rank: int = 0, check_only: bool = False) -> torch.device:
    """``"cpu"``, ``"cuda"`` (the local rank's GPU under torchrun) or ``"cuda:N"``; errors are one line."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not valid; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but no CUDA device is available; use --device cpu")
        if dev.index is None and not check_only:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def deq_layers(model: nn.Module) -> list[nn.Module]:
    """Every :class:`iterlayers.DEQ` inside ``model`` (empty when the core is unavailable)."""
    try:
        from iterlayers import DEQ
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, DEQ)]


def _stat_sources(model: nn.Module) -> list[nn.Module]:
    """Modules that report solver statistics: DEQ layers (``.stats``) and models that call the functional
    ``deq_solve`` themselves and keep ``.last_stats = {"forward": ..., "backward": ...}``."""
    found = deq_layers(model)
    return found + [m for m in model.modules() if hasattr(m, "last_stats") and m not in found]


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # Adam (the default) divides by sqrt(v): on a near-zero gradient component it turns rounding-level
    # differences (e.g. the order of DDP's all-reduce) into lr-sized ones. SGD with momentum is linear in the
    # gradient and keeps multi-process runs within rounding of one process.
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def _gen_state_b64(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode("ascii")


def _gen_from_b64(s: str) -> torch.Generator:
    g = torch.Generator()
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone())
    return g


def _global_batches(n: int, batch_size: int, world: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    batches = list(torch.split(perm, batch_size))
    if batches and len(batches[-1]) < world:
        batches.pop()
    return batches


def _stats_of(stats: Any) -> tuple[float, float, float, float] | None:
    """(sum nstep, sum abs residual, sum converged, count) of a SolverStats, or None."""
    if stats is None:
        return None
    try:
        nstep = torch.as_tensor(stats.nstep).double().reshape(-1)
        res = torch.as_tensor(stats.abs_residual).double().reshape(-1)
        conv = torch.as_tensor(getattr(stats, "converged", torch.ones_like(nstep))).double().reshape(-1)
    except AttributeError:
        return None
    return float(nstep.sum()), float(res.sum()), float(conv.sum()), float(nstep.numel())


def _get_stats(layer: nn.Module, key: str):
    stats = getattr(layer, "stats", None)
    if not isinstance(stats, dict):
        stats = getattr(layer, "last_stats", None)
    if isinstance(stats, dict):
        return stats.get(key)
    return None


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _mean(total: float, n: float) -> float:
    return total / n if n > 0 else float("nan")


# ------------------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.data``; see the module docstring for the exact semantics.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised here (and destroyed at the end if
    this call created it). Returns the trained (unwrapped) model and the per-epoch metrics rows.
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from iterlayers.data import load_dataset
    from iterlayers.models import build_model

    out = Path(config.out)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out)
        saved = TrainConfig.from_dict(ckpt.config)
        # The run's definition comes from the checkpoint; only how/where/how long may change on resume.
        for name in ("epochs", "device", "compile", "compile_backend", "checkpoint_every"):
            setattr(saved, name, getattr(config, name))
        saved.out = str(out)
        config = saved
    config.validate()

    rank, world, local_rank = _dist_env()
    created_pg = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if resolve_device(config.device, check_only=True).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
        created_pg = True
    try:
        if world > 1 and config.batch_size < world:
            raise ValueError(f"batch_size={config.batch_size} is smaller than the number of processes ({world})")
        device = resolve_device(config.device, local_rank=local_rank)
        data = load_dataset(config.data, seed=config.seed)
        if config.n_train is not None or config.n_test is not None:
            data = data.subset(config.n_train, config.n_test)
        if data.num_classes is None:
            raise ValueError(f"dataset {config.data!r} has real-valued targets; train fits classifiers (integer labels)")
        x_train, y_train = data.x_train.reshape(len(data.x_train), -1), data.y_train
        x_test, y_test = data.x_test.reshape(len(data.x_test), -1), data.y_test

        torch.manual_seed(config.seed)
        model = build_model(config.model, x_train.shape[1], data.num_classes, **config.model_options).to(device)
        optimizer = _make_optimizer(config, model)

        rows: list[dict[str, Any]] = []
        start_epoch, start_step, global_step, samples_seen = 0, 0, 0, 0
        acc = torch.zeros(len(_ACC), dtype=torch.float64)
        gen_state: str | None = None
        if ckpt is not None:
            model.load_state_dict({k: v.to(device) for k, v in ckpt.model_state.items()})
            if ckpt.optimizer_state is not None:
                optimizer.load_state_dict(ckpt.optimizer_state)
            prog = ckpt.progress
            start_epoch, start_step, global_step = int(prog["epoch"]), int(prog["step_in_epoch"]), int(prog["global_step"])
            samples_seen = int(prog.get("samples_seen", 0))
            rows = list(ckpt.record.get("rows", []))
            acc = torch.tensor(ckpt.record["accum"], dtype=torch.float64)
            gen_state = ckpt.record.get("data_order", {}).get("generator")
            set_rng_state(ckpt.record.get("rng", {}))

        layers = _stat_sources(model)
        if config.compile:
            # Compile the cells (the part evaluated at every solver iteration); in place, so state-dict keys
            # and checkpoints are unchanged. Models without an equilibrium layer are compiled whole.
            cells = [layer.cell for layer in deq_layers(model) if isinstance(getattr(layer, "cell", None), nn.Module)]
            for target in cells or [model]:
                target.compile(backend=config.compile_backend)

        net: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        n_train = len(x_train)
        is_main = rank == 0
        disable = (None if progress is None else not progress) if is_main else True  # tqdm: None = auto (tty)

        def checkpoint(epoch: int, step_in_epoch: int, gen: torch.Generator | None) -> None:
            if not is_main:
                return
            record = {
                "config": asdict(config),
                "progress": {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                             "samples_seen": samples_seen},
                "rows": rows,
                "accum": acc.tolist(),
                "data_order": {
                    "scheme": "randperm(n, Generator(seed * 1000003 + epoch)), global batches",
                    "generator": _gen_state_b64(gen) if gen is not None else None,
                },
                "rng": rng_state(),
                "world_size": world,
            }
            save_checkpoint(out, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                            record=record, step=global_step)

        crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)

        for epoch in range(start_epoch, config.epochs):
            if epoch == start_epoch and gen_state is not None and start_step > 0:
                gen = _gen_from_b64(gen_state)
            else:
                gen = _epoch_generator(config.seed, epoch)
                if epoch != start_epoch or start_step == 0:
                    acc.zero_()
            gen_at_start = _gen_from_b64(_gen_state_b64(gen))  # the state that reproduces this epoch's order
            batches = _global_batches(n_train, config.batch_size, world, gen)
            first = start_step if epoch == start_epoch else 0
            net.train()
            bar = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=disable, leave=False, dynamic_ncols=True)
            for s in range(first, len(batches)):
                idx = batches[s]
                local = torch.tensor_split(idx, world)[rank]
                xb, yb = x_train[local].to(device), y_train[local].to(device)
                optimizer.zero_grad(set_to_none=True)
                logits = net(xb)
                losses = F.cross_entropy(logits, yb, reduction="none")
                fwd = [_stats_of(_get_stats(layer, "forward")) for layer in layers]
                before = [_get_stats(layer, "backward") for layer in layers]
                (losses.sum() * (world / len(idx))).backward()
                optimizer.step()
                bwd = []
                for layer, old in zip(layers, before):
                    new = _get_stats(layer, "backward")
                    bwd.append(_stats_of(new) if new is not None and new is not old else None)
                step = torch.zeros(len(_ACC), dtype=torch.float64)
                step[0] = float(losses.detach().double().sum())
                step[1] = float((logits.detach().argmax(1) == yb).sum())
                step[2] = float(len(local))
                for st in fwd:
                    if st is not None:
                        step[3] += st[0]; step[4] += st[1]; step[5] += st[2]; step[6] += st[3]  # noqa: E702
                for st in bwd:
                    if st is not None:
                        step[7] += st[0]; step[8] += st[1]; step[9] += st[3]  # noqa: E702
                if world > 1:
                    step_dev = step.to(device)
                    dist.all_reduce(step_dev)
                    step = step_dev.cpu()
                acc += step
                global_step += 1
                samples_seen += int(step[2])  # summed over ranks: each sample of a global batch counted once
                bar.update(1)
                bar.set_postfix(loss=f"{acc[0] / max(acc[2], 1):.3f}", fwd_it=f"{_mean(acc[3], acc[6]):.1f}")
                if config.checkpoint_every and global_step % config.checkpoint_every == 0 and s + 1 < len(batches):
                    checkpoint(epoch, s + 1, gen_at_start)
                if crash_after and global_step >= crash_after:
                    os._exit(86)
            bar.close()

            test = _evaluate(model, layers, x_test, y_test, device, rank, world, config.eval_batch_size)
            a = acc.tolist()
            rows.append({
                "epoch": epoch + 1,
                "global_step": global_step,
                "train_loss": _mean(a[0], a[2]),
                "train_acc": _mean(a[1], a[2]),
                "test_loss": test["loss"],
                "test_acc": test["acc"],
                "fwd_iters": _mean(a[3], a[6]),
                "fwd_residual": _mean(a[4], a[6]),
                "fwd_converged": _mean(a[5], a[6]),
                "bwd_iters": _mean(a[7], a[9]),
                "bwd_residual": _mean(a[8], a[9]),
                "test_fwd_iters": test["fwd_iters"],
            })
            if is_main:
                _write_csv(out / "metrics.csv", rows)
            if is_main and progress is not False:
                r = rows[-1]
                tqdm.write(
                    f"epoch {epoch + 1}/{config.epochs}: train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f} | "
                    f"test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f} | fwd iters {r['fwd_iters']:.1f} "
                    f"res {r['fwd_residual']:.2e} | bwd iters {r['bwd_iters']:.1f}"
                )
            acc.zero_()
            checkpoint(epoch + 1, 0, None)
        if world > 1:
            dist.barrier()
        return TrainResult(model=model, rows=rows, out=out, config=config)
    finally:
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


@torch.no_grad()
def _evaluate(model, layers, x, y, device, rank: int, world: int, batch_size: int) -> dict[str, float]:
    """Test loss/accuracy and mean forward iterations; each rank takes a contiguous shard, sums are reduced."""
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    shard = torch.tensor_split(torch.arange(len(x)), world)[rank]
    sums = torch.zeros(5, dtype=torch.float64)  # loss, correct, n, fwd_iters, fwd_n
    for chunk in torch.split(shard, batch_size):
        xb, yb = x[chunk].to(device), y[chunk].to(device)
        logits = model(xb)
        sums[0] += float(F.cross_entropy(logits, yb, reduction="sum").double())
        sums[1] += float((logits.argmax(1) == yb).sum())
        sums[2] += len(chunk)
        for layer in layers:
            st = _stats_of(_get_stats(layer, "forward"))
            if st is not None:
                sums[3] += st[0]
                sums[4] += st[3]
    if world > 1:
        s = sums.to(device)
        dist.all_reduce(s)
        sums = s.cpu()
    model.train(was_training)
    a = sums.tolist()
    return {"loss": _mean(a[0], a[2]), "acc": _mean(a[1], a[2]), "fwd_iters": _mean(a[3], a[4])}
