"""Warm starts across training steps: a bounded cache of fixed points keyed by sample identity.

Training a DEQ solves ``z* = f(z*, x_i; theta_t)`` for the same samples ``x_i`` again every epoch, with
parameters ``theta_t`` that move a little between visits. The fixed point found at the last visit is then a
much better start than zeros: the solver begins closer, so fewer iterations (evaluations of the cell) are
needed to meet the same tolerance. Whether a warm start helps depends on how far ``theta`` moved since, so
an entry has an *age* (training steps since it was stored) and is used only while ``age <= max_age``.

A warm start never changes what the solve returns up to its tolerance: the solver still iterates until
``||f(z) - z|| <= atol + rtol ||f(z)||`` (a cached start that is already within tolerance is checked by the
solver's first evaluation and costs no iteration). For a ``q``-contraction the returned iterates of a cold and
a warm start both lie within ``tol / (1 - q)`` of the unique fixed point (derived: ``||z - z*|| <= ||f(z) -
z|| / (1 - q)``), so they differ by at most ``2 tol / (1 - q)``. What can change is *which* fixed point is
found when ``f`` has several (no contraction); the optional residual check below then at least refuses a
cached start worse than the default one.

Usage (``ids`` are the dataset indices of the batch; a CPU integer tensor avoids a device sync)::

    cache = FixedPointCache(capacity=len(train_set), max_age=2 * steps_per_epoch)
    z0, hit = cache.lookup(ids, like=layer.initial_state(x), step=step)
    z = layer(x, z0=z0)
    cache.store(ids, z, step=step, mask=layer.stats["forward"].converged)
    cache.record(layer.stats["forward"].nstep, hit, layer.stats["forward"].converged)

Memory is one table of ``capacity`` rows of the flattened state, allocated at the first :meth:`store` on the
state's device and dtype (``nbytes``); when it is full the least recently used entry is evicted. Statistics
(:meth:`stats`): ``hits``, ``misses`` (never stored or evicted), ``stale`` (older than ``max_age``),
``rejected`` (failed the residual check), ``evictions``, ``warm_unconverged`` (warm-started samples that ended
at ``max_iter``, whose results depend on the start: see :meth:`record`) with its rate over the warm samples
recorded with their flags, and, from what :meth:`record` was given, the mean
iterations of warm and cold samples and the iterations saved, estimated as ``n_warm * (mean_cold -
mean_warm)`` (an estimate: it assumes a warm sample would have needed the cold mean).

Residual check (optional, ``lookup(..., residual=r)``): ``r(z)`` returns the per-sample residual ``||f(z) -
z||`` of a state; a hit whose cached row has a residual not below that of the default start ``like`` is
rejected and starts from ``like``. It costs two evaluations of ``f`` on the batch, which is why it is off by
default: the solver's own first evaluation already tells a good start from a bad one.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from . import _validate as v
from .errors import OptionTypeError, ShapeMismatchError
from .solvers._loop import StateSpec, _describe

__all__ = ["FixedPointCache"]


class FixedPointCache:
    """A bounded (LRU) table of fixed points keyed by sample identity, with an age rule; see the module docstring.

    Args:
        capacity: the number of samples held (the table has ``capacity`` rows; memory ``capacity x N`` values).
        max_age: an entry stored at step ``s`` is used at step ``t`` only if ``t - s <= max_age``;
            ``None``: entries never go stale.
    """

    def __init__(self, capacity: int, max_age: int | None = None):
        self.capacity = v.positive_int(capacity, "capacity", where="FixedPointCache")
        self.max_age = None if max_age is None else v.non_negative_int(max_age, "max_age", where="FixedPointCache")
        self.spec: StateSpec | None = None
        self.table: torch.Tensor | None = None
        self.slots: OrderedDict[int, int] = OrderedDict()  # id -> row of the table, least recently used first
        self.free = list(range(self.capacity - 1, -1, -1))  # unused rows of the table (popped from the end)
        self.stored_at: list[int] = [0] * self.capacity  # step at which each row was stored
        self.step = 0  # the latest step given to store(): the clock of a lookup without step=
        self.counts = dict(hits=0, misses=0, stale=0, rejected=0, evictions=0, warm_unconverged=0)
        # n_recorded_converged: warm samples recorded together with their converged flags
        self.steps = dict(warm=0, n_warm=0, cold=0, n_cold=0, n_recorded_converged=0)

    # -- keys ----------------------------------------------------------------------------------------------
    def _ids(self, ids, batch: int | None, where: str) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() != 1:
                raise OptionTypeError(f"FixedPointCache.{where}: ids must be a 1-d integer tensor (dataset indices), "
                                      f"got {_describe(ids)}")
            keys = ids.tolist()
        elif isinstance(ids, (list, tuple, range)):
            keys = [v.integer(i, "ids[]", where=f"FixedPointCache.{where}") for i in ids]
        else:
            raise OptionTypeError(f"FixedPointCache.{where}: ids must be a 1-d integer tensor or a list of ints, "
                                  f"got {_describe(ids)}")
        if batch is not None and len(keys) != batch:
            raise ShapeMismatchError(f"FixedPointCache.{where}: {len(keys)} ids for a batch of {batch} samples")
        return keys

    def _flat(self, z, what: str, where: str) -> tuple[StateSpec, torch.Tensor]:
        spec = StateSpec.of(z, what)
        if self.spec is not None and (spec.shapes, spec.is_tuple) != (self.spec.shapes, self.spec.is_tuple):
            raise ShapeMismatchError(
                f"FixedPointCache.{where}: {what} is {_describe(z)}; the cache holds states of per-sample shapes "
                f"{list(self.spec.shapes)}{' (a tuple)' if self.spec.is_tuple else ''}"
            )
        return spec, spec.flatten(z)

    def _clock(self, step, where: str) -> int:
        return self.step if step is None else v.non_negative_int(step, "step", where=f"FixedPointCache.{where}")

    # -- use -----------------------------------------------------------------------------------------------
    def lookup(self, ids, like, *, step: int | None = None, residual=None):
        """The initial state for the samples ``ids``: cached rows where fresh, ``like``'s rows elsewhere.

        ``like`` is the default start (e.g. ``layer.initial_state(x)``), a tensor or tuple with batch
        ``len(ids)``; ``step`` the current training step (default: the latest step given to :meth:`store`).
        Returns ``(z0, hit)``: ``z0`` shaped like ``like`` (a new tensor; ``like`` is not modified) and
        ``hit`` a ``[B]`` bool tensor on ``like``'s device. ``residual``: see the module docstring.
        """
        spec, flat = self._flat(like, "like", "lookup")
        keys = self._ids(ids, spec.batch_size, "lookup")
        now = self._clock(step, "lookup")
        rows, found = [], []
        for i, key in enumerate(keys):
            slot = self.slots.get(key)
            if slot is None:
                self.counts["misses"] += 1
            elif self.max_age is not None and now - self.stored_at[slot] > self.max_age:
                self.counts["stale"] += 1
            else:
                self.slots.move_to_end(key)
                rows.append(i)
                found.append(slot)
        hit = torch.zeros(spec.batch_size, dtype=torch.bool, device=flat.device)
        if not found:
            return spec.unflatten(flat.clone()), hit
        if (self.table.dtype, self.table.device) != (flat.dtype, flat.device):
            raise ShapeMismatchError(f"FixedPointCache.lookup: like is {flat.dtype} on {flat.device} but the cache "
                                     f"holds {self.table.dtype} on {self.table.device}")
        at = torch.tensor(rows, device=flat.device)
        z0 = flat.index_copy(0, at, self.table.index_select(0, torch.tensor(found, device=flat.device)))
        hit[at] = True
        if residual is not None:
            with torch.no_grad():
                worse = ~(residual(spec.unflatten(z0)) < residual(like))  # NaN in the cached row: worse
            reject = hit & worse.to(hit.device)
            n = int(reject.sum())
            if n:
                self.counts["rejected"] += n
                z0 = torch.where(reject.unsqueeze(1), flat, z0)
                hit = hit & ~reject
            self.counts["hits"] += len(found) - n
        else:
            self.counts["hits"] += len(found)
        return spec.unflatten(z0), hit

    def store(self, ids, z, *, step: int, mask=None) -> None:
        """Store the rows of ``z`` (detached) under ``ids`` at training step ``step``; ``mask`` (``[B]`` bool,
        e.g. ``stats.converged``) stores only those rows. A repeated id keeps its last row."""
        spec, flat = self._flat(z, "z", "store")
        keys = self._ids(ids, spec.batch_size, "store")
        self.step = max(self.step, v.non_negative_int(step, "step", where="FixedPointCache.store"))
        if mask is not None:
            if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == (len(keys),)):
                raise OptionTypeError(f"FixedPointCache.store: mask must be a bool tensor of shape ({len(keys)},), "
                                      f"got {_describe(mask)}")
            keep = mask.tolist()
        else:
            keep = [True] * len(keys)
        if self.table is None:
            self.spec = spec
            self.table = torch.zeros(self.capacity, spec.numel, dtype=flat.dtype, device=flat.device)
        elif (self.table.dtype, self.table.device) != (flat.dtype, flat.device):
            raise ShapeMismatchError(f"FixedPointCache.store: z is {flat.dtype} on {flat.device} but the cache "
                                     f"holds {self.table.dtype} on {self.table.device}")
        last = {key: i for i, (key, k) in enumerate(zip(keys, keep)) if k}  # a repeated id: its last row
        rows, slots = [], []
        for key, i in last.items():
            slot = self.slots.pop(key, None)
            if slot is None:
                if self.free:
                    slot = self.free.pop()
                else:
                    _, slot = self.slots.popitem(last=False)  # the least recently used entry
                    self.counts["evictions"] += 1
            self.slots[key] = slot
            self.stored_at[slot] = int(step)
            rows.append(i)
            slots.append(slot)
        if rows:
            src = flat.detach().index_select(0, torch.tensor(rows, device=flat.device))
            self.table.index_copy_(0, torch.tensor(slots, device=flat.device), src)

    def record(self, nstep: torch.Tensor, hit: torch.Tensor, converged: torch.Tensor | None = None) -> None:
        """Account the iterations ``nstep`` (``[B]``, e.g. ``stats.nstep``) of a solve started from
        :meth:`lookup`'s ``hit`` mask: the basis of the iterations-saved estimate in :meth:`stats`.

        ``converged`` (``[B]`` bool, e.g. ``stats.converged``): which samples met the tolerance. A warm-started
        sample that did not (it stopped at ``max_iter``) returned a state that depends on where it started, so
        the guarantee of the module docstring does not hold for it; :meth:`stats` counts these
        (``warm_unconverged``) so that a cache changing results is visible, not silent."""
        if not (isinstance(nstep, torch.Tensor) and isinstance(hit, torch.Tensor) and hit.dtype == torch.bool
                and nstep.shape == hit.shape and hit.dim() == 1):
            raise OptionTypeError(f"FixedPointCache.record: nstep and hit must be [B] tensors (hit bool), got "
                                  f"{_describe(nstep)} and {_describe(hit)}")
        if converged is not None and not (isinstance(converged, torch.Tensor) and converged.dtype == torch.bool
                                          and converged.shape == hit.shape):
            raise OptionTypeError(f"FixedPointCache.record: converged must be a [B] bool tensor like hit, got "
                                  f"{_describe(converged)}")
        n = nstep.to(torch.float64)
        h = hit.to(n.device)
        parts = [n[h].sum(), n[~h].sum(), h.sum().to(n.dtype)]
        if converged is not None:
            parts.append((h & ~converged.to(h.device)).sum().to(n.dtype))
        warm, cold, n_warm, *unconverged = torch.stack(parts).tolist()
        if unconverged:
            self.counts["warm_unconverged"] += int(unconverged[0])
            self.steps["n_recorded_converged"] += int(n_warm)
        self.steps["warm"] += warm
        self.steps["cold"] += cold
        self.steps["n_warm"] += int(n_warm)
        self.steps["n_cold"] += len(hit) - int(n_warm)

    # -- introspection -------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the table (0 before the first store): ``capacity x N x itemsize``, fixed."""
        return 0 if self.table is None else self.table.numel() * self.table.element_size()

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, key) -> bool:
        return key in self.slots

    def age(self, key: int, step: int | None = None) -> int | None:
        """Steps since ``key`` was stored (``None`` if not held)."""
        slot = self.slots.get(key)
        return None if slot is None else self._clock(step, "age") - self.stored_at[slot]

    def clear(self) -> None:
        """Forget every entry (the table's memory is kept; statistics are kept)."""
        self.slots.clear()
        self.free = list(range(self.capacity - 1, -1, -1))

    def stats(self) -> dict:
        """Counters and the iterations-saved estimate, as plain Python numbers."""
        c, s = self.counts, self.steps
        looked = c["hits"] + c["misses"] + c["stale"] + c["rejected"]
        mean_warm = s["warm"] / s["n_warm"] if s["n_warm"] else float("nan")
        mean_cold = s["cold"] / s["n_cold"] if s["n_cold"] else float("nan")
        saved = s["n_warm"] * (mean_cold - mean_warm) if s["n_warm"] and s["n_cold"] else float("nan")
        checked = s["n_recorded_converged"]
        return {**c, "lookups": looked, "hit_rate": c["hits"] / looked if looked else 0.0, "entries": len(self),
                "warm_unconverged_rate": c["warm_unconverged"] / checked if checked else float("nan"),
                "capacity": self.capacity, "nbytes": self.nbytes, "mean_steps_warm": mean_warm,
                "mean_steps_cold": mean_cold, "steps_saved_estimate": saved}

    def __repr__(self) -> str:
        return (f"FixedPointCache(capacity={self.capacity}, max_age={self.max_age}, entries={len(self)}, "
                f"nbytes={self.nbytes})")
