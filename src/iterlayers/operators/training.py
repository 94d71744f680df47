"""Training and selection for node classification as in the co-author code of Zappala et al. (arXiv 2310.01618).

Full-batch semi-supervised training on the labelled nodes: Adam, cross-entropy, a fixed number of epochs
(200), models called PyG-style ``model(x, edge_index)``. Selection sees validation data only:

- ``train_node_classifier`` keeps the weights of the epoch of best *validation* accuracy (checked every
  ``eval_every`` epochs) and never reads ``test_mask``;
- ``random_search`` draws hyper-parameters from a :class:`SearchSpace` (the co-author sweep: N in 2..16,
  lr in [0.001, 0.019], alpha in {0.30, 0.35, ..., 0.85}, weight decay in [0, 5e-3]), trains each and picks
  the best mean validation accuracy;
- ``evaluate`` is the one place a split's accuracy is read; the experiment calls it on the test split once,
  for the selected configuration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from iterlayers import _validate as V

__all__ = ["NodeResult", "train_node_classifier", "evaluate", "accuracy", "SearchSpace", "random_search"]


@dataclass
class NodeResult:
    """What training reports: validation and training accuracy at the best-validation epoch (no test data)."""

    val_acc: float
    train_acc: float
    best_epoch: int
    train_loss: float


def accuracy(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    return float((logits[mask].argmax(1) == y[mask]).float().mean())


@torch.no_grad()
def evaluate(model: nn.Module, data, mask: torch.Tensor, *, x: torch.Tensor | None = None):
    """Eval-mode accuracy of ``model`` on the nodes of ``mask``, and the logits of all nodes."""
    model.eval()
    out = model(data.x if x is None else x, data.edge_index)
    return accuracy(out, data.y, mask), out


def train_node_classifier(model: nn.Module, data, *, x: torch.Tensor | None = None, epochs: int = 200,
                          lr: float = 0.005, weight_decay: float = 5e-4, eval_every: int = 5,
                          seed: int = 0) -> NodeResult:
    """Train ``model`` on ``data.train_mask`` (a PyG ``Data`` or any object with x, edge_index, y, train_mask,
    val_mask); on return the model holds the weights of its best-validation epoch."""
    V.positive_int(epochs, "epochs"), V.positive_int(eval_every, "eval_every")
    x = data.x if x is None else x
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=V.real(lr, "lr"), weight_decay=V.real(weight_decay, "weight_decay"))
    best, state = None, None
    for epoch in range(1, epochs + 1):
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x, data.edge_index)[data.train_mask], data.y[data.train_mask])
        loss.backward()
        opt.step()
        if epoch % eval_every == 0 or epoch == epochs:
            model.eval()
            with torch.no_grad():
                out = model(x, data.edge_index)
            va = accuracy(out, data.y, data.val_mask)
            if best is None or va > best.val_acc:
                best = NodeResult(va, accuracy(out, data.y, data.train_mask), epoch, float(loss.detach()))
                state = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    with torch.no_grad():  # restore by tensor (PyG's Linear writes parametrised weights to state_dict under "weight")
        for t, v in zip((*model.parameters(), *model.buffers()), state):
            t.copy_(v)
    model.eval()
    return best


@dataclass(frozen=True)
class SearchSpace:
    """The co-author random-search space for PIGN (N, lr, alpha, weight decay).

    ``max_iter`` is the range of the iteration count, the paper's N (PIGN's ``max_iter``); each sampled
    config is a dict with keys ``max_iter``, ``lr``, ``alpha``, ``weight_decay``.
    """

    max_iter: tuple[int, int] = (2, 16)
    lr: tuple[float, float] = (0.001, 0.019)
    alpha: tuple[float, ...] = tuple(round(0.30 + 0.05 * i, 2) for i in range(12))
    weight_decay: tuple[float, float] = (0.0, 5e-3)

    def sample(self, n: int, *, seed: int) -> list[dict]:
        rng = np.random.default_rng(seed)
        return [{"max_iter": int(rng.integers(self.max_iter[0], self.max_iter[1] + 1)),
                 "lr": float(rng.uniform(*self.lr)), "alpha": float(rng.choice(self.alpha)),
                 "weight_decay": float(rng.uniform(*self.weight_decay))} for _ in range(V.positive_int(n, "n"))]


def random_search(build: Callable[[dict], nn.Module], data, configs: Sequence[dict], *, seeds: Sequence[int],
                  x: torch.Tensor | None = None, epochs: int = 200, eval_every: int = 5):
    """Train ``build(config)`` for every config and seed; return ``(best_config, trials)`` where the best has
    the highest mean validation accuracy (ties: the earlier config). Test data are never read."""
    trials = []
    for cfg in configs:
        runs = []
        for s in seeds:
            torch.manual_seed(s)
            model = build(cfg)
            r = train_node_classifier(model, data, x=x, epochs=epochs, lr=cfg["lr"],
                                      weight_decay=cfg["weight_decay"], eval_every=eval_every, seed=s)
            runs.append((s, r, model))
        trials.append({"config": dict(cfg), "val_acc": float(np.mean([r.val_acc for _, r, _ in runs])),
                       "runs": runs})
    best = max(range(len(trials)), key=lambda i: (trials[i]["val_acc"], -i))
    return trials[best]["config"], trials
