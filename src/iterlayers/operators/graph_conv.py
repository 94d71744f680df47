"""Graph convolution on plain PyTorch adjacency (dense or sparse), as used by PIGN and the GCN baselines.

Kipf & Welling's propagation rule, the message passing of every model in this package:

    A^ = D~^{-1/2} (A + I) D~^{-1/2},   D~_ii = sum_j (A + I)_ij,
    GraphConv(H) = A^ H W + c.

A^ is symmetric with spectrum in (-1, 1], its top eigenvalue is exactly 1 (eigenvector D~^{1/2} 1), so
||A^||_2 = 1 and a ReLU graph convolution is Lipschitz in H with constant ||W||_2 (used by
``check_convergence`` for PIGN's operator; Zappala et al., arXiv 2310.01618, App. A.3).

No torch_geometric: a torch sparse COO (or CSR) matrix, or a dense [N, N] tensor, is all that is needed.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["normalized_adjacency", "propagate", "GraphConv", "edge_index_to_adjacency"]


def _check_square(adj: torch.Tensor) -> None:
    if not isinstance(adj, torch.Tensor):
        raise TypeError(f"adjacency must be a torch.Tensor (dense or sparse), got {type(adj).__name__}")
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adjacency must be a square [N, N] matrix, got shape {tuple(adj.shape)}")


def edge_index_to_adjacency(edge_index: torch.Tensor, num_nodes: int, *, symmetric: bool = True,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sparse COO adjacency (0/1 weights) from an edge list ``[2, E]``; duplicate edges collapse to 1."""
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
    ei = edge_index.long()
    if symmetric:
        ei = torch.cat([ei, ei.flip(0)], dim=1)
    vals = torch.ones(ei.shape[1], dtype=dtype)
    adj = torch.sparse_coo_tensor(ei, vals, (num_nodes, num_nodes), check_invariants=True).coalesce()
    # duplicates were summed by coalesce: clamp back to a 0/1 adjacency
    return torch.sparse_coo_tensor(adj.indices(), adj.values().clamp(max=1.0), adj.shape,
                                   check_invariants=True).coalesce()


def normalized_adjacency(adj: torch.Tensor, *, add_self_loops: bool = True) -> torch.Tensor:
    """A^ = D~^{-1/2} (A + I) D~^{-1/2}, in the layout of ``adj`` (dense in, dense out; sparse in, sparse COO out).

    Existing self loops are replaced by weight-1 loops (torch_geometric's ``add_remaining_self_loops``),
    so the result does not depend on whether the input already had them. Isolated nodes get degree 1.
    """
    _check_square(adj)
    n = adj.shape[0]
    if adj.is_sparse or adj.layout in (torch.sparse_csr, torch.sparse_csc):
        a = adj.to_sparse_coo().coalesce()
        idx, val = a.indices(), a.values()
        off = idx[0] != idx[1]
        idx, val = idx[:, off], val[off]
        if add_self_loops:
            loop = torch.arange(n, device=idx.device).unsqueeze(0).repeat(2, 1)
            idx = torch.cat([idx, loop], dim=1)
            val = torch.cat([val, torch.ones(n, dtype=val.dtype, device=val.device)])
        deg = torch.zeros(n, dtype=val.dtype, device=val.device).index_add_(0, idx[0], val)
        dinv = torch.where(deg > 0, deg.clamp_min(1e-30).rsqrt(), torch.zeros_like(deg))
        val = dinv[idx[0]] * val * dinv[idx[1]]
        return torch.sparse_coo_tensor(idx, val, (n, n), check_invariants=True).coalesce()
    a = adj.clone()
    a.fill_diagonal_(1.0 if add_self_loops else 0.0)
    deg = a.sum(1)
    dinv = torch.where(deg > 0, deg.clamp_min(1e-30).rsqrt(), torch.zeros_like(deg))
    return dinv[:, None] * a * dinv[None, :]


def propagate(a_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A^ H for dense or sparse A^ (``h`` is [N, F])."""
    if h.dim() != 2 or h.shape[0] != a_hat.shape[1]:
        raise ValueError(
            f"node features must be [N, F] with N = {a_hat.shape[1]} (adjacency size), got {tuple(h.shape)}"
        )
    if a_hat.is_sparse:
        return torch.sparse.mm(a_hat, h)
    return a_hat @ h


class GraphConv(nn.Module):
    """One graph convolution H -> A^ (H W) + c (Kipf & Welling 2017), with Glorot-initialised W."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        bound = math.sqrt(6.0 / (in_features + out_features))
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, h: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
        out = propagate(a_hat, h @ self.weight)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
