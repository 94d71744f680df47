"""Over-smoothing measured by MAD (Mean Average Distance; Chen et al., AAAI 2020), as used by Zappala et al.
(arXiv 2310.01618) to compare PIGN with deep GCNs.

    D_ij = 1 - <h_i, h_j> / (||h_i|| ||h_j||)          (cosine distance of node representations)
    MAD  = sum_{i != j} D_ij / (N (N - 1))             (global MAD, every pair of distinct nodes)

MAD -> 0 when node representations collapse to one direction (over-smoothing). ``exclude_self=False``
averages over all N^2 entries including the zero diagonal. ``output_mad`` is the paper's protocol (the
co-author code): MAD of the softmax of the output logits over all N^2 node pairs. For confident predictions
of C balanced classes it approaches 1 - 1/C; a network predicting one class everywhere gives 0.
Zero rows have no direction; they are given distance 1 to every other node (sklearn's convention).
"""
from __future__ import annotations

import torch

from iterlayers.errors import OptionTypeError, ShapeMismatchError, ValidationError

__all__ = ["cosine_distance_matrix", "mad", "output_mad"]


def cosine_distance_matrix(h: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """[N, N] matrix of cosine distances 1 - cos(h_i, h_j) between the rows of ``h`` ([N, F])."""
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ShapeMismatchError(f"h must be a [N, F] tensor, got {getattr(h, 'shape', type(h))}")
    norms = h.norm(dim=1, keepdim=True)
    u = h / norms.clamp_min(eps)
    d = 1.0 - (u @ u.T)
    d = d.clamp(0.0, 2.0)
    d.fill_diagonal_(0.0)
    return d


def mad(h: torch.Tensor, *, exclude_self: bool = True, mask: torch.Tensor | None = None) -> float:
    """Global MAD of node representations ``h`` ([N, F]); ``mask`` (bool [N]) restricts to a node subset."""
    if not isinstance(exclude_self, bool):
        raise OptionTypeError(f"exclude_self must be a bool, got {exclude_self!r}")
    h = h.detach()
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != h.shape[:1]:
            raise ValidationError(f"mask must be a bool tensor of shape [{h.shape[0]}], "
                                  f"got {mask.dtype} {tuple(mask.shape)}")
        h = h[mask]
    n = h.shape[0]
    if n < 2:
        raise ValidationError(f"MAD needs at least 2 nodes, got {n}")
    d = cosine_distance_matrix(h)
    denom = n * (n - 1) if exclude_self else n * n
    return float(d.sum() / denom)


def output_mad(logits: torch.Tensor) -> float:
    """MAD of softmax(logits) over all node pairs, diagonal included (the paper's over-smoothing measure)."""
    return mad(torch.softmax(logits.detach().double(), dim=1), exclude_self=False)
