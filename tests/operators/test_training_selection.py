"""The co-author protocol's selection sees validation data only: poisoning the test split changes nothing."""
import pytest
import torch

from iterlayers.operators import PIGN, SearchSpace, add_feature_noise, planetoid_like, random_search
from iterlayers.operators.training import train_node_classifier


def _data():
    g = planetoid_like("cora", scale=0.1, seed=0)
    return g.to_pyg(add_feature_noise(g.x, 0.5, seed=1))


def _poisoned(d):
    """Every test label shifted to a wrong class (features stay: the setting is transductive, all nodes' features
    are inputs); any use of the test labels by the selection would show."""
    p = d.clone()
    idx = p.test_mask.nonzero().flatten()
    p.y = p.y.clone()
    p.y[idx] = (p.y[idx] + 1) % int(p.y.max() + 1)
    return p


def test_search_space_draws_the_co_author_ranges():
    cfgs = SearchSpace().sample(200, seed=0)
    assert all(2 <= c["max_iter"] <= 16 and 0.001 <= c["lr"] <= 0.019 and 0.0 <= c["weight_decay"] <= 5e-3
               for c in cfgs)
    assert {round(c["alpha"], 2) for c in cfgs} <= {round(0.30 + 0.05 * i, 2) for i in range(12)}
    assert SearchSpace().sample(5, seed=3) == SearchSpace().sample(5, seed=3)
    assert {c["max_iter"] for c in SearchSpace(max_iter=(4, 4)).sample(3, seed=0)} == {4}
    with pytest.raises(TypeError):  # #14: the iteration count is max_iter, no alias for the old name
        SearchSpace(num_iter=(2, 3))


def test_selection_is_unchanged_when_the_test_split_is_poisoned():
    d = _data()
    bad = _poisoned(d)
    assert bool((bad.y[d.test_mask] != d.y[d.test_mask]).all())
    cfgs = SearchSpace(max_iter=(2, 3)).sample(3, seed=0)
    f, c = d.x.shape[1], int(d.y.max() + 1)
    build = lambda h: PIGN(f, 8, c, max_iter=h["max_iter"], alpha=h["alpha"])  # noqa: E731
    best, trials = random_search(build, d, cfgs, seeds=[0], epochs=15)
    best_bad, trials_bad = random_search(build, bad, cfgs, seeds=[0], epochs=15)
    assert best == best_bad
    assert [t["val_acc"] for t in trials] == [t["val_acc"] for t in trials_bad]
    assert len({t["val_acc"] for t in trials}) > 1  # the selection had something to choose between
    # the best-epoch choice inside training is validation-only too
    torch.manual_seed(0)
    r = train_node_classifier(build(best), d, epochs=15, lr=best["lr"], seed=0)
    torch.manual_seed(0)
    r_bad = train_node_classifier(build(best), bad, epochs=15, lr=best["lr"], seed=0)
    assert r == r_bad


def test_training_keeps_the_best_validation_weights():
    d = _data()
    torch.manual_seed(0)
    m = PIGN(d.x.shape[1], 8, int(d.y.max() + 1), max_iter=2)
    r = train_node_classifier(m, d, epochs=20, lr=0.01, eval_every=5, seed=0)
    with torch.no_grad():
        m.eval()
        va = float((m(d.x, d.edge_index)[d.val_mask].argmax(1) == d.y[d.val_mask]).float().mean())
    assert va == r.val_acc and r.best_epoch in (5, 10, 15, 20)
