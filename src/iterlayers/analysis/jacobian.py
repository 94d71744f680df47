"""Dense per-sample Jacobians of a cell: the exact ground truth for small problems.

``jacobian(cell, z, x)[b] = d cell(z, x)_b / d z_b`` with z flattened over its non-batch dimensions
(row i = derivative of output entry i). Built from ``n`` vector-Jacobian products with the unit vectors
(batched with ``is_grads_batched`` where PyTorch supports it, a loop otherwise): ``O(n)`` backward passes,
so use it for ``n`` up to a few thousand; the matrix-free routines never build it.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from ._linear import CellLinearization, check_method, dense_from_vjp


def jacobian(cell: Callable, z: Tensor, x: Tensor | None = None, *, wrt: str = "z") -> Tensor:
    """Dense Jacobian ``[B, n, n]`` of ``cell(z, x)`` with respect to z (``wrt="z"``), or ``[B, n, m]`` with
    respect to the input x (``wrt="x"``, m = per-sample size of x). Batch elements must not interact."""
    check_method(wrt, ("z", "x"), "wrt")
    lin = CellLinearization(cell, z, x, need_x=(wrt == "x"))
    return dense_from_vjp(lin.Jz if wrt == "z" else lin.Jx)
