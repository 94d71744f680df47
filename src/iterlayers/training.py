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
import numbers
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from iterlayers import _validate
from iterlayers.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from iterlayers.data import load_dataset
from iterlayers.errors import CheckpointError, IterlayersError, OptionTypeError, ValidationError
from iterlayers.layers import DEQ, JacobianPenalty, SpectralMonitor
from iterlayers.models import MODELS, build_model
from iterlayers.solvers import SolverStats

__all__ = ["TrainConfig", "TrainResult", "train", "deq_layers", "solver_stats", "stat_sources", "resolve_device",
           "METRIC_COLUMNS", "read_metrics", "RUN_FILES", "holds_run"]

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
    "jac_penalty",
    "spectral_radius",
)

# Running sums of one epoch, in this order (float64, all-reduced across ranks at every step).
_ACC = ("loss", "correct", "n", "fwd_iters", "fwd_res", "fwd_conv", "fwd_n", "bwd_iters", "bwd_res", "bwd_n",
        "jac", "jac_n", "rho", "rho_n")


def _count(value, name: str, *, minimum: int = 1, what: str = "a positive integer") -> int:
    """An integer >= ``minimum`` (a bool or float is a type error); the value message keeps the CLI's words."""
    value = _validate.integer(value, name)
    if value < minimum:
        raise ValidationError(f"{name} must be {what}, got {value!r}")
    return value


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    ``batch_size`` is the *global* batch: with N processes each one takes ``batch_size / N`` samples per step.
    The field defaults are the CLI's defaults (``iterlayers train`` reads them from here), and
    :attr:`RESUMABLE` names the fields a resumed run may change.
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
    #: Jacobian regularisation of every DEQ in the model: the loss adds ``jacobian_weight * layer.penalty``
    #: (the Hutchinson estimate of ||J||_F^2 / d at z*, ``jacobian_samples`` probes) every ``jacobian_every``
    #: steps; 0 turns it off. ``spectral_every``: the spectral radius rho(J*) is measured every that many steps
    #: (0: never). Both are logged per epoch (``jac_penalty``, ``spectral_radius``; NaN when not measured).
    jacobian_weight: float = 0.0
    jacobian_every: int = 1
    jacobian_samples: int = 1
    spectral_every: int = 0

    #: What may differ when a run is resumed: how, where and how long it runs -- never what it computes
    #: (model, data, optimizer, seed, batch size ... come from the checkpoint).
    RESUMABLE: ClassVar[tuple[str, ...]] = ("epochs", "device", "compile", "compile_backend", "checkpoint_every",
                                            "out")

    def validate(self) -> "TrainConfig":
        if not isinstance(self.model, str) or self.model not in MODELS:
            raise ValidationError(f"unknown model {self.model!r}; valid: {', '.join(sorted(MODELS))}")
        if not isinstance(self.data, str) or not self.data:
            raise OptionTypeError(f"data must be a dataset name or a file path, got {self.data!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            _count(getattr(self, name), name)
        for name in ("n_train", "n_test"):
            if getattr(self, name) is not None:
                _count(getattr(self, name), name, what="a positive integer or None")
        _count(self.checkpoint_every, "checkpoint_every", minimum=0,
               what="an integer >= 0 (0: only at epoch ends)")
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real):
            raise OptionTypeError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValidationError(f"lr must be a positive finite number, got {self.lr!r}")
        _validate.choice(self.optimizer, "optimizer", OPTIMIZERS)
        _validate.in_range(self.weight_decay, "weight_decay", low=0.0)
        _validate.in_range(self.jacobian_weight, "jacobian_weight", low=0.0)
        _count(self.jacobian_every, "jacobian_every")
        _count(self.jacobian_samples, "jacobian_samples")
        _count(self.spectral_every, "spectral_every", minimum=0, what="an integer >= 0 (0: never)")
        _count(self.seed, "seed", minimum=0, what="a non-negative integer")
        _validate.boolean(self.compile, "compile")
        if not isinstance(self.compile_backend, str):
            raise OptionTypeError(f"compile_backend must be a string, got {type(self.compile_backend).__name__}")
        if not isinstance(self.out, str):
            raise OptionTypeError(f"out must be a string path, got {type(self.out).__name__}")
        if not isinstance(self.model_options, dict):
            raise OptionTypeError(f"model_options must be a dict, got {type(self.model_options).__name__}")
        resolve_device(self.device, check_only=True)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise OptionTypeError(f"a TrainConfig is read from a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise OptionTypeError(f"unknown TrainConfig fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_checkpoint(cls, ckpt) -> "TrainConfig":
        """The config saved in a :class:`~iterlayers.checkpoint.Checkpoint`; a bad one names the file."""
        try:
            return cls.from_dict(ckpt.config).validate()
        except IterlayersError as err:
            raise CheckpointError(f"{ckpt.json_path}: the saved training config is not valid: {err}") from None

    def resumed(self, changes: dict[str, Any]) -> "TrainConfig":
        """This (saved) config with ``changes`` applied; changing a field outside :attr:`RESUMABLE` raises."""
        fixed = [name for name in changes if name not in self.RESUMABLE]
        if fixed:
            raise ValidationError(f"--resume continues the saved run; these options cannot change: {', '.join(fixed)}")
        return replace(self, **changes)


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
        raise OptionTypeError(f"device must be a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValidationError(f"device={device!r} is not valid; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValidationError(f"device={device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValidationError(f"device={device!r} requested but no CUDA device is available; use --device cpu")
        if dev.index is None and not check_only:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def deq_layers(model: nn.Module) -> list[nn.Module]:
    """Every :class:`iterlayers.DEQ` inside ``model``."""
    return [m for m in model.modules() if isinstance(m, DEQ)]


def solver_stats(module: nn.Module) -> dict | None:
    """The ``{"forward": SolverStats | None, "backward": SolverStats | None}`` a module reports, or None.

    The one protocol: every iterative module (:class:`iterlayers.DEQ`, :class:`iterlayers.Unrolled`,
    ``operators.PicardIteration``, ``implicit_linear.ImplicitLinearModel``) exposes ``stats`` as that dict.
    """
    stats = getattr(module, "stats", None)
    return stats if isinstance(stats, dict) else None


def _reports_stats(module: nn.Module) -> bool:
    return solver_stats(module) is not None


def stat_sources(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that report solver statistics (:func:`solver_stats`), innermost only.

    A module that re-exports the statistics of an iterative submodule is skipped, so no solve counts twice.
    """
    sources = [m for m in model.modules() if _reports_stats(m)]
    return [m for m in sources if not any(s is not m and s in sources for s in m.modules())]


def sample_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample loss and accuracy ``([B], [B])`` the training loop sums: the one loss of the loop.

    Logits ``[B, C]`` with labels ``[B]``: cross-entropy and 0/1 correctness. Sequence logits ``[B, T, C]`` with
    targets ``[B, T]``: the mean over the T positions of the per-token cross-entropy and of the token
    accuracy, so the epoch's mean loss is the mean token cross-entropy (nats) and ``exp`` of it the perplexity
    (every sample has the same T).
    """
    if logits.dim() == 3 and y.dim() == 2:
        tokens = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [B, T]
        return tokens.mean(1), (logits.detach().argmax(-1) == y).double().mean(1)
    return F.cross_entropy(logits, y, reduction="none"), (logits.detach().argmax(1) == y).double()


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


def _stats_sums(stats) -> tuple[float, float, float, float] | None:
    """(sum nstep, sum abs residual, sum converged, count) of a SolverStats, or None when there is none."""
    if not isinstance(stats, SolverStats):
        return None
    nstep = stats.nstep.double().reshape(-1)
    return (float(nstep.sum()), float(stats.abs_residual.double().sum()), float(stats.converged.double().sum()),
            float(nstep.numel()))


def _stats(module: nn.Module, key: str):
    stats = solver_stats(module)
    return None if stats is None else stats.get(key)


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


#: The files a run writes into its output directory (``checkpoint-*.safetensors`` besides these).
RUN_FILES = ("checkpoint.json", "metrics.csv")


def holds_run(out: str | Path) -> bool:
    """Whether ``out`` already holds (part of) a training run."""
    out = Path(out)
    return any((out / name).exists() for name in RUN_FILES) or any(out.glob("checkpoint-*.safetensors"))


def _mean(total: float, n: float) -> float:
    return total / n if n > 0 else float("nan")


# ------------------------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """What one process holds during a run: built by :func:`_build`, advanced by :func:`_train_epoch`."""

    config: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    sources: list[nn.Module]  # modules reporting solver statistics
    rows: list[dict[str, Any]] = field(default_factory=list)
    acc: torch.Tensor = field(default_factory=lambda: torch.zeros(len(_ACC), dtype=torch.float64))
    start_epoch: int = 0
    start_step: int = 0
    global_step: int = 0
    samples_seen: int = 0
    gen_state: str | None = None  # data-order generator of a checkpoint taken mid-epoch

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train(config: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.data``; see the module docstring for the exact semantics.

    With ``resume=True`` the run saved in ``config.out`` continues: its definition comes from the checkpoint
    and only the fields in :attr:`TrainConfig.RESUMABLE` are taken from ``config``.
    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised here (and destroyed at the end if
    this call created it). Returns the trained (unwrapped) model and the per-epoch metrics rows.
    """
    import torch.distributed as dist

    ckpt = load_checkpoint(config.out) if resume else None
    if ckpt is not None:
        config = TrainConfig.from_checkpoint(ckpt).resumed(
            {name: getattr(config, name) for name in TrainConfig.RESUMABLE})
    config.validate()
    rank, world, local_rank = _dist_env()
    created_pg = _init_process_group(config, world, local_rank)
    try:
        run = _build(config, rank, world, local_rank)
        if ckpt is not None:
            _restore(run, ckpt)
        _compile(run)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            run.net = DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
        for epoch in range(run.start_epoch, config.epochs):
            _train_epoch(run, epoch, progress)
            test = _evaluate(run.model, run.sources, run.x_test, run.y_test, run.device, rank, world,
                             config.eval_batch_size)
            run.rows.append(_epoch_row(epoch, run.global_step, run.acc.tolist(), test))
            _log(run, progress)
            run.acc.zero_()
            _save(run, epoch + 1, 0, None)
        if world > 1:
            dist.barrier()
        return TrainResult(model=run.model, rows=run.rows, out=run.out, config=config)
    finally:
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


def _init_process_group(config: TrainConfig, world: int, local_rank: int) -> bool:
    """Join the process group under torchrun; True when this call created it."""
    import torch.distributed as dist

    if world == 1 or dist.is_initialized():
        return False
    backend = "nccl" if resolve_device(config.device, check_only=True).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    return True


def _build(config: TrainConfig, rank: int, world: int, local_rank: int) -> _Run:
    """Data, model (seeded init) and optimizer of a fresh run."""
    if world > 1 and config.batch_size < world:
        raise ValidationError(f"batch_size={config.batch_size} is smaller than the number of processes ({world})")
    device = resolve_device(config.device, local_rank=local_rank)
    data = load_dataset(config.data, seed=config.seed)
    if config.n_train is not None or config.n_test is not None:
        data = data.subset(config.n_train, config.n_test)
    if data.num_classes is None:
        raise ValidationError(f"dataset {config.data!r} has real-valued targets; train fits classifiers (integer labels)")
    torch.manual_seed(config.seed)
    x_train = data.x_train.reshape(len(data.x_train), -1)
    model = build_model(config.model, x_train.shape[1], data.num_classes, **config.model_options).to(device)
    _configure_aids(config, model)
    return _Run(config=config, out=Path(config.out), rank=rank, world=world, device=device, model=model, net=model,
                optimizer=_make_optimizer(config, model), x_train=x_train, y_train=data.y_train,
                x_test=data.x_test.reshape(len(data.x_test), -1), y_test=data.y_test, sources=stat_sources(model))


def _configure_aids(config: TrainConfig, model: nn.Module) -> None:
    """The Jacobian penalty and spectral-radius monitor of every DEQ in ``model``, from the config."""
    if config.jacobian_weight == 0 and config.spectral_every == 0:
        return
    layers = deq_layers(model)
    if not layers:
        raise ValidationError(f"jacobian_weight / spectral_every: model {config.model!r} has no DEQ layer")
    for layer in layers:
        if config.jacobian_weight > 0:
            layer.jacobian_penalty = JacobianPenalty(every=config.jacobian_every, samples=config.jacobian_samples)
        if config.spectral_every > 0:
            layer.spectral_monitor = SpectralMonitor(every=config.spectral_every)


def _restore(run: _Run, ckpt) -> None:
    """Weights, optimizer, position, metrics so far, running sums and RNG state of a checkpoint."""
    ckpt.load_into(run.model)
    try:
        if ckpt.optimizer_state is not None:
            run.optimizer.load_state_dict(ckpt.optimizer_state)
        prog = ckpt.progress
        run.start_epoch, run.start_step = int(prog["epoch"]), int(prog["step_in_epoch"])
        run.global_step, run.samples_seen = int(prog["global_step"]), int(prog.get("samples_seen", 0))
        run.rows = list(ckpt.record.get("rows", []))
        run.acc = torch.tensor(ckpt.record["accum"], dtype=torch.float64)
        if run.acc.shape == (10,):  # saved before the jac/rho sums existed: they start at zero
            run.acc = torch.cat([run.acc, torch.zeros(len(_ACC) - 10, dtype=torch.float64)])
        if run.acc.shape != (len(_ACC),):
            raise CheckpointError(f"checkpoint accum has shape {tuple(run.acc.shape)}, expected ({len(_ACC)},)")
        run.gen_state = ckpt.record.get("data_order", {}).get("generator")
        for layer in deq_layers(run.model):  # the penalty's / monitor's every-k schedule continues
            layer.train_forwards = run.global_step
        set_rng_state(ckpt.record.get("rng", {}))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{ckpt.json_path}: cannot resume from it ({type(err).__name__}: {err})") from None


def _compile(run: _Run) -> None:
    """``torch.compile`` the cells, the part evaluated at every solver iteration (``--compile``).

    Each DEQ's cell module is compiled in place (:meth:`nn.Module.compile`), so state-dict keys and checkpoints
    are unchanged and the DEQ (its solver loop, per-sample stopping and implicit backward) stays eager around
    the compiled cell. Models without an equilibrium layer are compiled whole.

    Shapes are compiled static (``dynamic=False``): the batch of a cell call changes (a short last batch, the
    shrinking set of unconverged samples), and dynamo's automatic switch to a dynamic batch dimension produced
    a backward graph that the implicit backward's repeated ``autograd.grad(..., retain_graph=True)`` cannot
    run ("donated buffers", issue #12 item 5). A static graph per batch size does not have that problem; past
    dynamo's recompile limit a new size runs eagerly, which is slower but exact.
    """
    if not run.config.compile:
        return
    cells = [layer.cell for layer in deq_layers(run.model) if isinstance(getattr(layer, "cell", None), nn.Module)]
    for target in cells or [run.model]:
        target.compile(backend=run.config.compile_backend, dynamic=False)


def _train_epoch(run: _Run, epoch: int, progress: bool | None) -> None:
    """The optimizer steps of one epoch (from the saved step when resuming mid-epoch), checkpointing on the way."""
    from tqdm.auto import tqdm

    config = run.config
    resuming = epoch == run.start_epoch
    if resuming and run.gen_state is not None and run.start_step > 0:
        gen = _gen_from_b64(run.gen_state)
    else:
        gen = _epoch_generator(config.seed, epoch)
        if not resuming or run.start_step == 0:
            run.acc.zero_()
    gen_at_start = _gen_from_b64(_gen_state_b64(gen))  # the state that reproduces this epoch's order
    batches = _global_batches(len(run.x_train), config.batch_size, run.world, gen)
    first = run.start_step if resuming else 0
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    run.net.train()
    disable = (None if progress is None else not progress) if run.is_main else True  # tqdm: None = auto (tty)
    bar = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=disable, leave=False, dynamic_ncols=True)
    for s in range(first, len(batches)):
        run.acc += _step(run, batches[s])
        run.global_step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{run.acc[0] / max(run.acc[2], 1):.3f}", fwd_it=f"{_mean(run.acc[3], run.acc[6]):.1f}")
        if config.checkpoint_every and run.global_step % config.checkpoint_every == 0 and s + 1 < len(batches):
            _save(run, epoch, s + 1, gen_at_start)
        if crash_after and run.global_step >= crash_after:
            os._exit(86)
    bar.close()


def _step(run: _Run, idx: torch.Tensor) -> torch.Tensor:
    """One optimizer step on the global batch ``idx`` (this rank's share); returns the step's global sums."""
    import torch.distributed as dist

    local = torch.tensor_split(idx, run.world)[run.rank]
    xb, yb = run.x_train[local].to(run.device), run.y_train[local].to(run.device)
    run.optimizer.zero_grad(set_to_none=True)
    logits = run.net(xb)
    losses, correct = sample_loss(logits, yb)
    fwd = [_stats_sums(_stats(m, "forward")) for m in run.sources]
    before = [_stats(m, "backward") for m in run.sources]
    penalty, aids = _aid_sums(run.model)
    loss = losses.sum() * (run.world / len(idx))
    if run.config.jacobian_weight > 0 and isinstance(penalty, torch.Tensor):
        # Each rank's penalty is the mean over its share; DDP's gradient average makes it the global mean's.
        loss = loss + run.config.jacobian_weight * penalty
    loss.backward()
    run.optimizer.step()
    # a backward solve ran for this step only where the module's backward statistics were replaced
    bwd = []
    for m, old in zip(run.sources, before):
        new = _stats(m, "backward")
        bwd.append(_stats_sums(new) if new is not None and new is not old else None)
    step = torch.zeros(len(_ACC), dtype=torch.float64)
    step[0] = float(losses.detach().double().sum())
    step[1] = float(correct.sum())
    step[2] = float(len(local))
    for st in fwd:
        if st is not None:
            step[3] += st[0]; step[4] += st[1]; step[5] += st[2]; step[6] += st[3]  # noqa: E702
    for st in bwd:
        if st is not None:
            step[7] += st[0]; step[8] += st[1]; step[9] += st[3]  # noqa: E702
    step[10:14] = torch.tensor(aids, dtype=torch.float64)
    if run.world > 1:
        step_dev = step.to(run.device)
        dist.all_reduce(step_dev)
        step = step_dev.cpu()
    run.samples_seen += int(step[2])  # summed over ranks: each sample of a global batch counted once
    return step


def _aid_sums(model: nn.Module):
    """The Jacobian penalty to add to the loss (the sum over the model's DEQs; 0 when none was computed) and
    the step's sums (penalty, penalised steps, spectral radii, samples measured) for the metrics."""
    penalty, sums = 0.0, [0.0, 0.0, 0.0, 0.0]
    penalties = [layer.penalty for layer in deq_layers(model) if layer.penalty is not None]
    if penalties:
        penalty = sum(penalties)
        sums[0], sums[1] = float(penalty.detach()), 1.0
    for layer in deq_layers(model):
        est = layer.stats.get("spectral_radius")
        if est is not None:
            sums[2] += float(est.value.double().sum())
            sums[3] += float(est.value.numel())
    return penalty, sums


def _epoch_row(epoch: int, global_step: int, a: list[float], test: dict[str, float]) -> dict[str, Any]:
    """The metrics row of an epoch from its running sums ``a`` (see ``_ACC``) and the test evaluation."""
    return {
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
        "jac_penalty": _mean(a[10], a[11]),
        "spectral_radius": _mean(a[12], a[13]),
    }


def _log(run: _Run, progress: bool | None) -> None:
    """Rank 0 rewrites ``metrics.csv`` and prints the epoch's line."""
    if not run.is_main:
        return
    _write_csv(run.out / "metrics.csv", run.rows)
    if progress is not False:
        from tqdm.auto import tqdm

        r = run.rows[-1]
        tqdm.write(
            f"epoch {r['epoch']}/{run.config.epochs}: train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f} | "
            f"test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f} | fwd iters {r['fwd_iters']:.1f} "
            f"res {r['fwd_residual']:.2e} | bwd iters {r['bwd_iters']:.1f}"
        )


def _save(run: _Run, epoch: int, step_in_epoch: int, gen: torch.Generator | None) -> None:
    """Rank 0 checkpoints the run at (epoch, step within it); ``gen`` reproduces a mid-epoch data order."""
    if not run.is_main:
        return
    record = {
        "config": asdict(run.config),
        "progress": {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": run.global_step,
                     "samples_seen": run.samples_seen},
        "rows": run.rows,
        "accum": run.acc.tolist(),
        "data_order": {
            "scheme": "randperm(n, Generator(seed * 1000003 + epoch)), global batches",
            "generator": _gen_state_b64(gen) if gen is not None else None,
        },
        "rng": rng_state(),
        "world_size": run.world,
    }
    save_checkpoint(run.out, model_state=run.model.state_dict(), optimizer_state=run.optimizer.state_dict(),
                    record=record, step=run.global_step)


@torch.no_grad()
def _evaluate(model, sources, x, y, device, rank: int, world: int, batch_size: int) -> dict[str, float]:
    """Test loss/accuracy and mean forward iterations; each rank takes a contiguous shard, sums are reduced."""
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    shard = torch.tensor_split(torch.arange(len(x)), world)[rank]
    sums = torch.zeros(5, dtype=torch.float64)  # loss, correct, n, fwd_iters, fwd_n
    for chunk in torch.split(shard, batch_size):
        xb, yb = x[chunk].to(device), y[chunk].to(device)
        loss, correct = sample_loss(model(xb), yb)
        sums[0] += float(loss.double().sum())
        sums[1] += float(correct.sum())
        sums[2] += len(chunk)
        for m in sources:
            st = _stats_sums(_stats(m, "forward"))
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
