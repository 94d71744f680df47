"""Plain GCN baselines for PIGN (Zappala et al., arXiv 2310.01618, Sec. 5.1).

- ``GCN``: Kipf & Welling's two-layer network, the paper's baseline,
      Y = A^ Dropout(ReLU(A^ Dropout(X) W_1 + c_1)) W_2 + c_2.
- ``DeepGCN``: the same encoder / decoder as PIGN with N *untied* GCN layers and no relaxation,
      H_0 = Dropout(ReLU(X W_enc)),  H_{l+1} = Dropout(ReLU(A^ H_l W_l + c_l)),  Y = H_N W_dec,
  i.e. equal compute to PIGN with N iterations (N propagations with A^, N hidden x hidden products) but N
  times the operator parameters. Repeated A^ averaging makes its node features collapse as N grows
  (over-smoothing), which PIGN's a_n H_n term counteracts.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .graph_conv import GraphConv, normalized_adjacency
from .pign import _check_dropout, _pos_int

__all__ = ["GCN", "DeepGCN"]


class GCN(nn.Module):
    """Two-layer GCN (Kipf & Welling 2017)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, *, dropout: float = 0.5):
        super().__init__()
        self.conv1 = GraphConv(_pos_int("in_features", in_features), _pos_int("hidden", hidden))
        self.conv2 = GraphConv(hidden, _pos_int("out_features", out_features))
        self.dropout = _check_dropout(dropout)

    def forward(self, x: torch.Tensor, adj: torch.Tensor, *, normalized: bool = False,
                return_hidden: bool = False):
        a_hat = adj if normalized else normalized_adjacency(adj)
        h = F.relu(self.conv1(F.dropout(x, self.dropout, training=self.training), a_hat))
        out = self.conv2(F.dropout(h, self.dropout, training=self.training), a_hat)
        return (out, h) if return_hidden else out

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


class DeepGCN(nn.Module):
    """Encoder, ``num_layers`` untied GCN layers, linear decoder: PIGN's compute without tying or relaxation."""

    def __init__(self, in_features: int, hidden: int, out_features: int, *, num_layers: int = 4,
                 dropout: float = 0.5, xavier_init: bool = True):
        super().__init__()
        self.encoder = nn.Linear(_pos_int("in_features", in_features), _pos_int("hidden", hidden))
        self.layers = nn.ModuleList(GraphConv(hidden, hidden) for _ in range(_pos_int("num_layers", num_layers)))
        self.decoder = nn.Linear(hidden, _pos_int("out_features", out_features))
        self.dropout = _check_dropout(dropout)
        if xavier_init:
            for m in (self.encoder, self.decoder):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, adj: torch.Tensor, *, normalized: bool = False,
                return_hidden: bool = False):
        a_hat = adj if normalized else normalized_adjacency(adj)
        h = F.dropout(F.relu(self.encoder(x)), self.dropout, training=self.training)
        for conv in self.layers:
            h = F.dropout(F.relu(conv(h, a_hat)), self.dropout, training=self.training)
        out = self.decoder(h)
        return (out, h) if return_hidden else out

    def extra_repr(self) -> str:
        return f"num_layers={len(self.layers)}, dropout={self.dropout}"
