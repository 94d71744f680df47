"""Flattening of batched states (a tensor or a tuple of tensors) to one ``[B, N]`` matrix, and the checks of
what goes into and comes out of a fixed-point map.

Solvers work on flat per-sample vectors; users work with whatever structure their cell has. Every check here
runs before the first iteration (on ``z0``, the inputs and the first evaluation of ``f``) and raises a typed
error of the one family (:mod:`iterlayers.errors`) naming what was received and what was expected, so that a
mistake never surfaces as a torch error from inside a solver.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import NonFiniteInputError, OptionTypeError, ShapeMismatchError

__all__ = ["StateSpec", "nonfinite_rows", "check_finite"]


def _describe(x) -> str:
    """A short description of a value ``f`` returned or a caller passed, for error messages."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}: ({', '.join(_describe(p) for p in x)})"
    return "None" if x is None else f"a {type(x).__name__}"


@dataclass(frozen=True)
class StateSpec:
    """Shapes (without the batch dimension) of the parts of a state, and whether it was a tuple."""

    shapes: tuple[tuple[int, ...], ...]
    is_tuple: bool
    batch_size: int
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(z, what: str = "z0") -> "StateSpec":
        """The spec of a state; a batch of size 0 is valid (the solve of an empty batch is empty)."""
        parts = tuple(z) if isinstance(z, (tuple, list)) else (z,)
        if len(parts) == 0:
            raise ShapeMismatchError(f"{what} is an empty tuple; pass at least one tensor")
        for i, p in enumerate(parts):
            name = f"{what}[{i}]" if len(parts) > 1 else what
            if not isinstance(p, torch.Tensor):
                raise OptionTypeError(f"{name} must be a torch.Tensor, got {_describe(p)}")
            if not p.is_floating_point():
                raise OptionTypeError(
                    f"{name} must be a floating-point tensor, got dtype {p.dtype}: an integer or boolean state "
                    f"cannot be iterated (create it with dtype=torch.float32 or the cell's dtype)"
                )
            if p.dim() < 1:
                raise ShapeMismatchError(
                    f"{name} must have a leading batch dimension, got a 0-d tensor (shape {tuple(p.shape)})"
                )
        b = parts[0].shape[0]
        for i, p in enumerate(parts[1:], 1):
            if p.shape[0] != b:
                raise ShapeMismatchError(f"{what}[{i}] has batch size {p.shape[0]} but {what}[0] has {b}")
            if p.dtype != parts[0].dtype:
                raise OptionTypeError(f"{what}[{i}] has dtype {p.dtype} but {what}[0] has {parts[0].dtype}")
            if p.device != parts[0].device:
                raise ShapeMismatchError(f"{what}[{i}] is on {p.device} but {what}[0] is on {parts[0].device}")
        return StateSpec(
            tuple(tuple(p.shape[1:]) for p in parts),
            isinstance(z, (tuple, list)),
            b,
            parts[0].dtype,
            parts[0].device,
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Elements per sample: the width ``N`` of the flat state."""
        return sum(self.sizes)

    def flatten(self, z) -> torch.Tensor:
        parts = tuple(z) if self.is_tuple else (z,)
        # Explicit sizes, not -1: a batch of size 0 has no inferable trailing dimension.
        if len(parts) == 1:
            return parts[0].reshape(parts[0].shape[0], self.sizes[0])
        return torch.cat([p.reshape(p.shape[0], n) for p, n in zip(parts, self.sizes)], dim=1)

    def unflatten(self, flat: torch.Tensor):
        b = flat.shape[0]
        if not self.is_tuple:
            return flat.reshape(b, *self.shapes[0])
        chunks = torch.split(flat, self.sizes, dim=1)
        return tuple(c.reshape(b, *s) for c, s in zip(chunks, self.shapes))

    def expected(self, batch: int) -> str:
        shapes = [f"({', '.join(str(d) for d in (batch, *s))})" for s in self.shapes]
        kind = f"a tuple of {len(shapes)} tensors of shapes {', '.join(shapes)}" if self.is_tuple else (
            f"a tensor of shape {shapes[0]}")
        return f"{kind}, dtype {self.dtype}, on {self.device} (the structure of z)"

    def check_output(self, fz, batch: int, what: str = "f(z)") -> None:
        """Raise a typed error if ``f(z)`` does not have the structure, shape, dtype and device of ``z``.

        ``None`` or a non-tensor is an :class:`OptionTypeError`; a wrong structure (tuple vs tensor, number of
        parts), shape (batch size, a flattened state), dtype or device is a :class:`ShapeMismatchError`. Each
        message names what ``f`` returned and what was expected.
        """
        expected = self.expected(batch)
        if fz is None or not isinstance(fz, (torch.Tensor, tuple, list)):
            raise OptionTypeError(f"{what} returned {_describe(fz)}; expected {expected}")
        parts = tuple(fz) if isinstance(fz, (tuple, list)) else (fz,)
        if isinstance(fz, (tuple, list)) != self.is_tuple or len(parts) != len(self.shapes):
            raise ShapeMismatchError(f"{what} returned {_describe(fz)}; expected {expected}")
        for i, (p, s) in enumerate(zip(parts, self.shapes)):
            name = f"{what}[{i}]" if self.is_tuple else what
            if not isinstance(p, torch.Tensor):
                raise OptionTypeError(f"{name} is {_describe(p)}; expected {expected}")
            if tuple(p.shape) != (batch, *s):
                hint = ""
                if p.dim() >= 1 and p.shape[0] != batch:
                    hint = f": batch size {p.shape[0]} instead of {batch}"
                elif p.numel() == batch * math.prod(s):
                    hint = ": the right number of elements in another shape (a flattened state?); reshape it"
                raise ShapeMismatchError(
                    f"{name} has shape {tuple(p.shape)} but z has shape {(batch, *s)}{hint}; a fixed-point map "
                    f"must preserve the shape of its state (expected {expected})"
                )
            if p.dtype != self.dtype:
                raise ShapeMismatchError(
                    f"{name} has dtype {p.dtype} but z has dtype {self.dtype}; a fixed-point map must preserve "
                    f"the dtype of its state (under torch.autocast, create z0 in the cell's output dtype)"
                )
            if p.device != self.device:
                raise ShapeMismatchError(f"{name} is on {p.device} but z is on {self.device}")


def nonfinite_rows(t: torch.Tensor, batch: int, *, batched: bool = True) -> torch.Tensor | None:
    """The ``[batch]`` mask of samples of ``t`` holding NaN or Inf, or ``None`` when every value is finite.

    A tensor whose first dimension is ``batch`` is batched (one row per sample) unless ``batched=False``; any
    other tensor (an adjacency, a table, a scalar) concerns every sample, so one non-finite value marks them
    all. One
    reduction screens the tensor (NaN and Inf propagate through a sum); only if the sum is not finite (a real
    NaN/Inf, or an overflow of large finite values) is the element-wise test run.
    """
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return None
    if batched and t.dim() > 0 and t.shape[0] == batch:
        return (~torch.isfinite(t.reshape(batch, -1))).any(-1)
    return torch.ones(batch, dtype=torch.bool, device=t.device)


def check_finite(t, what: str) -> None:
    """Raise :class:`NonFiniteInputError` naming ``what`` if a floating tensor holds NaN or Inf."""
    parts = tuple(t) if isinstance(t, (tuple, list)) else (t,)
    for i, p in enumerate(parts):
        if not isinstance(p, torch.Tensor) or p.numel() == 0:
            continue
        bad = nonfinite_rows(p, p.shape[0] if p.dim() else 1)
        if bad is not None:
            name = f"{what}[{i}]" if len(parts) > 1 else what
            raise NonFiniteInputError(
                f"{name} contains NaN or Inf (samples {bad.nonzero().flatten().tolist()[:8]}); refusing to iterate"
            )
