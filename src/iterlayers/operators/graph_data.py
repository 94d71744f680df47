"""Offline node-classification graphs for the PIGN experiments (nothing is downloaded).

Zappala et al. (arXiv 2310.01618, Sec. 5.1) use the Planetoid citation graphs Cora / CiteSeer / PubMed
(bag-of-words features, row-normalised, semi-supervised split of 20 labelled nodes per class) with a
*feature-noise* protocol: after row normalisation, +1 is added to a random fraction p in {0, 0.5, 0.7} of all
feature entries. Those graphs need a download, so this module builds named substitutes:

- ``csbm``       SUBSTITUTE for Cora/CiteSeer/PubMed: a contextual stochastic block model (Deshpande et al.
                 2018) with *bag-of-words* features: class c has a topic distribution over the vocabulary, each
                 node draws ``words_per_node`` words from a mix of its topic and a uniform background; edges
                 with probability p_in within a class and p_out across (homophilous like citation graphs).
- ``sbm``        a plain stochastic block model (networkx) with identity features (structure only).
- ``digits_knn`` SUBSTITUTE graph from data: k-NN graph over scikit-learn's digits (1797 nodes, 64 pixel
                 features, 10 classes).
- ``karate``, ``davis``, ``lesmis``: networkx's bundled graphs (Zachary's karate club with its two clubs as
                 labels; Davis' southern women and Les Miserables with Louvain communities as labels),
                 identity features; tiny sanity-check graphs.

Every loader returns a :class:`GraphData` with a row-normalised feature matrix, a sparse COO adjacency
(no self loops; models add them) and Planetoid-style masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .graph_conv import edge_index_to_adjacency
from iterlayers.errors import ValidationError

__all__ = ["GraphData", "add_feature_noise", "row_normalize", "load_graph", "GRAPHS", "planetoid_like",
           "PLANETOID_SHAPES",
           "contextual_sbm", "stochastic_block_model", "digits_knn", "networkx_graph"]


@dataclass
class GraphData:
    """One node-classification graph: x [N, F] float32, adj sparse COO [N, N], y [N] int64, bool masks."""

    name: str
    x: torch.Tensor
    adj: torch.Tensor
    y: torch.Tensor
    train_mask: torch.Tensor
    val_mask: torch.Tensor
    test_mask: torch.Tensor
    num_classes: int
    substitute_for: str | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def edge_index(self) -> torch.Tensor:
        """The PyG edge list ``[2, E]`` (both directions of every undirected edge)."""
        return self.adj.coalesce().indices()

    def to_pyg(self, x: torch.Tensor | None = None):
        """A ``torch_geometric.data.Data`` with x, edge_index, y and the three masks (``x`` replaces the
        features, e.g. by a noisy copy)."""
        from torch_geometric.data import Data

        return Data(x=self.x if x is None else x, edge_index=self.edge_index, y=self.y, train_mask=self.train_mask,
                    val_mask=self.val_mask, test_mask=self.test_mask, num_classes=self.num_classes)

    def with_features(self, x: torch.Tensor) -> "GraphData":
        return GraphData(self.name, x, self.adj, self.y, self.train_mask, self.val_mask, self.test_mask,
                         self.num_classes, self.substitute_for)

    def __repr__(self) -> str:
        ne = int(self.adj._nnz()) // 2 if self.adj.is_sparse else int((self.adj != 0).sum()) // 2
        return (f"GraphData({self.name!r}, nodes={self.num_nodes}, edges={ne}, features={self.num_features}, "
                f"classes={self.num_classes}, train/val/test={int(self.train_mask.sum())}/"
                f"{int(self.val_mask.sum())}/{int(self.test_mask.sum())}"
                + (f", substitute_for={self.substitute_for!r}" if self.substitute_for else "") + ")")


def row_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum 1 (torch_geometric's NormalizeFeatures); all-zero rows stay zero."""
    s = x.sum(1, keepdim=True)
    return torch.where(s != 0, x / torch.where(s != 0, s, torch.ones_like(s)), x)


def add_feature_noise(x: torch.Tensor, p: float, *, seed: int = 0) -> torch.Tensor:
    """The paper's noise protocol: +1 on exactly floor(p * x.numel()) entries chosen uniformly at random."""
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValidationError(f"noise fraction p must be in [0, 1], got {p!r}")
    if p == 0:
        return x.clone()
    k = int(math.floor(p * x.numel()))
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(x.numel(), generator=g)[:k]
    noise = torch.zeros(x.numel(), dtype=x.dtype)
    noise[idx] = 1.0
    return x + noise.reshape(x.shape)


def _planetoid_masks(y: np.ndarray, num_classes: int, *, per_class: int, num_val: int, num_test: int,
                     rng: np.random.Generator):
    n = len(y)
    train = np.zeros(n, bool)
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        train[rng.choice(idx, size=min(per_class, max(1, len(idx) // 2)), replace=False)] = True
    rest = rng.permutation(np.flatnonzero(~train))
    num_val = min(num_val, len(rest) // 2)
    val = np.zeros(n, bool)
    val[rest[:num_val]] = True
    test = np.zeros(n, bool)
    test[rest[num_val:num_val + num_test]] = True
    return (torch.from_numpy(train), torch.from_numpy(val), torch.from_numpy(test))


def _adj_from_edges(edges: np.ndarray, n: int) -> torch.Tensor:
    if len(edges) == 0:
        empty = torch.zeros(2, 0, dtype=torch.long)
        return torch.sparse_coo_tensor(empty, torch.zeros(0), (n, n), check_invariants=True).coalesce()
    ei = torch.as_tensor(np.asarray(edges).T, dtype=torch.long)
    ei = ei[:, ei[0] != ei[1]]
    return edge_index_to_adjacency(ei, n)


def contextual_sbm(*, num_nodes: int = 700, num_classes: int = 7, degree_in: float = 3.5, degree_out: float = 0.6,
                   num_features: int = 300, words_per_node: int = 18, topic_words: int = 40,
                   topic_weight: float = 0.25, per_class: int = 20, num_val: int = 200, num_test: int = 400,
                   seed: int = 0) -> GraphData:
    """Cora-like contextual SBM with binary bag-of-words features (substitute for Cora/CiteSeer/PubMed).

    Node i of class c draws ``words_per_node`` words; each is, with probability ``topic_weight``, one of
    class c's ``topic_words`` vocabulary entries and otherwise uniform over the vocabulary. Features are the
    binary word-presence vector, row-normalised. Edges: expected ``degree_in`` neighbours in the own class
    and ``degree_out`` in the others (Cora: mean degree 3.9, edge homophily 0.81).
    """
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), int(math.ceil(num_nodes / num_classes)))[:num_nodes]
    rng.shuffle(y)
    topics = [rng.choice(num_features, size=topic_words, replace=False) for _ in range(num_classes)]
    x = np.zeros((num_nodes, num_features), np.float32)
    for i in range(num_nodes):
        from_topic = rng.random(words_per_node) < topic_weight
        words = np.where(from_topic, rng.choice(topics[y[i]], size=words_per_node),
                         rng.integers(0, num_features, size=words_per_node))
        x[i, words] = 1.0
    size = num_nodes / num_classes
    p_in, p_out = min(1.0, degree_in / max(size - 1, 1)), min(1.0, degree_out / max(num_nodes - size, 1))
    same = y[:, None] == y[None, :]
    probs = np.where(same, p_in, p_out)
    upper = np.triu(rng.random((num_nodes, num_nodes)) < probs, k=1)
    edges = np.argwhere(upper)
    masks = _planetoid_masks(y, num_classes, per_class=per_class, num_val=num_val, num_test=num_test, rng=rng)
    return GraphData("csbm", row_normalize(torch.from_numpy(x)), _adj_from_edges(edges, num_nodes),
                     torch.from_numpy(y.astype(np.int64)), *masks, num_classes, substitute_for="Cora/CiteSeer/PubMed")


# The shapes of the Planetoid graphs (nodes, bag-of-words features, classes, mean words per node, mean degree)
# with the public split (20 labels per class, 500 validation, 1,000 test nodes).
PLANETOID_SHAPES = {
    "cora": dict(num_nodes=2708, num_features=1433, num_classes=7, words_per_node=18, degree=3.9),
    "citeseer": dict(num_nodes=3327, num_features=3703, num_classes=6, words_per_node=32, degree=2.7),
}


def planetoid_like(name: str, *, scale: float = 1.0, homophily: float = 0.8, seed: int = 0) -> GraphData:
    """SUBSTITUTE for a Planetoid graph: a contextual SBM of its shape (``PLANETOID_SHAPES``) with the public
    split 20 per class / 500 / 1,000. ``scale < 1`` shrinks nodes, features and the validation / test sets
    proportionally (the quick setting); ``homophily`` is the expected fraction of within-class edges."""
    if name not in PLANETOID_SHAPES:
        raise ValidationError(f"unknown Planetoid shape {name!r}; valid: {sorted(PLANETOID_SHAPES)}")
    if not (isinstance(scale, (int, float)) and 0 < scale <= 1):
        raise ValidationError(f"scale must be in (0, 1], got {scale!r}")
    s = PLANETOID_SHAPES[name]
    deg = s["degree"]
    g = contextual_sbm(num_nodes=int(round(s["num_nodes"] * scale)), num_classes=s["num_classes"],
                       num_features=int(round(s["num_features"] * scale)), words_per_node=s["words_per_node"],
                       topic_words=max(10, int(round(40 * scale))), degree_in=homophily * deg,
                       degree_out=(1 - homophily) * deg, per_class=20, num_val=int(round(500 * scale)),
                       num_test=int(round(1000 * scale)), seed=seed)
    g.name = f"{name}_csbm" if scale == 1 else f"{name}_csbm_x{scale:g}"
    g.substitute_for = name
    return g


def stochastic_block_model(*, sizes=(60, 60, 60), p_in: float = 0.15, p_out: float = 0.02, per_class: int = 5,
                           seed: int = 0) -> GraphData:
    """networkx's stochastic block model, identity (one-hot node id) features, blocks as labels."""
    import networkx as nx

    k = len(sizes)
    probs = [[p_in if i == j else p_out for j in range(k)] for i in range(k)]
    g = nx.stochastic_block_model(list(sizes), probs, seed=int(seed))
    y = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    return _from_networkx(g, y, "sbm", per_class=per_class, seed=seed)


def digits_knn(*, k: int = 10, per_class: int = 20, num_val: int = 300, num_test: int = 1000,
               seed: int = 0) -> GraphData:
    """k-NN graph (symmetrised) over scikit-learn's bundled digits; pixel features (/16), row-normalised."""
    from sklearn.datasets import load_digits
    from sklearn.neighbors import kneighbors_graph

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    a = kneighbors_graph(x, n_neighbors=k, mode="connectivity", include_self=False).tocoo()
    edges = np.stack([a.row, a.col], 1)
    rng = np.random.default_rng(seed)
    masks = _planetoid_masks(y, 10, per_class=per_class, num_val=num_val, num_test=num_test, rng=rng)
    return GraphData("digits_knn", row_normalize(torch.from_numpy(x)), _adj_from_edges(edges, len(y)),
                     torch.from_numpy(y), *masks, 10, substitute_for="Cora/CiteSeer/PubMed (graph from data)")


def _from_networkx(g, y: np.ndarray, name: str, *, per_class: int, seed: int) -> GraphData:
    import networkx as nx

    g = nx.convert_node_labels_to_integers(g, ordering="default")
    n = g.number_of_nodes()
    edges = np.array([(u, v) for u, v in g.edges()], dtype=np.int64).reshape(-1, 2)
    nc = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    masks = _planetoid_masks(y, nc, per_class=per_class, num_val=n // 4, num_test=n, rng=rng)
    return GraphData(name, torch.eye(n), _adj_from_edges(edges, n), torch.from_numpy(y.astype(np.int64)),
                     *masks, nc)


def networkx_graph(name: str, *, per_class: int = 2, seed: int = 0) -> GraphData:
    """One of networkx's bundled graphs: ``karate`` (clubs), ``davis`` / ``lesmis`` (Louvain communities)."""
    import networkx as nx

    if name == "karate":
        g = nx.karate_club_graph()
        y = np.array([0 if g.nodes[v]["club"] == "Mr. Hi" else 1 for v in g.nodes()])
    elif name in ("davis", "lesmis"):
        g = nx.davis_southern_women_graph() if name == "davis" else nx.les_miserables_graph()
        g = nx.convert_node_labels_to_integers(g, ordering="default")
        comms = nx.community.louvain_communities(g, seed=int(seed))
        y = np.zeros(g.number_of_nodes(), np.int64)
        for c, nodes in enumerate(sorted(comms, key=lambda s: -len(s))):
            y[list(nodes)] = c
    else:
        raise ValidationError(f"unknown networkx graph {name!r}; valid: 'karate', 'davis', 'lesmis'")
    return _from_networkx(g, y, name, per_class=per_class, seed=seed)


GRAPHS = {
    "csbm": contextual_sbm,
    "cora_csbm": lambda **kw: planetoid_like("cora", **kw),
    "citeseer_csbm": lambda **kw: planetoid_like("citeseer", **kw),
    "sbm": stochastic_block_model,
    "digits_knn": digits_knn,
    "karate": lambda **kw: networkx_graph("karate", **kw),
    "davis": lambda **kw: networkx_graph("davis", **kw),
    "lesmis": lambda **kw: networkx_graph("lesmis", **kw),
}


def load_graph(name: str, **kwargs) -> GraphData:
    """A graph by name (see ``GRAPHS``); keyword options go to its builder."""
    if name not in GRAPHS:
        raise ValidationError(f"unknown graph {name!r}; valid: {sorted(GRAPHS)}")
    return GRAPHS[name](**kwargs)
