"""An implicit graph neural network (IGNN-style) for transductive node classification.

Model (after Gu, Chang, Zhu, Sojoudi & El Ghaoui, "Implicit Graph Neural Networks", NeurIPS 2020,
arXiv 2009.06211, in the rows-are-nodes layout)::

    U  = A_hat X P^T + p                       (injection: one propagation of the encoded node features)
    Z* = relu(A_hat Z* W^T + U)                (the equilibrium over all N nodes at once; Z is [N, d])
    y_v = H z*_v + c                           (head, for the nodes v of the batch)

``A_hat = D~^{-1/2} (A + I) D~^{-1/2}`` is the normalised adjacency with self loops. The nodes are the rows of
the state, coupled through ``A_hat``: the adjacency reaches the cell as a keyword argument of
``DEQ.forward`` (never sliced), which makes the solve joint over the graph (``stats["forward"].info
["stopping"] == "joint"``).

Well-posedness (derived): ``vec(A Z W^T) = (W kron A) vec(Z)`` and ``||W kron A||_2 = ||W||_2 ||A||_2``, so the
map is a kappa-contraction in the Frobenius norm whenever ``||W||_2 <= kappa / ||A_hat||_2`` with kappa < 1
(relu is 1-Lipschitz). For the symmetric ``A_hat``, ``||A_hat||_2`` is its Perron-Frobenius eigenvalue
lambda_pf, so this is IGNN's condition ``||W|| kappa < 1 / lambda_pf(A)`` with the spectral norm in place of
IGNN's infinity norm. ``W = spectral_cap(V, kappa / lambda_pf)`` (:func:`iterlayers.parametrizations.spectral_cap`)
enforces it after every optimiser step; lambda_pf is computed once per graph (scipy ``eigsh``), not assumed.

The graph (features, adjacency) is fixed data held by the model, built offline by name; a batch is a set of
node ids ``x = [node id, graph fingerprint]`` as produced by ``iterlayers.data.load_dataset("graph:NAME")``.
Every forward pass solves the whole graph and returns the logits of the batch's nodes (exact under DDP: each
process solves the same graph and takes its share of the nodes).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._validate import positive_int, real
from ..errors import ShapeMismatchError, ValidationError
from ..implicit import DEQOptions
from ..layers import DEQ
from ..parametrizations import spectral_cap
from .deq_mlp import DEQClassifier

__all__ = ["IGNNCell", "IGNN", "perron_frobenius", "IGNN_DEQ_OPTIONS"]

#: The graph's nodes are one coupled system, solved jointly. Picard, not Anderson: Anderson mixes each row (node)
#: with its own weights, which on rows coupled through A is not Anderson on the joint system; measured on
#: graph:csbm (700 nodes, kappa 0.9) it took 70 iterations to atol 1e-4 where Picard took 21.
#: The limit: Picard at rate kappa = 0.9 needs log(1e-5) / log(0.9) ~ 110 adjoint iterations once training has
#: pushed ||W|| to its cap (the adjoint's limit is max(max_iter, 50)); 60 left it unconverged.
IGNN_DEQ_OPTIONS = DEQOptions(solver="picard", backward_solver="picard", atol=1e-4, rtol=0.0, max_iter=150,
                              on_failure="ignore")


def perron_frobenius(adj: torch.Tensor) -> float:
    """The largest eigenvalue of a symmetric non-negative (sparse or dense) adjacency, by scipy's ``eigsh``
    (dense ``eigvalsh`` below 64 nodes); for such a matrix it is also its spectral norm."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    n = adj.shape[0]
    if adj.is_sparse:
        a = adj.coalesce()
        i, v = a.indices().cpu().numpy(), a.values().detach().double().cpu().numpy()
        mat = sp.coo_matrix((v, (i[0], i[1])), shape=(n, n)).tocsr()
    else:
        mat = adj.detach().double().cpu().numpy()
    if n < 64:
        dense = mat.toarray() if sp.issparse(mat) else mat
        return float(np.abs(np.linalg.eigvalsh(dense)).max())
    return float(np.abs(eigsh(mat, k=1, which="LM", return_eigenvectors=False)).max())


class IGNNCell(nn.Module):
    """``f(Z, U; A) = relu(A Z W^T + U)`` with ``W = spectral_cap(V, kappa / lambda_pf)``: a kappa-contraction
    for every adjacency ``A`` with ``||A||_2 <= lambda_pf``.

    Args:
        width: feature dimension d of the state.
        kappa: contraction factor in (0, 1).
        lambda_pf: the spectral norm (Perron-Frobenius eigenvalue) of the adjacencies it will see.
    """

    def __init__(self, width: int, *, kappa: float = 0.9, lambda_pf: float = 1.0):
        super().__init__()
        self.width = positive_int(width, "width")
        self.kappa = real(kappa, "kappa")
        if not 0.0 < self.kappa < 1.0:
            raise ValidationError(f"kappa must lie in (0, 1), got {kappa!r}")
        self.lambda_pf = real(lambda_pf, "lambda_pf")
        if not self.lambda_pf > 0:
            raise ValidationError(f"lambda_pf must be positive, got {lambda_pf!r}")
        v = torch.empty(width, width)
        nn.init.orthogonal_(v)
        self.v = nn.Parameter(v * (self.kappa / self.lambda_pf))

    def weight(self) -> torch.Tensor:
        """The effective W, ``||W||_2 <= kappa / lambda_pf``."""
        return spectral_cap(self.v, self.kappa / self.lambda_pf)

    def forward(self, z: torch.Tensor, u: torch.Tensor, *, adj: torch.Tensor) -> torch.Tensor:
        return torch.relu(adj @ (z @ self.weight().T) + u)

    def extra_repr(self) -> str:
        return f"width={self.width}, kappa={self.kappa}, lambda_pf={self.lambda_pf:.6g}"


class IGNN(DEQClassifier):
    """Encoder -> :class:`iterlayers.DEQ` over an :class:`IGNNCell` on the whole graph -> head on the batch's nodes.

    Args:
        in_features: must be 2 (a sample is ``[node id, graph fingerprint]``).
        num_classes: must be the graph's number of classes.
        graph: the name of the offline graph (:data:`iterlayers.operators.graph_data.GRAPHS`), the same as
            the dataset's ``graph:NAME``.
        width: dimension of the node states.
        kappa: contraction factor of the cell.
        **deq_options: fields of :class:`iterlayers.DEQOptions` overriding :data:`IGNN_DEQ_OPTIONS`.
    """

    def __init__(self, in_features: int, num_classes: int, *, graph: str, width: int = 32, kappa: float = 0.9,
                 **deq_options):
        from iterlayers.data import graph_fingerprint
        from iterlayers.operators.graph_conv import normalized_adjacency
        from iterlayers.operators.graph_data import GRAPHS, load_graph

        super().__init__()
        if positive_int(in_features, "in_features") != 2:
            raise ValidationError(f"ignn reads samples [node id, graph fingerprint] (in_features=2), got "
                                  f"in_features={in_features}: train it on data='graph:NAME'")
        if not isinstance(graph, str) or graph not in GRAPHS:
            raise ValidationError(f"graph={graph!r} is not valid; choose one of {', '.join(sorted(GRAPHS))}")
        g = load_graph(graph, seed=0)
        if positive_int(num_classes, "num_classes") != g.num_classes:
            raise ValidationError(f"graph {graph!r} has {g.num_classes} classes, got num_classes={num_classes}")
        adj = normalized_adjacency(g.adj)
        self.graph, self.num_classes, self.fingerprint = graph, g.num_classes, graph_fingerprint(g)
        # The graph is data rebuilt from its name, not weights: non-persistent buffers (they move with .to()).
        # The adjacency is kept as its COO indices and values (DistributedDataParallel broadcasts buffers and
        # refuses sparse ones) and assembled by the ``adj`` property.
        self.register_buffer("features", g.x, persistent=False)
        self.register_buffer("adj_indices", adj.indices(), persistent=False)
        self.register_buffer("adj_values", adj.values(), persistent=False)
        width = positive_int(width, "width")
        self.encoder = nn.Linear(g.num_features, width)
        self.deq = DEQ(IGNNCell(width, kappa=kappa, lambda_pf=perron_frobenius(adj)), IGNN_DEQ_OPTIONS,
                       **deq_options)
        self.head = nn.Linear(width, self.num_classes)

    @property
    def adj(self) -> torch.Tensor:
        """The normalised adjacency ``A_hat`` (sparse COO, ``[N, N]``)."""
        n = self.features.shape[0]
        return torch.sparse_coo_tensor(self.adj_indices, self.adj_values, (n, n), is_coalesced=True,
                                       check_invariants=False)  # built from a coalesced COO

    def nodes(self, x: torch.Tensor) -> torch.Tensor:
        """The node ids of a batch ``[B, 2]``, after checking that it comes from this model's graph."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != 2 or x.is_floating_point():
            raise ShapeMismatchError(f"ignn: a batch is an integer tensor [B, 2] of [node id, graph fingerprint], "
                                     f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if x.numel() and not bool((x[:, 1] == self.fingerprint).all()):
            raise ValidationError(f"ignn: the batch's nodes are not nodes of graph {self.graph!r} (fingerprint "
                                  "mismatch): train on data='graph:" + self.graph + "'")
        ids = x[:, 0]
        if x.numel() and not bool(((ids >= 0) & (ids < self.features.shape[0])).all()):
            raise ValidationError(f"ignn: node ids outside [0, {self.features.shape[0]})")
        return ids

    def embed(self) -> torch.Tensor:
        """The equilibrium node states ``Z*`` of the whole graph ``[N, width]``."""
        adj = self.adj
        return self.deq(adj @ self.encoder(self.features), adj=adj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.nodes(x)
        return self.head(self.embed().index_select(0, ids))

    def extra_repr(self) -> str:
        return f"graph={self.graph!r}, nodes={self.features.shape[0]}, num_classes={self.num_classes}"
