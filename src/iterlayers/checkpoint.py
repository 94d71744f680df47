"""Training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a directory holding

- ``checkpoint.json``: the format version, the training config, the progress (epoch, step within the epoch,
  global step), the metrics rows so far, the running per-epoch accumulators, the optimizer's non-tensor state
  (hyper-parameters of every param group, scalar per-parameter entries) and the RNG states; and the name and
  the SHA-256 of
- ``checkpoint-<step>.safetensors``: the model's weights under ``model/<name>`` and the optimizer's tensor
  state under ``optim/<param index>/<key>``.

Loading checks the hash before parsing the weights, so a truncated, corrupted or swapped tensor file is
refused; every problem (missing file, JSON cut short, unknown format, hash mismatch, weights that do not fit
the model) is one :class:`~iterlayers.errors.CheckpointError` whose message names the file and what is wrong.

Why two files and a pointer: each file is written to a temporary name in the same directory, flushed, fsync'd
and moved into place with :func:`os.replace` (atomic on POSIX). The tensor file is written first under a
step-specific name and the JSON, which names it, last; a process killed at any instant therefore leaves either
the previous complete checkpoint or the new complete one -- never a JSON that points at a half-written file.
Older tensor files are removed only after the new JSON is in place.

Loading never executes code: safetensors holds raw tensors and JSON holds plain data (no pickle).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load_bytes
from safetensors.torch import save_file as _st_save
from torch import nn

from .errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_text",
    "atomic_save_tensors",
    "optimizer_state_to_parts",
    "optimizer_state_from_parts",
    "rng_state",
    "set_rng_state",
]

FORMAT_VERSION = 2
#: formats this version reads: 1 (no weights hash; nothing to check it against) and 2 (SHA-256 of the weights)
READABLE_FORMATS = (1, 2)
JSON_NAME = "checkpoint.json"


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected (a missing ``checkpoint.json`` or the weights file it names)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model weights, the optimizer state dict and the JSON record."""

    directory: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return self.record.get("config", {})

    @property
    def progress(self) -> dict[str, Any]:
        return self.record.get("progress", {})

    @property
    def json_path(self) -> Path:
        return self.directory / JSON_NAME

    def load_into(self, model: nn.Module) -> nn.Module:
        """Load the weights into ``model`` (strictly); keys or shapes that do not match are one CheckpointError.

        The model's own load-state-dict hooks run (e.g. a model that maps the names of an older layout).
        """
        expected = model.state_dict()
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in sorted(self.model_state.items())
                  if k in expected and v.shape != expected[k].shape]
        if shapes:
            raise CheckpointError(f"{self.weights_path}: the weights do not fit {type(model).__name__}: "
                                  f"shape mismatch {_few(shapes)}")
        result = model.load_state_dict(self.model_state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            what = "; ".join(part for part in (
                f"missing {_few(sorted(result.missing_keys))}" if result.missing_keys else "",
                f"unexpected {_few(sorted(result.unexpected_keys))}" if result.unexpected_keys else "") if part)
            raise CheckpointError(f"{self.weights_path}: the weights do not fit {type(model).__name__}: {what}")
        return model

    @property
    def weights_path(self) -> Path:
        return self.directory / str(self.record.get("weights", "?"))


def _few(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


# ----------------------------------------------------------------------------------------------- atomic I/O
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform / filesystem; atomicity of replace still holds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_replace(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, and move it over ``path``.

    Readers see the old content or the new one, never a mix; a failure leaves no temporary file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old content or the new one, never a mix."""
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors through a temporary file and :func:`os.replace`; returns the file's SHA-256."""
    # safetensors refuses shared or non-contiguous storage; a private contiguous CPU copy is always valid.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    digest: list[str] = []

    def write(tmp):
        _st_save(flat, tmp, metadata=metadata)
        digest.append(sha256_file(tmp))  # of the bytes that are moved into place

    _atomic_replace(Path(path), write)
    return digest[0]


# --------------------------------------------------------------------------------------- optimizer / RNG
def optimizer_state_to_parts(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split ``optimizer.state_dict()`` into a JSON-able part and a flat dict of tensors."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        s: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = value
            else:
                s[key] = value
        scalars[str(pid)] = s
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def optimizer_state_from_parts(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_parts`."""
    state: dict[int, dict[str, Any]] = {}
    for pid, s in meta.get("scalars", {}).items():
        state[int(pid)] = dict(s)
    for name, value in tensors.items():
        if not name.startswith("optim/"):
            continue
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.to(torch.uint8).numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU and, where present, every CUDA device) as JSON-able strings."""
    out: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        states = [_unb64(s) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# ------------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    directory: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
    step: int = 0,
    keep_old: bool = False,
) -> Path:
    """Write a checkpoint into ``directory`` atomically; returns the path of ``checkpoint.json``.

    ``record`` is any JSON-serialisable dict (config, progress, metrics, RNG ...); the optimizer state is split
    into tensors (safetensors) and plain values (JSON) by :func:`optimizer_state_to_parts`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v for k, v in model_state.items()}
    record = dict(record or {})
    if optimizer_state is not None:
        meta, opt_tensors = optimizer_state_to_parts(optimizer_state)
        tensors.update(opt_tensors)
        record["optimizer"] = meta
    weights_name = f"checkpoint-{int(step):09d}.safetensors"
    digest = atomic_save_tensors(directory / weights_name, tensors, metadata={"format": str(FORMAT_VERSION)})
    record["format"] = FORMAT_VERSION
    record["weights"] = weights_name
    record["weights_sha256"] = digest
    # Serialise before touching the pointer so a non-JSON value fails loudly without damaging anything.
    text = json.dumps(record, indent=1, sort_keys=True, allow_nan=True)
    json_path = directory / JSON_NAME
    atomic_write_text(json_path, text)
    if not keep_old:
        for old in directory.glob("checkpoint-*.safetensors"):
            if old.name != weights_name:
                try:
                    old.unlink()
                except FileNotFoundError:
                    pass
    return json_path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory (or its ``checkpoint.json``) without executing any code.

    Raises :class:`CheckpointNotFoundError` (a ``FileNotFoundError``) when there is no checkpoint, and
    :class:`~iterlayers.errors.CheckpointError` (a ``ValueError``) naming the file when it is truncated,
    corrupted, of an unknown format, or its weights do not hash to the recorded SHA-256.
    """
    path = Path(path)
    json_path = path / JSON_NAME if path.is_dir() else path
    if not json_path.exists():
        raise CheckpointNotFoundError(
            f"no checkpoint at {str(path)!r} (expected {JSON_NAME} in a training output directory)")
    if json_path.suffix != ".json":
        raise CheckpointError(f"{str(path)!r} is not a checkpoint; pass the training output directory or its {JSON_NAME}")
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{json_path}: not valid JSON, the file is truncated or corrupted ({err})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{json_path}: expected a JSON object, got {type(record).__name__}")
    fmt = record.get("format")
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(f"{json_path}: unsupported checkpoint format {fmt!r}; expected one of {list(READABLE_FORMATS)}")
    name = record.get("weights")
    # a bare file name beside the JSON: never a path that reaches elsewhere
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(f"{json_path}: 'weights' must name a file beside it, got {name!r}")
    weights = json_path.parent / name
    if not weights.is_file():
        raise CheckpointNotFoundError(f"{json_path} names {name!r}, which does not exist")
    data = weights.read_bytes()
    recorded = record.get("weights_sha256")
    if fmt >= 2:
        if not isinstance(recorded, str):
            raise CheckpointError(f"{json_path}: no 'weights_sha256' recorded for {name!r}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != recorded:
            raise CheckpointError(f"{weights}: SHA-256 {actual[:12]}... differs from {recorded[:12]}... recorded in "
                                  f"{JSON_NAME}: the weights file is truncated, corrupted or not this checkpoint's")
    try:
        tensors = _st_load_bytes(data)
    except SafetensorError as err:
        raise CheckpointError(f"{weights}: not a valid safetensors file, truncated or corrupted ({err})") from None
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    optimizer_state = None
    if "optimizer" in record:
        try:
            optimizer_state = optimizer_state_from_parts(record["optimizer"], tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{json_path}: malformed optimizer state ({type(err).__name__}: {err})") from None
    return Checkpoint(json_path.parent, model_state, optimizer_state, record)
