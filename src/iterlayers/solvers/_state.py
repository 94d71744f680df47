"""Flattening of batched states (a tensor or a tuple of tensors) to one ``[B, N]`` matrix.

Solvers work on flat per-sample vectors; users work with whatever structure their cell has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import NonFiniteInputError, ShapeMismatchError

__all__ = ["StateSpec"]


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
        parts = tuple(z) if isinstance(z, (tuple, list)) else (z,)
        if len(parts) == 0:
            raise ShapeMismatchError(f"{what} is an empty tuple; pass at least one tensor")
        for i, p in enumerate(parts):
            name = f"{what}[{i}]" if len(parts) > 1 else what
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {p.dtype}")
            if p.dim() < 1 or p.shape[0] == 0:
                raise ShapeMismatchError(
                    f"{name} must have a non-empty leading batch dimension, got shape {tuple(p.shape)}"
                )
        b = parts[0].shape[0]
        for i, p in enumerate(parts[1:], 1):
            if p.shape[0] != b:
                raise ShapeMismatchError(f"{what}[{i}] has batch size {p.shape[0]} but {what}[0] has {b}")
            if p.dtype != parts[0].dtype:
                raise TypeError(f"{what}[{i}] has dtype {p.dtype} but {what}[0] has {parts[0].dtype}")
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

    def flatten(self, z) -> torch.Tensor:
        parts = tuple(z) if self.is_tuple else (z,)
        if len(parts) == 1:
            return parts[0].reshape(parts[0].shape[0], -1)
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    def unflatten(self, flat: torch.Tensor):
        b = flat.shape[0]
        if not self.is_tuple:
            return flat.reshape(b, *self.shapes[0])
        chunks = torch.split(flat, self.sizes, dim=1)
        return tuple(c.reshape(b, *s) for c, s in zip(chunks, self.shapes))

    def check_output(self, fz, batch: int) -> None:
        """Raise a clear error if ``f(z)`` does not have the structure, shape and dtype of ``z``."""
        parts = tuple(fz) if isinstance(fz, (tuple, list)) else (fz,)
        if isinstance(fz, (tuple, list)) != self.is_tuple or len(parts) != len(self.shapes):
            raise ShapeMismatchError(
                f"f(z) must have the structure of z ({len(self.shapes)} tensor(s), tuple={self.is_tuple}); "
                f"got {len(parts)} tensor(s), tuple={isinstance(fz, (tuple, list))}"
            )
        for i, (p, s) in enumerate(zip(parts, self.shapes)):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"f(z) returned {type(p).__name__}, expected a tensor")
            if tuple(p.shape) != (batch, *s):
                raise ShapeMismatchError(
                    f"f(z){'[%d]' % i if self.is_tuple else ''} has shape {tuple(p.shape)} but z has "
                    f"shape {(batch, *s)}; a fixed-point map must preserve the shape of its state"
                )
            if p.dtype != self.dtype:
                raise TypeError(f"f(z) has dtype {p.dtype} but z has dtype {self.dtype}")


def check_finite(t, what: str) -> None:
    """Raise :class:`NonFiniteInputError` naming ``what`` if a floating tensor holds NaN or Inf."""
    parts = tuple(t) if isinstance(t, (tuple, list)) else (t,)
    for i, p in enumerate(parts):
        if not (isinstance(p, torch.Tensor) and p.is_floating_point()) or p.numel() == 0:
            continue
        # One reduction screens the tensor (NaN and Inf propagate through a sum); only if the sum is not
        # finite (a real NaN/Inf, or an overflow of large finite values) is the element-wise test run.
        if bool(torch.isfinite(p.sum())) or bool(torch.isfinite(p).all()):
            continue
        bad = (~torch.isfinite(p.reshape(p.shape[0], -1) if p.dim() else p.reshape(1, 1))).any(-1)
        idx = bad.nonzero().flatten().tolist()[:8]
        name = f"{what}[{i}]" if len(parts) > 1 else what
        raise NonFiniteInputError(f"{name} contains NaN or Inf (samples {idx}); refusing to iterate")
