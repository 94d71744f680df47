"""MAD (over-smoothing metric) against SciPy / scikit-learn, and the offline graphs with the paper's noise."""
import math

import numpy as np
import pytest
import scipy.spatial.distance
import torch
from sklearn.metrics.pairwise import cosine_distances

from iterlayers.operators import add_feature_noise, load_graph, mad, row_normalize


def test_mad_matches_scipy_and_sklearn():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 5, generator=g, dtype=torch.float64)
    h[3] = 0.0  # a zero row: distance 1 to every other node (sklearn convention)
    D = cosine_distances(h.numpy())
    n = h.shape[0]
    assert mad(h) == pytest.approx(D.sum() / (n * (n - 1)), abs=1e-12)
    assert mad(h, exclude_self=False) == pytest.approx(D.mean(), abs=1e-12)
    nz = np.delete(h.numpy(), 3, axis=0)
    mask = torch.ones(n, dtype=torch.bool)
    mask[3] = False
    assert mad(h, mask=mask) == pytest.approx(scipy.spatial.distance.pdist(nz, "cosine").mean(), abs=1e-12)


def test_mad_extremes():
    same = torch.tensor([[1.0, 2.0]] * 4) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])
    assert mad(same) == pytest.approx(0.0, abs=1e-7)  # fully over-smoothed: one direction
    assert mad(torch.eye(4)) == pytest.approx(1.0)  # orthogonal representations
    assert mad(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="2 nodes"):
        mad(torch.ones(1, 3))


def test_feature_noise_protocol():
    x = row_normalize(torch.rand(20, 7, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(x.sum(1), torch.ones(20))
    for p in (0.0, 0.5, 0.7):
        noisy = add_feature_noise(x, p, seed=3)
        diff = noisy - x
        assert int((diff != 0).sum()) == math.floor(p * x.numel())  # exactly floor(p * F * N) entries ...
        torch.testing.assert_close(diff[diff != 0], torch.ones(math.floor(p * x.numel())))  # ... get +1
    torch.testing.assert_close(add_feature_noise(x, 0.5, seed=3), add_feature_noise(x, 0.5, seed=3))
    with pytest.raises(ValueError, match="noise fraction"):
        add_feature_noise(x, 1.5)


@pytest.mark.parametrize("name", ["csbm", "sbm", "karate", "davis", "lesmis"])
def test_graphs_are_well_formed(name):
    kw = {"csbm": dict(num_nodes=140, num_classes=4, num_val=30, num_test=60)}.get(name, {})
    g = load_graph(name, **kw)
    A = g.adj.to_dense()
    assert torch.equal(A, A.T) and float(A.diagonal().abs().sum()) == 0.0
    assert set(A.unique().tolist()) <= {0.0, 1.0}
    masks = torch.stack([g.train_mask, g.val_mask, g.test_mask]).int()
    assert int(masks.sum(0).max()) == 1 and int(g.test_mask.sum()) > 0
    assert int(g.y.max()) + 1 == g.num_classes and g.x.shape[0] == g.num_nodes
    rows = g.x.sum(1)
    torch.testing.assert_close(rows[rows != 0], torch.ones(int((rows != 0).sum())))
    if name == "csbm":  # homophilous like a citation graph
        i, j = g.adj.coalesce().indices()
        assert float((g.y[i] == g.y[j]).float().mean()) > 0.6
    if name == "karate":
        assert g.num_nodes == 34 and int(A.sum()) == 2 * 78


def test_unknown_graph():
    with pytest.raises(ValueError, match="unknown graph"):
        load_graph("cora")


def test_output_mad_is_the_mean_cosine_distance_of_softmax_outputs_over_all_pairs():
    from iterlayers.operators import output_mad

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(11, 4, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits, dim=1).numpy()
    assert output_mad(logits) == pytest.approx(cosine_distances(probs).mean(), abs=1e-12)  # diagonal included
    assert output_mad(torch.zeros(5, 3)) == pytest.approx(0.0, abs=1e-12)  # one prediction everywhere
    # confident predictions of C balanced classes: 1 - 1/C
    assert output_mad(100.0 * torch.eye(4).repeat(3, 1)) == pytest.approx(1 - 1 / 4, abs=1e-9)


@pytest.mark.parametrize("name", ["cora", "citeseer"])
def test_planetoid_shaped_substitute_and_pyg_data(name):
    from iterlayers.operators import PLANETOID_SHAPES, planetoid_like

    s = PLANETOID_SHAPES[name]
    g = planetoid_like(name, scale=0.1, seed=0)
    assert g.num_nodes == round(s["num_nodes"] * 0.1) and g.num_features == round(s["num_features"] * 0.1)
    assert g.num_classes == s["num_classes"] and int(g.train_mask.sum()) <= 20 * s["num_classes"]
    assert int(g.val_mask.sum()) == 50 and int((g.test_mask).sum()) > 0
    nz = (g.x != 0).sum(1, keepdim=True).clamp_min(1)  # binary bag of words, row-normalised: 1/(words) each
    torch.testing.assert_close(g.x, (g.x != 0).float() / nz)
    d = g.to_pyg()
    assert d.num_nodes == g.num_nodes and d.edge_index.shape[0] == 2 and d.edge_index.shape[1] == 2 * (
        int(g.adj._nnz()) // 2)
    assert torch.equal(d.y, g.y) and torch.equal(d.test_mask, g.test_mask)
    i, j = d.edge_index
    assert float((g.y[i] == g.y[j]).float().mean()) > 0.6  # homophilous like the citation graphs
