r"""Variational dropout for equilibrium cells: one mask per forward pass, fixed for the whole solve.

A fresh dropout mask at every solver iteration changes the map ``f`` at every step, so ``z = f(z)`` has no
fixed point and the solver wanders. Variational ("locked") dropout (Gal & Ghahramani 2016; the DEQ codes of
Bai et al. use it for the same reason) draws one Bernoulli mask per forward pass and applies it at every
iteration, so the layer solves the fixed point of one map

    f_m(z, x) = cell(z, x) with every dropped activation  h -> h * m / (1 - p),   m ~ Bernoulli(1 - p),

and the backward pass (the adjoint solve, phantom or unrolled steps) differentiates that same ``f_m``. The
scaling by ``1 / (1 - p)`` keeps ``E[h * m / (1 - p)] = h``; in eval mode the module is the identity.

How the mask follows the solve. :class:`iterlayers.DEQ` calls two methods of the cell's submodules (the cell
protocol, ``docs/cell_contract.md``):

- ``deq_reset(batch)`` before each solve: the mask is dropped and redrawn at the next call, which sees the
  whole batch (its shape is that of the input the module then sees, so it need not be known in advance);
- ``deq_rows(rows)`` before each evaluation of the cell: the indices of the samples in that evaluation
  (``None``: the whole batch). With per-sample stopping the solver evaluates only the samples that have not
  converged yet; the module applies the rows ``mask[rows]`` of the full mask, so a sample keeps its own mask
  whichever samples it is evaluated with. (A mask stored on the module and applied as it is would pair the
  first rows of the mask with whatever samples remain.)

Outside a DEQ (``deq_reset`` never called) the module is ordinary variational dropout: a new mask per call.

Hoisting (``hoist=True``, :mod:`iterlayers.hoist`). The mask is applied by :func:`apply_mask`, which
``torch.fx`` records as one call (``torch.fx.wrap``) with the mask read live from the module and the rows as
an input of the cell: the loop-invariant part of the cell is still computed once per solve, the rows of the
mask are sliced with the samples, and a new forward pass's mask is read by the same split.

Mask shapes (``kind``), for an input ``[B, ...]``:

- ``"features"``: one Bernoulli draw per element (``[B, C]`` features; for ``[B, T, C]`` one per token and
  feature);
- ``"channels"``: one per sample and channel, shared over the spatial dimensions (``[B, C, H, W]`` ->
  mask ``[B, C, 1, 1]``), as spatial dropout;
- ``"tokens"``: for a sequence ``[B, T, C]``, one mask per sample over the features, shared by every
  position (mask ``[B, 1, C]``): the same features are dropped at every token, as in the DEQ transformer.
"""
from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from . import _validate
from .errors import ShapeMismatchError

__all__ = ["VariationalDropout", "KINDS", "apply_mask"]

KINDS = ("features", "channels", "tokens")


def apply_mask(x: Tensor, mask: Tensor, rows: Tensor | None) -> Tensor:
    """``x * mask[rows]`` (``rows=None``: ``x * mask``), refusing a mask that does not fit ``x``."""
    m = mask if rows is None else mask.index_select(0, rows)
    if m.shape[0] != x.shape[0] or m.dim() != x.dim() or any(a not in (1, b) for a, b in zip(m.shape[1:],
                                                                                              x.shape[1:])):
        raise ShapeMismatchError(
            f"VariationalDropout: the mask of this forward pass has shape {tuple(m.shape)} for these rows, the "
            f"input {tuple(x.shape)}; a module driven by a DEQ keeps one mask until the next deq_reset (called by "
            "DEQ.forward), so it must see inputs of one shape within a forward pass"
        )
    return x * m


# One call in traced graphs: the checks above are Python branches on shapes, not operations to trace.
torch.fx.wrap("apply_mask")


class VariationalDropout(nn.Module):
    """Dropout whose mask is drawn once per :class:`iterlayers.DEQ` forward pass (see the module docstring).

    Args:
        p: probability of dropping an activation, in ``[0, 1)``.
        kind: ``"features"``, ``"channels"`` or ``"tokens"`` (the mask's shape, module docstring).

    After a forward pass ``module.mask`` holds the mask of the whole batch (scaled: entries ``0`` or
    ``1 / (1 - p)``), ``None`` before the first training-mode call.
    """

    def __init__(self, p: float = 0.1, *, kind: str = "features"):
        super().__init__()
        where = "VariationalDropout"
        self.p = _validate.in_range(p, "p", where=where, low=0.0, high=1.0, high_open=True)
        self.kind = _validate.choice(kind, "kind", KINDS, where=where)
        self.mask: Tensor | None = None
        self.rows: Tensor | None = None
        self.driven = False  # set by deq_reset: the mask is then held until the next reset

    # -- the cell protocol -------------------------------------------------------------------------------
    def deq_reset(self, batch: int) -> None:
        """A new forward pass starts: the next call (on the whole batch) draws a new mask."""
        self.driven = True
        self.mask = None

    @property
    def pending(self) -> bool:
        """Whether the next call draws the mask (a DEQ then draws it before the solve, for hoisting)."""
        return self.driven and self.mask is None and self.training and self.p > 0.0

    def deq_rows(self, rows: Tensor | None) -> None:
        """The samples (indices into the batch) of the next evaluation; ``None``: all of them."""
        self.rows = rows

    # ------------------------------------------------------------------------------------------------------
    def _shape(self, x: Tensor, batch: int) -> tuple:
        if self.kind == "features":
            return (batch, *x.shape[1:])
        if self.kind == "channels":
            if x.dim() < 3:
                raise ShapeMismatchError(f"VariationalDropout(kind='channels') needs an input [B, C, ...] with "
                                         f"spatial dimensions, got shape {tuple(x.shape)}")
            return (batch, x.shape[1], *([1] * (x.dim() - 2)))
        if x.dim() != 3:
            raise ShapeMismatchError(f"VariationalDropout(kind='tokens') needs a sequence [B, T, C], got shape "
                                     f"{tuple(x.shape)}")
        return (batch, 1, x.shape[2])

    def _draw(self, x: Tensor, batch: int) -> Tensor:
        keep = torch.full(self._shape(x, batch), 1.0 - self.p, dtype=x.dtype, device=x.device)
        return torch.bernoulli(keep) / (1.0 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.driven:  # not driven by a DEQ: ordinary variational dropout, one mask per call
            return x * self._draw(x, x.shape[0])
        if self.mask is None:
            if self.rows is not None and self.rows.numel() != int(self.rows.max()) + 1:
                # DEQ.forward draws the mask on the whole batch before the solve; a sub-batch cannot size it
                raise ShapeMismatchError("VariationalDropout: the mask must be drawn on the whole batch")
            self.mask = self._draw(x, x.shape[0])
        return apply_mask(x, self.mask, self.rows)

    def extra_repr(self) -> str:
        return f"p={self.p:g}, kind={self.kind!r}"
