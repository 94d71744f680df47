"""Baselines of PIGN as in the co-author code (github SizhuangHe/IterativeMethods), on PyTorch Geometric.

- ``GCN``: the plain N-layer GCN (untied layers, no relaxation),
      H_1 = Dropout(ReLU(GCNConv(X))),  H_{l+1} = Dropout(ReLU(GCNConv_l(H_l))),  Y = GCNConv_N(H_{N-1});
  ``num_layers=2`` is Kipf & Welling's two-layer network (the paper's baseline, lr 0.008, wd 5e-4). Its N
  propagations with *different* weights and no a_n H_n term drive node features together as N grows
  (over-smoothing, measured by ``metrics.output_mad``).
- ``GAT``: two ``GATConv`` layers (Velickovic et al. 2018): ``heads`` x ``hidden`` features with ELU, then one
  head to the classes; dropout on the hidden features and on the attention coefficients.

The iterative GAT is ``PIGN(conv="gat")``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from iterlayers import _validate as V

from .graph_conv import check_edge_index, gcn_adjacency
from .pign import _check_dropout, dropout

__all__ = ["GCN", "GAT"]


class GCN(nn.Module):
    """Plain ``num_layers``-layer GCN (see module doc); ``num_layers >= 2``."""

    def __init__(self, in_features: int, hidden: int, out_features: int, *, num_layers: int = 2,
                 dropout: float = 0.5):
        from torch_geometric.nn import GCNConv

        super().__init__()
        V.integer(num_layers, "num_layers", minimum=2)
        dims = [V.positive_int(in_features, "in_features")] + [V.positive_int(hidden, "hidden")] * (num_layers - 1)
        # A^ is computed once per graph (``gcn_adjacency``), not by every layer at every call
        self.layers = nn.ModuleList(GCNConv(a, b, normalize=False) for a, b in zip(dims[:-1], dims[1:]))
        self.out = GCNConv(hidden, V.positive_int(out_features, "out_features"), normalize=False)
        self.dropout = _check_dropout(dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, *, return_hidden: bool = False):
        adj_t = gcn_adjacency(edge_index, x.shape[0], dtype=x.dtype)
        h = x
        for conv in self.layers:
            h = dropout(F.relu(conv(h, adj_t)), self.dropout, self.training)
        out = self.out(h, adj_t)
        return (out, h) if return_hidden else out

    def extra_repr(self) -> str:
        return f"num_layers={len(self.layers) + 1}, dropout={self.dropout}"


class GAT(nn.Module):
    """Two-layer GAT: GATConv(F -> heads x hidden, concat) + ELU + dropout, GATConv(-> C, one head)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, *, heads: int = 8, dropout: float = 0.6):
        from torch_geometric.nn import GATConv

        super().__init__()
        self.dropout = _check_dropout(dropout)
        heads = V.positive_int(heads, "heads")
        self.conv1 = GATConv(V.positive_int(in_features, "in_features"), V.positive_int(hidden, "hidden"),
                             heads=heads, concat=True, dropout=self.dropout)
        self.conv2 = GATConv(hidden * heads, V.positive_int(out_features, "out_features"), heads=1, concat=False,
                             dropout=self.dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, *, return_hidden: bool = False):
        ei = check_edge_index(edge_index, x.shape[0])
        h = F.dropout(F.elu(self.conv1(x, ei)), self.dropout, training=self.training)
        out = self.conv2(h, ei)
        return (out, h) if return_hidden else out

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"
