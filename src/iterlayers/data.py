"""Offline datasets. Nothing here downloads anything.

Every loader returns a :class:`Dataset` of float32 features and int64 (classification) or float32
(regression) targets, already split into train/test with a fixed seed, so experiments are reproducible.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 samples, 64 features, 10 classes).
- ``mnist1d``: the MNIST-1D benchmark, *generated* with ``mnist1d.data.make_dataset`` (never downloaded).
- ``graph:NAME``: node classification on one of the offline graphs of
  :data:`iterlayers.operators.graph_data.GRAPHS` (``graph:csbm``, ``graph:karate``, ...), built with seed 0
  whatever the run's seed: a sample is a node, ``x = [node id, graph fingerprint]`` (int64), train / test are
  the graph's train / test masks. The graph itself (features, adjacency) is held by the model
  (:class:`~iterlayers.models.ignn.IGNN`), which checks the fingerprint, so nodes of one graph are never
  read against another.
- ``stdlib_chars``: character-level language modelling on this interpreter's standard-library sources
  (see :func:`load_stdlib_chars`); ``x`` and ``y`` are ``[N, T]`` int64 token windows, ``y`` shifted by one.
- ``npz`` / ``pt`` files of a user: arrays ``x``, ``y`` (and optionally ``x_test``, ``y_test``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pickle
import zipfile

import numpy as np
import torch

from ._validate import in_range, integer
from .errors import IterlayersError, ValidationError

__all__ = ["Dataset", "DatasetNotFoundError", "load_digits", "load_mnist1d", "load_file", "load_dataset", "DATASETS",
           "load_graph_nodes", "graph_fingerprint", "GRAPH_PREFIX", "GRAPH_NAMES", "load_stdlib_chars", "stdlib_files",
           "encode_chars", "decode_chars", "CHAR_VOCAB"]


class DatasetNotFoundError(IterlayersError, FileNotFoundError):
    """A dataset file that does not exist (the family's error, and a ``FileNotFoundError``)."""


@dataclass
class Dataset:
    """A train/test split held as tensors."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None  # None for regression

    @property
    def num_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """First ``n_train`` / ``n_test`` samples (the splits are already shuffled)."""
        for name, n in (("n_train", n_train), ("n_test", n_test)):
            if n is not None:
                integer(n, name, minimum=1)
        return Dataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.num_classes,
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"classes={self.num_classes})"
        )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    in_range(test_fraction, "test_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


def _standardize(x_train: np.ndarray, x_test: np.ndarray):
    mean = x_train.mean(0, keepdims=True)
    std = x_train.std(0, keepdims=True) + 1e-6
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits(*, seed: int = 0, test_fraction: float = 0.25, standardize: bool = True) -> Dataset:
    """scikit-learn's bundled digits (8x8 images, flattened to 64 features, 10 classes)."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = bunch.data.astype(np.float64) / 16.0
    y = bunch.target.astype(np.int64)
    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    if standardize:
        xtr, xte = _standardize(xtr, xte)
    return Dataset("digits", _f32(xtr), torch.from_numpy(ytr), _f32(xte), torch.from_numpy(yte), 10)


def load_mnist1d(*, seed: int = 0, num_samples: int = 5000, train_split: float = 0.8) -> Dataset:
    """MNIST-1D (40-sample 1-D signals, 10 classes), generated locally with ``make_dataset``."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.train_split = float(train_split)
    args.seed = int(seed)
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave the caller's alone
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    return Dataset(
        "mnist1d",
        _f32(data["x"]),
        torch.from_numpy(np.asarray(data["y"], dtype=np.int64)),
        _f32(data["x_test"]),
        torch.from_numpy(np.asarray(data["y_test"], dtype=np.int64)),
        10,
    )


def load_file(path: str | Path, *, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """A user's ``.npz`` or ``.pt`` file holding ``x``, ``y`` and optionally ``x_test``, ``y_test``.

    ``.pt`` files are read with ``weights_only=True``: loading data never executes code.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"dataset file {str(path)!r} does not exist")
    if path.suffix not in (".npz", ".pt"):
        raise ValidationError(f"{path}: unsupported extension {path.suffix!r}; use .npz or .pt")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: np.asarray(f[k]) for k in f.files}
        else:
            obj = torch.load(path, weights_only=True, map_location="cpu")
            if not isinstance(obj, dict):
                raise ValidationError(f"{path}: expected a dict of tensors with keys 'x' and 'y'")
            arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in obj.items()}
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as err:
        raise ValidationError(f"{path}: not a readable {path.suffix} file, truncated or corrupted ({err})") from None
    except (ValueError, RuntimeError) as err:
        if isinstance(err, IterlayersError):
            raise
        # numpy refusing an object array (allow_pickle=False), torch refusing a non-tensor pickle (weights_only)
        raise ValidationError(f"{path}: cannot be read without executing code or is corrupted ({err})") from None
    missing = {"x", "y"} - set(arrays)
    if missing:
        raise ValidationError(f"{path}: missing arrays {sorted(missing)}; found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 0 or y.ndim == 0:
        raise ValidationError(f"{path}: x and y must hold one row per sample, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValidationError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    if "x_test" in arrays and "y_test" in arrays:
        xtr, ytr, xte, yte = x, y, arrays["x_test"], arrays["y_test"]
    else:
        xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    classification = np.issubdtype(np.asarray(y).dtype, np.integer)
    conv = (lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))) if classification else _f32
    ncls = int(max(ytr.max(), yte.max()) + 1) if classification else None
    return Dataset(path.stem, _f32(xtr), conv(ytr), _f32(xte), conv(yte), ncls)


def _f32(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


#: The fixed character vocabulary of ``stdlib_chars``: token 0 is any other character, then newline, tab and
#: the 95 printable ASCII characters (independent of the corpus, so token ids mean the same on every machine).
CHAR_VOCAB = "\x00\n\t" + "".join(chr(c) for c in range(32, 127))


def encode_chars(text: str) -> torch.Tensor:
    """Token ids of ``text`` in :data:`CHAR_VOCAB` (int64; characters outside it map to 0)."""
    table = np.zeros(0x110000 if any(ord(c) > 255 for c in text) else 256, dtype=np.int64)
    for i, c in enumerate(CHAR_VOCAB[1:], start=1):
        table[ord(c)] = i
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return torch.from_numpy(table[np.minimum(codes, len(table) - 1)] * (codes < len(table)))


def decode_chars(tokens) -> str:
    """The text of token ids (token 0 prints as U+FFFD)."""
    return "".join("\ufffd" if int(t) == 0 else CHAR_VOCAB[int(t)] for t in tokens)


def stdlib_files() -> list[Path]:
    """The corpus of ``stdlib_chars``: the top-level ``*.py`` files of this interpreter's standard library
    (``sysconfig.get_paths()["stdlib"]``), sorted by name."""
    import sysconfig

    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def load_stdlib_chars(*, seed: int = 0, seq_len: int = 64, max_train_chars: int = 1_000_000,
                      max_test_chars: int = 100_000, test_every: int = 10) -> Dataset:
    """Character-level language modelling on the standard library's own sources (offline, deterministic).

    Files are taken in sorted order; every ``test_every``-th file (indices 0, 10, 20, ...) is held out, so
    train and test never share a file. Each split is the concatenation of its files (up to its character
    budget) cut into non-overlapping windows of ``seq_len + 1`` tokens: ``x`` is a window's first ``seq_len``
    tokens, ``y`` its last ``seq_len`` (the next character at every position), both ``[N, seq_len]`` int64;
    ``num_classes`` is ``len(CHAR_VOCAB)``. ``seed`` is not used: the split is fixed by the file list. The
    corpus is the running interpreter's standard library, so it differs between Python versions.
    """
    seq_len = integer(seq_len, "seq_len", minimum=1)
    test_every = integer(test_every, "test_every", minimum=2)
    budgets = (integer(max_train_chars, "max_train_chars", minimum=seq_len + 1),
               integer(max_test_chars, "max_test_chars", minimum=seq_len + 1))
    files = stdlib_files()
    if len(files) < test_every:
        raise DatasetNotFoundError(f"stdlib_chars: only {len(files)} source files in the standard library")
    parts: tuple[list[str], list[str]] = ([], [])
    sizes = [0, 0]
    for i, path in enumerate(files):
        split = int(i % test_every == 0)
        if sizes[split] >= budgets[split]:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts[split].append(text)
        sizes[split] += len(text)
    windows = []
    for split in (0, 1):
        tokens = encode_chars("\n".join(parts[split])[: budgets[split]])
        n = (len(tokens) - 1) // (seq_len + 1)
        w = tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)
        windows.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    (xtr, ytr), (xte, yte) = windows
    return Dataset("stdlib_chars", xtr, ytr, xte, yte, len(CHAR_VOCAB))


#: ``load_dataset("graph:NAME")`` is node classification on the offline graph NAME
GRAPH_PREFIX = "graph:"


def graph_fingerprint(graph) -> int:
    """A 48-bit SHA-256 digest of a graph's features, edges and labels (an int64 exact in float64 too)."""
    import hashlib

    h = hashlib.sha256()
    for t in (graph.x, graph.edge_index, graph.y):
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return int.from_bytes(h.digest()[:6], "big")


def load_graph_nodes(name: str, *, seed: int = 0) -> Dataset:
    """The nodes of the offline graph ``name`` as a dataset: ``x = [node id, graph_fingerprint]``, the labels,
    split by the graph's train / test masks. The graph is built with seed 0 (``seed`` is ignored): it is the
    data, and the model that holds it must see the same one."""
    from iterlayers.operators.graph_data import GRAPHS, load_graph

    if name not in GRAPHS:
        raise ValidationError(f"unknown graph {name!r}; valid: {sorted(GRAPHS)}")
    g = load_graph(name, seed=0)
    fp = graph_fingerprint(g)
    ids = torch.arange(g.num_nodes)
    x = torch.stack([ids, torch.full_like(ids, fp)], 1)
    tr, te = g.train_mask, g.test_mask
    return Dataset(GRAPH_PREFIX + name, x[tr], g.y[tr], x[te], g.y[te], g.num_classes)


#: the names of :data:`iterlayers.operators.graph_data.GRAPHS`, listed here so that the registry (and the CLI's
#: --data check) does not import the graph package; a test keeps the two lists equal
GRAPH_NAMES = ("csbm", "cora_csbm", "citeseer_csbm", "sbm", "digits_knn", "karate", "davis", "lesmis")

DATASETS = {"digits": load_digits, "mnist1d": load_mnist1d, "stdlib_chars": load_stdlib_chars}
DATASETS.update({GRAPH_PREFIX + name: functools.partial(load_graph_nodes, name) for name in GRAPH_NAMES})


def load_dataset(name: str, *, seed: int = 0) -> Dataset:
    """A built-in dataset by name, or a path to a ``.npz`` / ``.pt`` file."""
    if not isinstance(name, (str, Path)):
        raise ValidationError(f"dataset must be a name or a path, got {type(name).__name__}")
    name = str(name)
    if name in DATASETS:
        return DATASETS[name](seed=seed)
    if name.endswith((".npz", ".pt")):
        return load_file(name, seed=seed)
    raise ValidationError(f"unknown dataset {name!r}; valid: {sorted(DATASETS)} or a path to a .npz/.pt file")
