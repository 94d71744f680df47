"""PIGN, the Picard Iterative Graph Neural Network (Zappala et al., arXiv 2310.01618, Sec. 5.1).

One weight-tied graph convolution is the operator, iterated with relaxed Picard steps in a latent space:

    H_0     = Dropout(ReLU(X W_enc + b_enc))                                (encoder)
    T(H)    = Dropout(ReLU(A^ H W + c)),   A^ = D~^{-1/2} (A + I) D~^{-1/2}  (one GCN layer, shared)
    H_{n+1} = a_n H_n + (1 - a_n) T(H_n),  n = 0..N-1                      (relaxed Picard, Eq. (1))
    Y       = H_N W_dec + b_dec                                             (linear decoder)

The relaxation (the paper's "smoothing factor") is ``alpha_mode``:
  "uniform"   a_n = alpha for all n (the paper's main setting; alpha swept in 0.30..0.85),
  "learnable" one alpha = sigmoid(theta) learned with the weights, always in (0, 1),
  "scheduled" a_n from ``make_schedule(schedule, N)`` (alpha rising towards 1).
Training backpropagates through all N iterations (the paper's procedure); ``eval_num_iter`` may differ.

Convergence (App. A.3): ReLU is 1-Lipschitz and ||A^||_2 = 1, so in eval mode T is Lipschitz in H with
q <= ||W||_2 (``lipschitz_bound``); when q < 1 the iteration converges at rate a + (1 - a) q. The paper's
PIGN does not constrain W; ``lipschitz=L`` (our extension) caps ||W||_2 at L so that q <= L holds by design.
A plain GCN of depth N would instead apply N *different* convolutions without the a_n H_n term, whose
repeated averaging drives node features together (over-smoothing; measured by ``metrics.mad``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .graph_conv import GraphConv, normalized_adjacency, propagate
from .picard import PicardIteration
from .schedules import SCHEDULES, make_schedule

__all__ = ["PIGN", "PIGNOperator", "ALPHA_MODES"]

ALPHA_MODES = ("uniform", "learnable", "scheduled")


def _pos_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_dropout(p) -> float:
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {p!r}")
    return float(p)


class PIGNOperator(nn.Module):
    """T(H, A^) = Dropout(ReLU(A^ H W + c)): the weight-tied operator PIGN iterates.

    ``lipschitz`` (an extension, not in the paper): if set to L, W is used as W min(1, L / ||W||_2), so the
    eval-mode operator is an L-contraction for L < 1 and Banach's theorem applies to the learned operator.
    """

    def __init__(self, hidden: int, *, dropout: float = 0.5, lipschitz: float | None = None):
        super().__init__()
        self.conv = GraphConv(_pos_int("hidden", hidden), hidden)
        self.dropout = _check_dropout(dropout)
        if lipschitz is not None and not (isinstance(lipschitz, (int, float)) and lipschitz > 0):
            raise ValueError(f"lipschitz must be None or a positive float, got {lipschitz!r}")
        self.lipschitz = None if lipschitz is None else float(lipschitz)

    def _scale(self) -> torch.Tensor | float:
        if self.lipschitz is None:
            return 1.0
        norm = torch.linalg.matrix_norm(self.conv.weight, ord=2)
        return torch.clamp(self.lipschitz / norm, max=1.0)

    def forward(self, h: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
        if self.lipschitz is None:
            out = self.conv(h, a_hat)
        else:
            out = propagate(a_hat, h @ (self._scale() * self.conv.weight))
            out = out + self.conv.bias if self.conv.bias is not None else out
        return F.dropout(F.relu(out), self.dropout, training=self.training)

    def lipschitz_bound(self) -> float:
        """||W_eff||_2: a Lipschitz constant of the eval-mode operator in H (||A^||_2 = 1, ReLU 1-Lipschitz)."""
        w = torch.linalg.matrix_norm(self.conv.weight.detach(), ord=2)
        return float(w if self.lipschitz is None else torch.clamp(w, max=self.lipschitz))

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, lipschitz={self.lipschitz}"


class PIGN(nn.Module):
    """Picard Iterative GNN: encoder, N relaxed Picard steps of one GCN layer, linear decoder (see module doc)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, *, num_iter: int = 4, alpha: float = 0.5,
                 alpha_mode: str = "uniform", schedule: str = "linear", eval_num_iter: int | None = None,
                 dropout: float = 0.5, lipschitz: float | None = None, xavier_init: bool = True):
        super().__init__()
        _pos_int("in_features", in_features), _pos_int("out_features", out_features)
        _pos_int("num_iter", num_iter)
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {alpha_mode!r}")
        if alpha_mode == "scheduled" and schedule not in SCHEDULES[1:]:
            raise ValueError(f"schedule must be one of {SCHEDULES[1:]} with alpha_mode='scheduled', got {schedule!r}")
        self.dropout = _check_dropout(dropout)
        self.alpha_mode = alpha_mode
        self.encoder = nn.Linear(in_features, hidden)
        self.operator = PIGNOperator(hidden, dropout=dropout, lipschitz=lipschitz)
        self.decoder = nn.Linear(hidden, out_features)
        if alpha_mode == "scheduled":
            a = make_schedule(schedule, num_iter)
            self.picard = PicardIteration(self.operator, alpha=a, num_iter=num_iter, eval_num_iter=eval_num_iter)
        else:
            self.picard = PicardIteration(self.operator, alpha=alpha, learnable_alpha=alpha_mode == "learnable",
                                          num_iter=num_iter, eval_num_iter=eval_num_iter)
        if xavier_init:
            for m in (self.encoder, self.decoder):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def alpha(self):
        return self.picard.alpha

    @property
    def num_iter(self) -> int:
        return self.picard.num_iter

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(F.relu(self.encoder(x)), self.dropout, training=self.training)

    def forward(self, x: torch.Tensor, adj: torch.Tensor, *, normalized: bool = False,
                return_hidden: bool = False):
        """Logits [N, C] for node features ``x`` [N, F] and adjacency ``adj`` (raw A, or A^ if ``normalized``)."""
        if x.dim() != 2 or x.shape[0] != adj.shape[0]:
            raise ValueError(f"x must be [N, F] with N = {adj.shape[0]} (adjacency size), got {tuple(x.shape)}")
        a_hat = adj if normalized else normalized_adjacency(adj)
        h = self.picard(a_hat, z0=self.encode(x))
        out = self.decoder(h)
        return (out, h) if return_hidden else out

    @torch.no_grad()
    def hidden_trace(self, x: torch.Tensor, adj: torch.Tensor, *, num_iter: int, normalized: bool = False):
        """H_0..H_n for ``num_iter`` steps (no gradient, current train/eval mode)."""
        a_hat = adj if normalized else normalized_adjacency(adj)
        return self.picard.trace(a_hat, z0=self.encode(x), num_iter=num_iter)

    def extra_repr(self) -> str:
        return f"alpha_mode={self.alpha_mode!r}, dropout={self.dropout}"
