"""The paper's training procedure for node classification (Zappala et al., arXiv 2310.01618, Sec. 5.1).

Full-batch semi-supervised training on the labelled nodes: Adam (lr 0.005, weight decay 4e-4), cross-entropy,
a fixed number of epochs (200 in the paper), dropout 0.5, hidden width 32; iterative models backpropagate
through all their Picard iterations. The reported test accuracy is the one at the epoch of best validation
accuracy (checked every ``eval_every`` epochs), and over-smoothing is measured by the MAD of the final hidden
node representations of that epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .graph_data import GraphData
from .metrics import mad

__all__ = ["NodeResult", "train_node_classifier", "accuracy"]


@dataclass
class NodeResult:
    val_acc: float
    test_acc: float
    train_acc: float
    mad: float
    best_epoch: int
    hidden: torch.Tensor  # hidden node representations at the best epoch (eval mode)


def accuracy(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    return float((logits[mask].argmax(1) == y[mask]).float().mean())


def train_node_classifier(model: nn.Module, data: GraphData, a_hat: torch.Tensor, *, x: torch.Tensor | None = None,
                          epochs: int = 200, lr: float = 0.005, weight_decay: float = 4e-4, eval_every: int = 5,
                          seed: int = 0) -> NodeResult:
    """Train ``model(x, a_hat, normalized=True, return_hidden=...)`` on ``data``'s train mask; see module doc."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive int, got {eval_every!r}")
    x = data.x if x is None else x
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best: NodeResult | None = None
    for epoch in range(1, epochs + 1):
        model.train()
        opt.zero_grad()
        out = model(x, a_hat, normalized=True)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
        if epoch % eval_every == 0 or epoch == epochs:
            model.eval()
            with torch.no_grad():
                out, h = model(x, a_hat, normalized=True, return_hidden=True)
            va = accuracy(out, data.y, data.val_mask)
            if best is None or va > best.val_acc:
                best = NodeResult(va, accuracy(out, data.y, data.test_mask), accuracy(out, data.y, data.train_mask),
                                  mad(h), epoch, h.detach())
    return best
