"""The ``iterlayers`` command: ``train``, ``analyze``, ``reproduce``, ``bench``.

Every wrong option name or value ends the command with exit status 2 and ONE line on stderr that names the
valid choices, e.g. ``iterlayers: error: unknown model 'foo'; valid: deq_conv, deq_mlp, mlp``. The same holds
for every error of the library's family (:class:`~iterlayers.errors.IterlayersError`: a bad option, a corrupted
checkpoint, a failed solve with ``on_failure="raise"``) and every ``OSError`` (a directory that cannot be
written, a full disk). Anything else is a bug and shows its traceback. Set ``ITERLAYERS_DEBUG=1`` to see the
full traceback of a user error too.

Every command that writes (``train``, ``reproduce``, ``analyze --plot``, ``bench``) creates its output
directory and writes (and deletes) a probe file there before any work, so an unwritable ``--out`` fails in
the first second, not after the training.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from iterlayers.errors import IterlayersError
from iterlayers.experiments import ORDER as EXPERIMENT_ORDER
from iterlayers.training import RUN_FILES, TrainConfig, holds_run

REPRODUCE_CHOICES = (*EXPERIMENT_ORDER, "all")
DEBUG_ENV = "ITERLAYERS_DEBUG"
#: the defaults of ``train``: one source, the fields of :class:`~iterlayers.training.TrainConfig`
TRAIN_DEFAULTS = TrainConfig()


class CLIError(IterlayersError):
    """A user error found by the CLI itself: printed as one line, exit status 2."""


class _App(typer.Typer):
    """A Typer app whose errors are one line (see :func:`main`)."""

    def __call__(self, *args, **kwargs):  # the console-script entry point calls app()
        sys.exit(main(*args, **kwargs))


app = _App(
    name="iterlayers",
    help="Deep networks whose layers are iterative algorithms: train, analyse and reproduce.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def main(argv: list[str] | None = None, prog_name: str = "iterlayers") -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    from typer._click import exceptions as click_exc

    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click_exc.ClickException as err:  # parse errors: bad int, unknown option, missing argument
        return _fail(err.format_message(), err.exit_code if err.exit_code else 2)
    except (typer.Abort, KeyboardInterrupt):
        print(f"{prog_name}: aborted", file=sys.stderr)
        return 130
    except (IterlayersError, OSError) as err:  # the family and the system; a bug keeps its traceback
        if os.environ.get(DEBUG_ENV):
            raise
        return _fail(str(err), 2)
    return rv if isinstance(rv, int) else 0


def _fail(message: str, code: int) -> int:
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"iterlayers: error: {line}", file=sys.stderr)
    return code


def _choice(option: str, value: str, choices) -> str:
    if value not in choices:
        raise CLIError(f"{option} {value!r} is not valid; choose one of: {', '.join(choices)}")
    return value


def _writable_dir(path: Path, option: str) -> list[Path]:
    """Create ``path`` (with its parents) and write and delete a probe file in it; returns the directories
    created, innermost first.

    Any failure is one CLIError naming the option, so an unwritable output fails before any work is done.
    """
    created = [p for p in (path, *path.parents) if not p.exists()]
    probe = path / f".iterlayers-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise CLIError(f"{option} {str(path)!r} is not a writable directory: {err.strerror or err}") from None
    return created


def _parse_options(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs; VALUE is read as JSON when it parses (numbers, true/false, lists), else a string."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CLIError(f"--option {pair!r} is not KEY=VALUE (e.g. --option width=32)")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


# --------------------------------------------------------------------------------------------- train
_D = TRAIN_DEFAULTS
#: CLI parameters that are TrainConfig fields (``option`` is ``model_options``, parsed from KEY=VALUE pairs)
_CONFIG_PARAMS = ("model", "data", "epochs", "batch_size", "lr", "optimizer", "seed", "device", "compile",
                  "checkpoint_every", "option", "n_train", "n_test", "weight_decay", "compile_backend",
                  "jacobian_weight", "jacobian_every", "jacobian_samples", "spectral_every")


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Model name (deq_mlp, deq_conv, mlp, ...).")] = _D.model,
    data: Annotated[str, typer.Option(
        help="digits, mnist1d, stdlib_chars, graph:NAME (an offline graph), or a path to a .npz/.pt file.")] = _D.data,
    epochs: Annotated[int, typer.Option(help="Number of epochs.")] = _D.epochs,
    batch_size: Annotated[int, typer.Option(help="Global batch size, split over processes.")] = _D.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = _D.lr,
    optimizer: Annotated[str, typer.Option(help="adam or sgd (momentum 0.9).")] = _D.optimizer,
    seed: Annotated[int, typer.Option(help="Seed of data split, init and data order.")] = _D.seed,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = _D.device,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the DEQ cells.")] = _D.compile,
    out: Annotated[Path, typer.Option(help="Output directory: metrics.csv and checkpoints.")] = Path(_D.out),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out exactly.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run saved in --out.")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: epoch ends).")] = _D.checkpoint_every,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Model option KEY=VALUE (repeatable).")] = None,
    n_train: Annotated[Optional[int], typer.Option(help="Use only the first N training samples.")] = _D.n_train,
    n_test: Annotated[Optional[int], typer.Option(help="Use only the first N test samples.")] = _D.n_test,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = _D.weight_decay,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or per-epoch lines.")] = False,
    jacobian_weight: Annotated[float, typer.Option(
        help="Add W * (Hutchinson ||J||_F^2/d at z*) of every DEQ to the loss (0: off).")] = _D.jacobian_weight,
    jacobian_every: Annotated[int, typer.Option(help="Compute the Jacobian penalty every N steps.")] = _D.jacobian_every,
    jacobian_samples: Annotated[int, typer.Option(help="Probes of the Hutchinson estimate.")] = _D.jacobian_samples,
    spectral_every: Annotated[int, typer.Option(
        help="Measure the spectral radius at z* every N steps (0: never).")] = _D.spectral_every,
    compile_backend: Annotated[str, typer.Option(hidden=True)] = _D.compile_backend,
) -> None:
    """Train a model; per-epoch metrics (with DEQ solver statistics) go to OUT/metrics.csv.

    Under `torchrun --nproc_per_node=N -m iterlayers train ...` the run uses DistributedDataParallel and gives
    the same result as one process with the same (global) --batch-size.
    """
    from typer._click.core import ParameterSource

    from iterlayers.checkpoint import load_checkpoint
    from iterlayers.data import DATASETS
    from iterlayers.models import MODELS
    from iterlayers.training import OPTIMIZERS
    from iterlayers.training import train as run_training

    params = ctx.params
    # what the user typed (a default is not a choice, so resuming never "changes" an option left out)
    given = [name for name in _CONFIG_PARAMS
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)]
    _choice("--model", model, sorted(MODELS))
    _choice("--optimizer", optimizer, OPTIMIZERS)
    if data not in DATASETS:
        if not data.endswith((".npz", ".pt")):
            raise CLIError(f"--data {data!r} is not valid; choose one of: {', '.join(sorted(DATASETS))} or a .npz/.pt file")
        if not Path(data).exists():
            raise CLIError(f"--data file {data!r} does not exist")
    def field(name: str) -> str:
        return "model_options" if name == "option" else name

    values = {field(name): params[name] for name in _CONFIG_PARAMS}
    values["model_options"] = _parse_options(option)
    if resume and overwrite:
        raise CLIError("--resume and --overwrite exclude each other: continue the saved run or replace it")
    if resume:
        if not (out / "checkpoint.json").exists():
            raise CLIError(f"--resume: no checkpoint in {str(out)!r} (expected {out / 'checkpoint.json'})")
        changes = {field(name): values[field(name)] for name in given}
        # the rule of what may change is TrainConfig's (RESUMABLE); its error names what may not
        cfg = TrainConfig.from_checkpoint(load_checkpoint(out)).resumed({**changes, "out": str(out)})
    else:
        cfg = TrainConfig(**values, out=str(out))
    cfg.validate()
    if not resume and not overwrite and holds_run(out):
        raise CLIError(f"--out {str(out)!r} already holds a training run; pass --resume to continue it or "
                       f"--overwrite to replace it")
    created = _writable_dir(out, "--out")
    if overwrite:
        for path in [*(out / name for name in RUN_FILES), *out.glob("checkpoint-*.safetensors")]:
            path.unlink(missing_ok=True)
    try:
        result = run_training(cfg, resume=resume, progress=None if not quiet else False)
    except BaseException:
        # a run that failed before writing anything leaves no directory behind
        for path in created:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
    if int(os.environ.get("RANK", "0")) == 0 and not quiet and result.rows:
        last = result.rows[-1]
        typer.echo(f"done: test accuracy {last['test_acc']:.4f}, metrics in {out / 'metrics.csv'}, checkpoint in {out}")


# -------------------------------------------------------------------------------------------- analyze
@app.command()
def analyze(
    checkpoint: Annotated[Path, typer.Argument(help="A training output directory (or its checkpoint.json).")],
    batch_size: Annotated[int, typer.Option(help="How many test samples to analyse.")] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    plot: Annotated[Optional[Path], typer.Option(help="Also save the report's figure (PNG) here.")] = None,
    audit: Annotated[bool, typer.Option("--audit", help="Also audit the gradient modes against finite "
                                                         "differences (iterlayers.audit_gradients).")] = False,
    audit_batch: Annotated[int, typer.Option(help="How many of the samples the audit uses (it solves in "
                                                  "float64, 4 x directions times).")] = 8,
    directions: Annotated[int, typer.Option(help="Random parameter directions of the audit's reference.")] = 6,
    out: Annotated[Optional[Path], typer.Option(help="Where --audit writes audit.json (default: the run "
                                                     "directory).")] = None,
) -> None:
    """Print the analysis report (spectra, contraction, rates, sensitivity) of a checkpoint's DEQ layer;
    with --audit, also the gradient audit table, written to audit.json."""
    import dataclasses

    import torch

    from iterlayers.analysis import audit_gradients, report
    from iterlayers.checkpoint import load_checkpoint
    from iterlayers.data import load_dataset
    from iterlayers.models import build_model
    from iterlayers.training import deq_layers, resolve_device

    for option, value in (("--batch-size", batch_size), ("--audit-batch", audit_batch), ("--directions", directions)):
        if value < 1:
            raise CLIError(f"{option} must be a positive integer, got {value}")
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_checkpoint(ckpt)
    if plot is not None:
        _writable_dir(plot.parent, "--plot")
    audit_dir = Path(ckpt.directory) if out is None else out
    if audit:
        _writable_dir(audit_dir, "--out")
    data = load_dataset(cfg.data, seed=cfg.seed)
    x = data.x_test[:batch_size].reshape(min(batch_size, len(data.x_test)), -1).to(dev)
    model = build_model(cfg.model, x.shape[1], data.num_classes, **cfg.model_options)
    ckpt.load_into(model)
    model.to(dev).eval()
    layers = deq_layers(model)
    if not layers:
        raise CLIError(f"model {cfg.model!r} has no DEQ layer to analyse")
    captured: dict = {}
    handle = layers[0].register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    typer.echo(f"checkpoint {ckpt.directory} (model {cfg.model}, data {cfg.data}, step {ckpt.progress.get('global_step')})")
    typer.echo(f"forward solve on {len(x)} test samples: {layers[0].stats['forward']}")
    result = report(layers[0], captured["x"])
    typer.echo(result if isinstance(result, str) else _format_report(result))
    if plot is not None and hasattr(result, "plot"):
        typer.echo(f"figure: {result.plot(plot)}")
    if audit:
        # The audit's loss is its default, 0.5 ||z*||^2 of the DEQ layer's output: it compares the gradient
        # modes of the layer's own parameters on the layer's real inputs (what the encoder feeds it).
        u = captured["x"][:audit_batch]
        result = audit_gradients(layers[0], u, n_directions=directions)
        typer.echo(f"gradient audit on {len(u)} test samples (loss 0.5 ||z*||^2 of the DEQ layer's output):")
        typer.echo(str(result))
        path = audit_dir / "audit.json"
        record = {"checkpoint": str(ckpt.directory), "model": cfg.model, "data": cfg.data,
                  "step": ckpt.progress.get("global_step"), "samples": len(u), "loss": "0.5 ||z*||^2",
                  **dataclasses.asdict(result)}
        path.write_text(json.dumps(_finite_or_none(record), indent=2, allow_nan=False) + "\n")
        typer.echo(f"audit: {path}")


def _finite_or_none(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or Inf)."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _format_report(result) -> str:
    if isinstance(result, dict):
        width = max((len(str(k)) for k in result), default=0)
        return "\n".join(f"{str(k):<{width}}  {v}" for k, v in result.items())
    return str(result)


# ------------------------------------------------------------------------------------------ reproduce
@app.command()
def reproduce(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(REPRODUCE_CHOICES)}.")],
    quick: Annotated[bool, typer.Option("--quick/--full", help="Quick settings (make run) or paper scale.")] = True,
    tiny: Annotated[bool, typer.Option("--tiny", help="Test-suite settings (seconds).")] = False,
    out: Annotated[Path, typer.Option(help="Output directory; writes OUT/<experiment>/ and OUT/REPORT.md.")] = Path("results"),
    seed: Annotated[int, typer.Option(help="Seed of every experiment.")] = 0,
) -> int:
    """Run experiments and assemble OUT/REPORT.md (figures, tables, paper's claims vs ours, benchmarks)."""
    from iterlayers.experiments import run_experiment
    from iterlayers.report import write_report

    _choice("experiment", name, REPRODUCE_CHOICES)
    _writable_dir(out, "--out")
    names = list(EXPERIMENT_ORDER) if name == "all" else [name]
    outcomes = []
    for n in names:
        typer.echo(f"== {n} ({'tiny' if tiny else 'quick' if quick else 'full'}) ==")
        outcome = run_experiment(n, out=out / n, quick=quick, tiny=tiny, seed=seed)
        outcomes.append(outcome)
        tail = f": {outcome.error}" if outcome.error else ""
        typer.echo(f"== {n}: {outcome.status} in {outcome.seconds:.1f} s{tail}")
    path = write_report(out)
    typer.echo(f"report: {path}")
    failed = [o.name for o in outcomes if o.status != "ok"]
    if failed:
        print(f"iterlayers: {len(failed)} experiment(s) did not complete: {', '.join(failed)} (see {path})", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- bench
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Smaller sizes, fewer repeats.")] = False,
    out: Annotated[Path, typer.Option(help="Output directory of the benchmark table.")] = Path("results/bench"),
) -> int:
    """Benchmark iterlayers against torchdeq (benchmarks/bench_torchdeq.py)."""
    import importlib.util

    if importlib.util.find_spec("torchdeq") is None:
        raise CLIError("torchdeq is not installed; install the benchmark extra: pip install -e .[bench]")
    script = _repo_root() / "benchmarks" / "bench_torchdeq.py"
    if not script.exists():
        raise CLIError(f"benchmark script not found at {script} (run from a source checkout)")
    _writable_dir(out, "--out")
    cmd = [sys.executable, str(script), "--out", str(out.resolve())] + (["--quick"] if quick else [])
    return subprocess.call(cmd, cwd=_repo_root())


@app.callback()
def _root() -> None:
    """Deep networks whose layers are iterative algorithms: train, analyse and reproduce."""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
