"""The cell protocol: what every iterative layer, solver client and analysis tool assumes about a cell.

A *cell* is a module or callable ``cell(z, *inputs, **shared) -> z_next``. ``z`` is the state: a tensor
``[B, ...]`` or a tuple of them (first dimension = batch); ``cell`` returns the same structure, shapes, dtype and
device. Every consumer calls it as ``cell(z, *inputs, **shared)``; the analysis toolkit, whose entry points take
one input ``x``, calls ``cell(z, x)`` (and a one-argument ``cell(z)`` when ``x`` is ``None``). ``inputs`` are batched (first dimension = batch, sliced with the samples a solver still iterates),
``shared`` are passed unsliced (an adjacency, a positional table). What a solve further assumes about the cell
(determinism, sample independence, batch norm) is in ``docs/cell_contract.md``.

Optional methods a cell may define, and what each consumer does with them:

- ``init_state(*inputs) -> z0``: the initial state when none is given (:func:`initial_state`). Used by
  :class:`iterlayers.DEQ`, :class:`iterlayers.Unrolled`, :class:`iterlayers.operators.PicardIteration` and the
  analysis toolkit (``analysis.report``, ``analysis.certify_contraction``). Without it the initial state is
  ``zeros_like(inputs[0])``.
- ``deq_reset(batch)`` / ``deq_rows(rows)`` on a submodule: per-forward state (a dropout mask) restarted by
  :class:`iterlayers.DEQ` at each forward pass / rows following the solver's samples (``docs/cell_contract.md``).
- ``lipschitz_bound() -> float``: a global Lipschitz constant of the cell in ``z`` (:func:`lipschitz_bound`).
  ``analysis.certify_contraction`` turns a bound below 1 into a global certificate;
  ``operators.check_convergence`` passes it on, relaxed, for the Picard map ``a z + (1 - a) T(z)``.

Nothing else is looked up on a cell: every other behaviour is configured on the layer (``DEQ`` options).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from torch import nn

from .errors import OptionTypeError, ShapeMismatchError
from .solvers import StateSpec

__all__ = ["initial_state", "lipschitz_bound", "flattened", "submodules"]


def initial_state(cell: Callable, *inputs, z0=None, where: str = "cell", names: Sequence[str] | None = None):
    """The initial state of ``cell`` for ``inputs``: ``z0`` if given, else ``cell.init_state(*inputs)`` if the
    cell defines it, else ``zeros_like(inputs[0])``.

    The default needs a batched floating-point tensor ``inputs[0]`` (``[batch, ...]``, at least 2-D); otherwise
    a typed error (prefixed by ``where``, naming the input by ``names[0]``, default ``"x"``) says to pass ``z0``
    or to give the cell an ``init_state`` method.
    """
    if z0 is not None:
        return z0
    init = getattr(cell, "init_state", None)
    if callable(init):
        return init(*inputs)
    if not inputs or inputs[0] is None:
        raise OptionTypeError(f"{where}: no input to take the initial state from: pass z0")
    x = inputs[0]
    name = names[0] if names else "x"
    if not isinstance(x, torch.Tensor):
        raise OptionTypeError(f"{where}: {name} is a {type(x).__name__}, not a tensor: pass z0, or give the cell "
                              "an init_state method")
    if not x.is_floating_point():
        raise OptionTypeError(f"{where}: {name} has dtype {x.dtype}, so the default initial state "
                              f"zeros_like({name}) would not be a float: pass z0, or give the cell an init_state "
                              "method")
    if x.dim() < 2:
        raise ShapeMismatchError(
            f"{where}: {name} has shape {tuple(x.shape)}; inputs are batched [batch, ...] and the default initial "
            f"state is zeros_like({name}): add the batch dimension ({name}[None] for one sample) or pass z0"
        )
    return torch.zeros_like(x)


def lipschitz_bound(cell: Callable) -> float | None:
    """``cell.lipschitz_bound()`` as a float if the cell defines it, else ``None``."""
    bound = getattr(cell, "lipschitz_bound", None)
    return float(bound()) if callable(bound) else None



class _Flat(nn.Module):
    """``cell`` on flat states ``[B, N]`` of a tuple state: ``flatten(cell(unflatten(w), ...))``."""

    def __init__(self, cell: Callable, spec: StateSpec):
        super().__init__()
        self.cell, self.spec = cell, spec

    def forward(self, w, *inputs, **shared):
        return self.spec.flatten(self.cell(self.spec.unflatten(w), *inputs, **shared))


class _FlatBounded(_Flat):
    """A flat view of a cell that defines ``lipschitz_bound()``: the flat 2-norm is the tuple's norm, so the
    bound holds for the view unchanged."""

    def lipschitz_bound(self) -> float:
        return lipschitz_bound(self.cell)


def flattened(cell: Callable, z):
    """``(cell, z)`` for a tensor state; for a tuple state ``(flat_cell, flat_z)`` with ``flat_z`` the
    ``[B, N]`` concatenation of the parts and ``flat_cell`` the cell on such states (a module holding
    ``cell``, so its parameters are seen). Lets tools written for ``[B, n]`` states analyse tuple states."""
    if not isinstance(z, (tuple, list)):
        return cell, z
    spec = StateSpec.of(z, "z")
    view = _Flat if lipschitz_bound(cell) is None else _FlatBounded
    return view(cell, spec), spec.flatten(z)


def submodules(cell) -> tuple:
    """``(path, module)`` for ``cell`` and every module under it, each module once, in the pre-order of
    ``nn.Module.named_modules`` (``()`` for a plain callable).

    The one walk of a cell per solve: :func:`iterlayers.deq_solve` takes it once and hands it to everything
    that reads the cell's modules (its traits, the hoisting fingerprint, the input signature, the device check).
    Iterative rather than ``named_modules``' recursive generators, whose per-module frames cost more than a
    small cell's evaluation when taken several times per solve.
    """
    if not isinstance(cell, nn.Module):
        return ()
    out, seen, stack = [], set(), [("", cell)]
    while stack:
        path, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append((path, m))
        children = [(f"{path}.{name}" if path else name, c) for name, c in m._modules.items() if c is not None]
        stack.extend(reversed(children))
    return tuple(out)
