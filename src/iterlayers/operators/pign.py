"""PIGN, the Picard Iterative Graph Neural Network (Zappala et al., arXiv 2310.01618, Sec. 5.1), on PyG.

One weight-tied graph convolution is the operator, iterated with relaxed Picard steps in a latent space:

    H_0     = Dropout(ReLU(X W_enc + b_enc))                                (encoder)
    T(H)    = Dropout(ReLU(A^ H W + c)),   A^ = D~^{-1/2} (A + I) D~^{-1/2}  (one GCNConv, shared)
    H_{n+1} = a_n H_n + (1 - a_n) T(H_n),  n = 0..N-1                      (relaxed Picard)
    Y       = H_N W_dec + b_dec                                             (linear decoder)

``conv="gat"`` iterates one ``GATConv`` (``heads`` heads averaged, attention dropout) instead: the
co-author code's iterative GAT. A graph is passed the PyG way, ``model(data.x, data.edge_index)``.

The relaxation (the paper's "smoothing factor") is ``alpha_mode``:
  "uniform"   a_n = alpha for all n (the paper's main setting; alpha searched in 0.30..0.85),
  "learnable" one alpha = sigmoid(theta) learned with the weights, always in (0, 1),
  "scheduled" a_n from ``make_schedule(schedule, N)``.
Training backpropagates through all N iterations (the paper's procedure); ``eval_max_iter`` may differ.

Convergence: ReLU is 1-Lipschitz and ||A^||_2 = 1, so in eval mode (no dropout) the GCN operator is
Lipschitz in H with q <= ||W||_2 (``lipschitz_bound``); when q < 1 the iteration converges at rate at most
a + (1 - a) q (Banach). The paper's PIGN does not constrain W. ``lipschitz=L`` (ours) reparametrises
W -> W min(1, L / ||W||_2) with the exact spectral norm, so q <= L holds by design and, for L < 1, the
learned operator is a contraction whose fixed point the iteration reaches (``fixed_point``).

A contraction forgets its starting point: without an input term its fixed point H* does not depend on X
at all (T above sees X only through H_0), so a convergent PIGN predicts the same thing for any features
(derived here; observed: it trains to chance). ``inject=True`` (ours) therefore adds the encoded input
U = H_0 inside the operator, T(H; U) = Dropout(ReLU(A^ H W + c + U)), as in implicit / equilibrium GNNs;
its Lipschitz constant in H is still ||W||_2 and its fixed point is a function of X.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from iterlayers import _validate as V
from iterlayers import deq_solve
from iterlayers.errors import ShapeMismatchError, ValidationError
from iterlayers.parametrizations import spectral_cap

from .graph_conv import check_edge_index, gcn_adjacency
from .picard import PicardIteration, relative_steps, relaxed_picard
from .schedules import SCHEDULES, make_schedule

__all__ = ["PIGN", "PIGNOperator", "GATOperator", "SpectralCap", "ALPHA_MODES", "CONVS", "dropout"]

ALPHA_MODES = ("uniform", "learnable", "scheduled")
CONVS = ("gcn", "gat")


def dropout(h: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, the distribution of ``F.dropout``: each entry kept with probability 1 - p and scaled by
    1 / (1 - p) (training), the identity otherwise. The mask is ``torch.rand(...) >= p``: on CPU that sampler
    is about twice as fast as ``F.dropout``'s Bernoulli one (measured on [2708, 32]: 0.9 vs 1.9 ms), and PIGN
    draws a mask at every Picard step (the co-author's operator has its dropout inside)."""
    if not training or p == 0.0:
        return h
    return h * ((torch.rand_like(h) >= p).to(h.dtype) / (1.0 - p))


def _check_dropout(p, name: str = "dropout") -> float:
    p = V.real(p, name)
    if not 0.0 <= p < 1.0:
        raise ValidationError(f"{name} must be in [0, 1), got {p!r}")
    return p


class SpectralCap(nn.Module):
    """Parametrisation W -> W min(1, L / ||W||_2) (exact top singular value; differentiable)."""

    def __init__(self, bound: float):
        super().__init__()
        self.bound = V.real(bound, "lipschitz")
        if not self.bound > 0:
            raise ValidationError(f"lipschitz must be None or a positive number, got {bound!r}")

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return spectral_cap(w, self.bound)

    def extra_repr(self) -> str:
        return f"bound={self.bound:g}"


class PIGNOperator(nn.Module):
    """T(H, g) = Dropout(ReLU(A^ H W + c [+ U])) with ``g = (adj_t,)``, A^ as a sparse CSR matrix
    (``gcn_adjacency``), or ``g = (adj_t, U)`` with an injected input U (the encoded features, ``inject=True``)."""

    def __init__(self, hidden: int, *, dropout: float = 0.5, lipschitz: float | None = None):
        from torch_geometric.nn import GCNConv

        super().__init__()
        self.conv = GCNConv(V.positive_int(hidden, "hidden"), hidden, normalize=False)
        self.dropout = _check_dropout(dropout)
        self.lipschitz = None if lipschitz is None else SpectralCap(lipschitz).bound
        if self.lipschitz is not None:
            parametrize.register_parametrization(self.conv.lin, "weight", SpectralCap(self.lipschitz))

    @property
    def weight(self) -> torch.Tensor:
        """The effective W (PyG stores it transposed, ``[out, in]``; the norm is the same)."""
        return self.conv.lin.weight

    def forward(self, h: torch.Tensor, graph) -> torch.Tensor:
        adj_t, *u = graph
        pre = self.conv(h, adj_t)
        pre = pre + u[0] if u else pre
        return dropout(F.relu(pre), self.dropout, self.training)

    def lipschitz_bound(self) -> float:
        """||W||_2: a Lipschitz constant of the eval-mode operator in H (||A^||_2 = 1, ReLU 1-Lipschitz)."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.weight.double(), ord=2))

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, lipschitz={self.lipschitz}"


class GATOperator(nn.Module):
    """T(H, edge_index) = Dropout(ReLU(GATConv(H))) with ``heads`` attention heads averaged."""

    def __init__(self, hidden: int, *, heads: int = 8, dropout: float = 0.6, attn_dropout: float = 0.6):
        from torch_geometric.nn import GATConv

        super().__init__()
        self.conv = GATConv(V.positive_int(hidden, "hidden"), hidden, heads=V.positive_int(heads, "heads"),
                            concat=False, dropout=_check_dropout(attn_dropout, "attn_dropout"))
        self.dropout = _check_dropout(dropout)

    def forward(self, h: torch.Tensor, edge_index) -> torch.Tensor:
        return F.dropout(F.relu(self.conv(h, edge_index)), self.dropout, training=self.training)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


class PIGN(nn.Module):
    """Picard Iterative GNN: encoder, N relaxed Picard steps of one graph convolution, linear decoder.

    ``dropout`` applies to the encoder output and (unless ``operator_dropout`` is given) inside the operator.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, *, conv: str = "gcn", heads: int = 8,
                 max_iter: int = 4, alpha: float = 0.5, alpha_mode: str = "uniform", schedule: str = "linear",
                 eval_max_iter: int | None = None, dropout: float = 0.5, operator_dropout: float | None = None,
                 lipschitz: float | None = None, inject: bool = False, xavier_init: bool = True):
        super().__init__()
        V.positive_int(in_features, "in_features"), V.positive_int(out_features, "out_features")
        V.positive_int(max_iter, "max_iter")
        self.conv_kind = V.choice(conv, "conv", CONVS)
        self.alpha_mode = V.choice(alpha_mode, "alpha_mode", ALPHA_MODES)
        if alpha_mode == "scheduled" and schedule not in SCHEDULES[1:]:
            raise ValidationError(f"schedule must be one of {SCHEDULES[1:]} with alpha_mode='scheduled', "
                                  f"got {schedule!r}")
        if conv == "gat" and (lipschitz is not None or inject):
            raise ValidationError("lipschitz / inject are available for conv='gcn' only (GAT's attention has no "
                                  "such bound)")
        self.inject = V.boolean(inject, "inject")
        self.dropout = _check_dropout(dropout)
        op_drop = self.dropout if operator_dropout is None else _check_dropout(operator_dropout, "operator_dropout")
        self.encoder = nn.Linear(in_features, hidden)
        if conv == "gcn":
            self.operator = PIGNOperator(hidden, dropout=op_drop, lipschitz=lipschitz)
        else:
            self.operator = GATOperator(hidden, heads=heads, dropout=op_drop, attn_dropout=op_drop)
        self.decoder = nn.Linear(hidden, out_features)
        if alpha_mode == "scheduled":
            self.picard = PicardIteration(self.operator, alpha=make_schedule(schedule, max_iter), max_iter=max_iter,
                                          eval_max_iter=eval_max_iter)
        else:
            self.picard = PicardIteration(self.operator, alpha=alpha, learnable_alpha=alpha_mode == "learnable",
                                          max_iter=max_iter, eval_max_iter=eval_max_iter)
        if xavier_init:  # the co-author code: Xavier-normal encoder / decoder (PyG convs are Glorot already)
            for m in (self.encoder, self.decoder):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def alpha(self):
        return self.picard.alpha

    @property
    def max_iter(self) -> int:
        return self.picard.max_iter

    def graph(self, edge_index: torch.Tensor, num_nodes: int, dtype: torch.dtype = torch.float32):
        """What the operator receives as its input: ``(A^,)`` as a sparse CSR matrix (GCN; ``gcn_adjacency``, cached
        per graph) or ``edge_index`` (GAT)."""
        if self.conv_kind == "gcn":
            return (gcn_adjacency(edge_index, num_nodes, dtype=dtype),)
        return check_edge_index(edge_index, num_nodes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(F.relu(self.encoder(x)), self.dropout, self.training)

    def _inputs(self, x, edge_index):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.encoder.in_features:
            raise ShapeMismatchError(f"x must be [num_nodes, {self.encoder.in_features}], "
                                     f"got {tuple(getattr(x, 'shape', ()))}")
        g, h0 = self.graph(edge_index, x.shape[0], x.dtype), self.encode(x)
        return ((*g, h0) if self.inject else g), h0

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, *, return_hidden: bool = False):
        """Logits [N, C] for node features ``x`` [N, F] and a PyG ``edge_index`` [2, E]."""
        g, h0 = self._inputs(x, edge_index)
        h = self.picard(g, z0=h0)
        out = self.decoder(h)
        return (out, h) if return_hidden else out

    @torch.no_grad()
    def logits_trace(self, x: torch.Tensor, edge_index: torch.Tensor, *, max_iter: int, alpha=None):
        """Decoded logits of H_0..H_n for ``max_iter`` steps (no gradient, current mode); ``alpha`` (a float or
        a schedule) replaces the model's relaxation, e.g. an evaluation-time schedule. Also returns the
        relative-step residuals of the run."""
        g, h0 = self._inputs(x, edge_index)
        run = relaxed_picard(self.operator, h0, g, alpha=self.alpha if alpha is None else alpha,
                             max_iter=V.positive_int(max_iter, "max_iter"), return_iterates=True)
        return [self.decoder(h) for h in run.iterates], relative_steps(run.iterates)

    @torch.no_grad()
    def fixed_point(self, x: torch.Tensor, edge_index: torch.Tensor, *, tol: float = 1e-5, max_iter: int = 500,
                    solver: str = "anderson"):
        """Logits at the fixed point H* = R_a(H*) of the eval-mode operator, solved by the core ``deq_solve``
        with the whole graph as one state (nodes are coupled through A^), and the solve's statistics."""
        g, h0 = self._inputs(x, edge_index)
        shape = h0.shape
        stats: dict = {}
        w = deq_solve(lambda w: self.picard.relaxed(w.reshape(shape), g).reshape(1, -1), h0.reshape(1, -1),
                      solver=solver, atol=0.0, rtol=V.real(tol, "tol"), max_iter=V.positive_int(max_iter, "max_iter"),
                      on_failure="ignore", stats=stats)
        return self.decoder(w.reshape(shape)), stats["forward"]

    def extra_repr(self) -> str:
        return f"conv={self.conv_kind!r}, alpha_mode={self.alpha_mode!r}, dropout={self.dropout}, inject={self.inject}"
