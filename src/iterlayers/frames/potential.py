"""Frame potential, mutual coherence and their classical lower bounds.

A *frame* is a matrix ``B`` of shape ``[d, k]`` whose ``k`` columns (atoms) span ``R^d``; with ``k > d`` it is
overcomplete. With column-normalised atoms ``b~_i = b_i / ||b_i||`` and Gram matrix ``G = B~^T B~``:

- mutual coherence  ``mu(B) = max_{i != j} |b~_i^T b~_j|``, bounded below by the Welch bound
  ``mu >= sqrt((k - d) / (d (k - 1)))`` for ``k > d`` (equality iff ``B~`` is an equiangular tight frame);
- frame potential   ``FP(B) = ||G||_F^2 = sum_{i,j} (b~_i^T b~_j)^2``, bounded below by
  ``max(k, k^2 / d)``: ``k`` from the unit diagonal, ``k^2 / d`` because the ``d`` non-zero eigenvalues of
  ``G`` sum to ``trace G = k`` (Cauchy-Schwarz); equality iff ``B~`` is a unit-norm tight frame (``k >= d``)
  or has orthonormal columns (``k <= d``) [Benedetto & Fickus 2003].

Murdock & Lucey (CVPR 2020, arXiv 2003.13866) use the frame potential as a tractable surrogate of mutual
coherence: it is smooth, so it can be minimised by gradient descent, and its minimisers (tight frames) also
have low coherence.
"""
from __future__ import annotations

import math

import torch
from iterlayers.errors import OptionTypeError, ValidationError

__all__ = [
    "normalize_columns",
    "gram_matrix",
    "frame_potential",
    "mutual_coherence",
    "welch_bound",
    "frame_potential_lower_bound",
]


def _check_frame(B: torch.Tensor, name: str = "B") -> torch.Tensor:
    if not isinstance(B, torch.Tensor):
        raise OptionTypeError(f"{name} must be a torch.Tensor, got {type(B).__name__}")
    if B.dim() < 2:
        raise ValidationError(f"{name} must have shape [..., d, k] (atoms are columns), got shape {tuple(B.shape)}")
    if not B.is_floating_point():
        raise OptionTypeError(f"{name} must be floating point, got dtype {B.dtype}")
    return B


def normalize_columns(B: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """``B~`` with unit-norm columns, ``b~_i = b_i / max(||b_i||, eps)`` (batched over leading dims)."""
    _check_frame(B)
    return B / B.norm(dim=-2, keepdim=True).clamp_min(eps)


def gram_matrix(B: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """``G = B~^T B~`` (``normalize=True``) or ``B^T B``; shape ``[..., k, k]``."""
    _check_frame(B)
    Bn = normalize_columns(B) if normalize else B
    return Bn.transpose(-1, -2) @ Bn


def frame_potential(B: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Frame potential ``FP = ||B~^T B~||_F^2`` of the column-normalised frame (``normalize=False``: of ``B``).

    Returns a tensor of the batch shape (a scalar for a single ``[d, k]`` frame); differentiable.
    """
    G = gram_matrix(B, normalize=normalize)
    return G.pow(2).sum(dim=(-1, -2))


def mutual_coherence(B: torch.Tensor) -> torch.Tensor:
    """``mu(B) = max_{i != j} |b~_i^T b~_j|`` over distinct unit-normalised atoms (needs ``k >= 2``)."""
    _check_frame(B)
    k = B.shape[-1]
    if k < 2:
        raise ValidationError(f"mutual_coherence needs at least 2 atoms (columns), got {k}")
    G = gram_matrix(B).abs()
    off = ~torch.eye(k, dtype=torch.bool, device=B.device)
    return G[..., off].amax(dim=-1)


def _check_dims(k: int, d: int) -> None:
    for name, v in (("k", k), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValidationError(f"{name} must be a positive int, got {v!r}")


def welch_bound(k: int, d: int) -> float:
    """Welch lower bound on the coherence of ``k`` unit atoms in ``R^d``: ``sqrt((k-d) / (d (k-1)))``.

    Zero when ``k <= d`` (orthonormal atoms reach it); requires ``k >= 2``.
    """
    _check_dims(k, d)
    if k < 2:
        raise ValidationError(f"welch_bound needs k >= 2 atoms, got k={k}")
    if k <= d:
        return 0.0
    return math.sqrt((k - d) / (d * (k - 1)))


def frame_potential_lower_bound(k: int, d: int) -> float:
    """``min FP`` over ``k`` unit-norm atoms in ``R^d``: ``max(k, k^2 / d)`` (tight frames attain it)."""
    _check_dims(k, d)
    return float(max(k, k * k / d))
