"""Graph convolution for PIGN and its baselines, on PyTorch Geometric (``GCNConv``, ``GATConv``, ``Data``).

Every model of this package takes a graph the PyG way, ``model(x, edge_index)`` with ``edge_index`` a
``[2, E]`` LongTensor (``data.x``, ``data.edge_index`` of any ``torch_geometric.data.Data``), and uses
Kipf & Welling's propagation rule through PyG's ``gcn_norm``:

    A^ = D~^{-1/2} (A + I) D~^{-1/2},   D~_ii = sum_j (A + I)_ij,     GCNConv(H) = A^ H W + c.

A^ is symmetric with spectrum in (-1, 1] and top eigenvalue exactly 1 (eigenvector D~^{1/2} 1), so
||A^||_2 = 1 and a ReLU graph convolution is Lipschitz in H with constant ||W||_2 (Zappala et al.,
arXiv 2310.01618, convergence appendix; ``check_convergence`` measures it on a learned operator).

``gcn_adjacency`` gives A^ as the sparse CSR matrix ``GCNConv(normalize=False)`` multiplies with (PyG's
``adj_t`` input: one sparse matrix product per propagation instead of a gather / scatter over the edges),
computed once per graph and reused: a training run calls the model hundreds of times on the same
``edge_index`` (and the plain GCN once per layer), and a random search trains many models on it.

``normalized_adjacency`` builds the same A^ as a matrix (dense or sparse): the reference the tests compare
the message passing with, and the operand of dense spectral checks.
"""
from __future__ import annotations

import warnings

import torch

from iterlayers.errors import ShapeMismatchError, ValidationError

__all__ = ["gcn_edges", "gcn_adjacency", "normalized_adjacency", "edge_index_to_adjacency", "check_edge_index"]

_CACHE: dict = {}  # gcn_adjacency's: key -> (a private copy of edge_index, A^); see there
_CACHE_SIZE = 8


def check_edge_index(edge_index, num_nodes: int) -> torch.Tensor:
    """``edge_index`` must be a ``[2, E]`` integer tensor with node ids in ``[0, num_nodes)``."""
    if not isinstance(edge_index, torch.Tensor) or edge_index.is_floating_point() or edge_index.is_sparse:
        raise ValidationError(f"edge_index must be a [2, E] integer tensor (PyG layout), got "
                              f"{getattr(edge_index, 'dtype', type(edge_index).__name__)}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ShapeMismatchError(f"edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValidationError(f"edge_index holds node ids outside [0, {num_nodes}) (x has {num_nodes} rows)")
    return edge_index.long()


def gcn_edges(edge_index: torch.Tensor, num_nodes: int, *, dtype: torch.dtype = torch.float32):
    """``(edge_index, edge_weight)`` of A^ (PyG's ``gcn_norm`` with self loops): the input of
    ``GCNConv(normalize=False)``, computed once per forward instead of once per Picard step."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    ei = check_edge_index(edge_index, num_nodes)
    return gcn_norm(ei, None, num_nodes, add_self_loops=True, dtype=dtype)


def gcn_adjacency(edge_index: torch.Tensor, num_nodes: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A^ = D~^{-1/2} (A + I) D~^{-1/2} of ``edge_index`` as a sparse CSR ``[N, N]`` matrix whose row i holds the
    weights of the messages node i receives (PyG's ``adj_t``; A^ is symmetric for an undirected graph), for
    ``GCNConv(normalize=False)(h, adj_t)``. The weights are PyG's ``gcn_norm`` (``gcn_edges``).

    Cached by value: a later call with an ``edge_index`` equal to a cached one (``torch.equal`` against a
    private copy taken at the first call, so an in-place change of the caller's tensor is seen), the same
    ``num_nodes``, dtype and device returns the cached matrix; checking costs one comparison of the edge list,
    computing it the normalisation and a sort. The last ``_CACHE_SIZE`` graphs are kept.
    """
    ei = check_edge_index(edge_index, num_nodes)
    key = (id(edge_index), tuple(ei.shape), int(num_nodes), dtype, ei.device)
    hit = _CACHE.get(key)
    if hit is not None and torch.equal(hit[0], ei):
        return hit[1]
    norm_ei, w = gcn_edges(ei, num_nodes, dtype=dtype)
    adj_t = torch.sparse_coo_tensor(norm_ei.flip(0), w, (num_nodes, num_nodes), check_invariants=True)
    with warnings.catch_warnings():  # torch flags its CSR layout as beta at every conversion
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        adj_t = adj_t.coalesce().to_sparse_csr()
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (ei.clone(), adj_t)
    return adj_t


def _check_square(adj: torch.Tensor) -> None:
    if not isinstance(adj, torch.Tensor):
        raise ValidationError(f"adjacency must be a torch.Tensor (dense or sparse), got {type(adj).__name__}")
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ShapeMismatchError(f"adjacency must be a square [N, N] matrix, got shape {tuple(adj.shape)}")


def edge_index_to_adjacency(edge_index: torch.Tensor, num_nodes: int, *, symmetric: bool = True,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sparse COO adjacency (0/1 weights) from an edge list ``[2, E]``; duplicate edges collapse to 1."""
    ei = check_edge_index(edge_index, num_nodes)
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
