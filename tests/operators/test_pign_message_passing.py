"""PIGN (Zappala et al., arXiv 2310.01618, Sec. 5.1) on PyTorch Geometric: normalisation, message passing, the
Picard loop, the baselines and the contractive variant, against dense hand-built references in float64."""
import math

import pytest
import torch
from torch.nn import functional as F

from iterlayers.errors import ShapeMismatchError, ValidationError
from iterlayers.operators import (GAT, GCN, PIGN, edge_index_to_adjacency, gcn_adjacency, gcn_edges, make_schedule,
                                  normalized_adjacency, relaxed_picard)
from iterlayers.operators.pign import dropout

EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (4, 5)]  # a 4-cycle with a chord, plus a separate edge
N = 7  # node 6 is isolated


def _edge_index():
    ei = torch.tensor(EDGES, dtype=torch.long).T
    return torch.cat([ei, ei.flip(0)], dim=1)  # PyG: both directions


def _dense_A(dtype=torch.float64):
    A = torch.zeros(N, N, dtype=dtype)
    for i, j in EDGES:
        A[i, j] = A[j, i] = 1.0
    return A


def _hand_built_a_hat():
    """D~^{-1/2} (A + I) D~^{-1/2} written out entry by entry from the degrees (with self loop)."""
    A = _dense_A()
    deg = [1 + sum(1 for i, j in EDGES if node in (i, j)) for node in range(N)]
    ref = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        for j in range(N):
            if i == j or A[i, j]:
                ref[i, j] = 1.0 / math.sqrt(deg[i] * deg[j])
    return ref


def _dense_from_edges(ei, ew):
    M = torch.zeros(N, N, dtype=torch.float64)
    M.index_put_((ei[1], ei[0]), ew.double(), accumulate=True)  # PyG: messages flow source -> target
    return M


def test_normalisations_agree_with_the_hand_built_matrix():
    ref = _hand_built_a_hat()
    ei, ew = gcn_edges(_edge_index(), N, dtype=torch.float64)
    torch.testing.assert_close(_dense_from_edges(ei, ew), ref, atol=1e-15, rtol=0)
    torch.testing.assert_close(normalized_adjacency(_dense_A()), ref, atol=1e-15, rtol=0)
    sparse = edge_index_to_adjacency(torch.tensor(EDGES).T, N, dtype=torch.float64)
    torch.testing.assert_close(normalized_adjacency(sparse).to_dense(), ref, atol=1e-15, rtol=0)
    # pre-existing self loops (any weight) are replaced, not added twice
    A_loops = _dense_A() + 3.0 * torch.eye(N, dtype=torch.float64)
    torch.testing.assert_close(normalized_adjacency(A_loops), ref, atol=1e-15, rtol=0)
    # symmetric, spectrum in (-1, 1], top eigenvalue 1 => ||A^||_2 = 1 (the basis of PIGN's Lipschitz bound)
    ev = torch.linalg.eigvalsh(ref)
    assert abs(float(ev.max()) - 1.0) < 1e-12 and float(ev.min()) > -1.0


def test_cached_sparse_adjacency_is_a_hat_and_sees_changes_to_the_graph():
    ei = _edge_index()
    adj = gcn_adjacency(ei, N, dtype=torch.float64)
    assert adj.layout == torch.sparse_csr
    torch.testing.assert_close(adj.to_dense(), _hand_built_a_hat(), atol=1e-15, rtol=0)
    assert gcn_adjacency(ei, N, dtype=torch.float64) is adj  # computed once per graph
    torch.testing.assert_close(gcn_adjacency(ei.clone(), N, dtype=torch.float64).to_dense(), _hand_built_a_hat(),
                               atol=1e-15, rtol=0)  # an equal copy of the edge list
    assert gcn_adjacency(ei, N, dtype=torch.float32) is not adj  # another dtype: another matrix
    # the caller changes the graph in place (edge 4-5 becomes 4-6): the cache must not return the old A^
    ei[:, (ei == 5).any(0)] = torch.where(ei[:, (ei == 5).any(0)] == 5, 6, 4)
    new = gcn_adjacency(ei, N, dtype=torch.float64).to_dense()
    ref = normalized_adjacency(edge_index_to_adjacency(ei, N, dtype=torch.float64).to_dense())
    torch.testing.assert_close(new, ref, atol=1e-15, rtol=0)
    assert float(new[4, 5]) == 0.0 and float(new[4, 6]) > 0.0
    # more nodes than the edge list mentions: another matrix, with the extra nodes isolated
    assert gcn_adjacency(ei, N + 2, dtype=torch.float64).shape == (N + 2, N + 2)


def test_dropout_has_the_distribution_of_inverted_dropout():
    torch.manual_seed(0)
    h = torch.rand(400, 250, dtype=torch.float64) + 0.5
    for p in (0.5, 0.6):
        out = dropout(h, p, True)
        kept = out != 0
        n = h.numel()
        frac = float(kept.double().mean())
        assert abs(frac - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)  # binomial, 4 standard errors
        torch.testing.assert_close(out[kept], h[kept] / (1 - p))
        hh = h.clone().requires_grad_()
        torch.manual_seed(1)
        g = torch.autograd.grad(dropout(hh, p, True).sum(), hh)[0]
        torch.manual_seed(1)
        torch.testing.assert_close(g, (dropout(h, p, True) != 0).double() / (1 - p))
    assert dropout(h, 0.5, False) is h and dropout(h, 0.0, True) is h


def _pign_reference(model, X, alphas):
    a_hat = _hand_built_a_hat()
    W, c = model.operator.weight.T, model.operator.conv.bias
    H = torch.relu(X @ model.encoder.weight.T + model.encoder.bias)
    for a in alphas:
        H = a * H + (1 - a) * torch.relu(a_hat @ H @ W + c)
    return H @ model.decoder.weight.T + model.decoder.bias, H


@pytest.mark.parametrize("mode", ["uniform", "learnable", "scheduled"])
def test_pign_forward_matches_the_definition(mode):
    torch.manual_seed(1)
    n_iter, alpha = 5, 0.35
    model = PIGN(4, 6, 3, max_iter=n_iter, alpha=alpha, alpha_mode=mode, schedule="sigmoid").double().eval()
    X = torch.randn(N, 4, dtype=torch.float64)
    a_learn = float(model.alpha.detach()) if mode == "learnable" else alpha  # float32-stored logit
    alphas = {"uniform": [alpha] * n_iter, "learnable": [a_learn] * n_iter,
              "scheduled": list(make_schedule("sigmoid", n_iter))}[mode]
    ref, _ = _pign_reference(model, X, alphas)
    with torch.no_grad():
        torch.testing.assert_close(model(X, _edge_index()), ref, atol=1e-12, rtol=0)
    if mode == "learnable":
        assert abs(a_learn - alpha) < 1e-6


def test_pign_runs_on_a_pyg_data_object():
    from torch_geometric.data import Data

    torch.manual_seed(2)
    data = Data(x=torch.randn(N, 4, dtype=torch.float64), edge_index=_edge_index())
    model = PIGN(4, 6, 3, max_iter=3, alpha=0.5).double().eval()
    ref, _ = _pign_reference(model, data.x, [0.5] * 3)
    with torch.no_grad():
        torch.testing.assert_close(model(data.x, data.edge_index), ref, atol=1e-12, rtol=0)


def test_logits_trace_and_eval_time_schedule():
    torch.manual_seed(2)
    model = PIGN(4, 5, 2, max_iter=2, eval_max_iter=6, alpha=0.5).double().eval()
    X = torch.randn(N, 4, dtype=torch.float64)
    with torch.no_grad():
        out, h = model(X, _edge_index(), return_hidden=True)
    logits, res = model.logits_trace(X, _edge_index(), max_iter=6)
    assert len(logits) == 7 and len(res) == 6
    torch.testing.assert_close(logits[-1], out)
    sched = make_schedule("sigmoid", 6, start=0.5, end=3.0)
    logits, _ = model.logits_trace(X, _edge_index(), max_iter=6, alpha=sched)
    ref, _ = _pign_reference(model, X, list(sched))
    torch.testing.assert_close(logits[-1], ref, atol=1e-12, rtol=0)


def test_operator_lipschitz_bound_dominates_its_jacobian():
    torch.manual_seed(3)
    model = PIGN(4, 5, 2, max_iter=3).double().eval()
    g = model.graph(_edge_index(), N, torch.float64)
    H = torch.randn(N, 5, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda h: model.operator(h, g), H).reshape(N * 5, N * 5)
    assert float(torch.linalg.matrix_norm(J, ord=2)) <= model.operator.lipschitz_bound() + 1e-12
    # with every ReLU active the Jacobian is A^ (x) W^T, whose norm is exactly ||W||_2 ||A^||_2 = ||W||_2
    with torch.no_grad():
        model.operator.conv.lin.weight.abs_()  # W >= 0 and H >> 0: every pre-activation is positive
    H_big = H.abs() + 1e3
    J = torch.autograd.functional.jacobian(lambda h: model.operator(h, g), H_big).reshape(N * 5, N * 5)
    pre = _hand_built_a_hat() @ H_big @ model.operator.weight.T + model.operator.conv.bias
    assert bool((pre > 0).all())
    assert math.isclose(float(torch.linalg.matrix_norm(J, ord=2)), model.operator.lipschitz_bound(), rel_tol=1e-10)


def test_baselines_match_their_definitions():
    torch.manual_seed(4)
    X = torch.randn(N, 4, dtype=torch.float64)
    a_hat = _hand_built_a_hat()
    for layers in (2, 4):
        gcn = GCN(4, 6, 3, num_layers=layers).double().eval()
        H = X
        for conv in gcn.layers:
            H = torch.relu(a_hat @ H @ conv.lin.weight.T + conv.bias)
        ref = a_hat @ H @ gcn.out.lin.weight.T + gcn.out.bias
        with torch.no_grad():
            torch.testing.assert_close(gcn(X, _edge_index()), ref, atol=1e-12, rtol=0)
        assert len(gcn.layers) + 1 == layers
    gat = GAT(4, 2, 3, heads=4).double().eval()
    with torch.no_grad():
        ref = gat.conv2(F.elu(gat.conv1(X, _edge_index())), _edge_index())
        torch.testing.assert_close(gat(X, _edge_index()), ref, atol=1e-12, rtol=0)
    assert gat.conv1.heads == 4 and gat.conv2.heads == 1


def test_iterative_gat_is_relaxed_picard_of_one_gat_layer():
    torch.manual_seed(5)
    model = PIGN(4, 6, 3, conv="gat", heads=2, max_iter=3, alpha=0.55).double().eval()
    X = torch.randn(N, 4, dtype=torch.float64)
    with torch.no_grad():
        H = torch.relu(model.encoder(X))
        for _ in range(3):
            H = 0.55 * H + 0.45 * torch.relu(model.operator.conv(H, _edge_index()))
        torch.testing.assert_close(model(X, _edge_index()), model.decoder(H), atol=1e-12, rtol=0)


def test_learnable_alpha_stays_in_unit_interval_during_training():
    torch.manual_seed(5)
    model = PIGN(4, 5, 2, max_iter=3, alpha=0.5, alpha_mode="learnable", dropout=0.0)
    X, y = torch.randn(N, 4), torch.tensor([0, 1, 0, 1, 0, 1, 0])
    opt = torch.optim.Adam(model.parameters(), lr=5.0)
    seen = []
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(X, _edge_index()), y).backward()
        opt.step()
        seen.append(float(model.alpha.detach()))
    assert all(0.0 < a < 1.0 for a in seen) and len(set(seen)) > 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha_mode="adaptive"), "alpha_mode"), (dict(dropout=1.0), "dropout"), (dict(max_iter=0), "max_iter"),
    (dict(alpha_mode="scheduled", schedule="uniform"), "schedule"), (dict(alpha=1.2), "alpha"),
    (dict(conv="sage"), "conv"), (dict(conv="gat", lipschitz=0.5), "lipschitz"), (dict(lipschitz=-1.0), "lipschitz"),
])
def test_bad_pign_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PIGN(4, 5, 2, **kwargs)


def test_bad_graph_inputs_are_rejected():
    with pytest.raises(ShapeMismatchError, match="square"):
        normalized_adjacency(torch.ones(3, 4))
    model = PIGN(4, 5, 2)
    with pytest.raises(ValidationError, match="outside"):
        model(torch.randn(5, 4), _edge_index())  # node ids up to 5 but only 5 rows
    with pytest.raises(ValidationError, match="integer"):
        model(torch.randn(N, 4), _dense_A().float())  # an adjacency matrix is not an edge_index
    with pytest.raises(ShapeMismatchError, match=r"\[2, E\]"):
        model(torch.randn(N, 4), _edge_index()[:1])
    with pytest.raises(ShapeMismatchError, match="x must be"):
        model(torch.randn(N, 3), _edge_index())


def test_lipschitz_capped_operator_is_a_contraction_with_the_banach_rate():
    torch.manual_seed(6)
    model = PIGN(4, 5, 2, max_iter=3, alpha=0.4, lipschitz=0.5).double().eval()
    with torch.no_grad():
        model.operator.conv.lin.parametrizations.weight.original.mul_(10.0)  # ||W||_2 far above the cap
    assert model.operator.lipschitz_bound() == pytest.approx(0.5)
    g = model.graph(_edge_index(), N, torch.float64)
    H = torch.randn(N, 5, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda h: model.operator(h, g), H).reshape(N * 5, N * 5)
    assert float(torch.linalg.matrix_norm(J, ord=2)) <= 0.5 + 1e-12
    # iterates of the relaxed map approach the fixed point no slower than rho = a + (1 - a) * 0.5 = 0.7
    z_star, _, trace = relaxed_picard(model.operator, H, g, alpha=0.4, max_iter=120, return_iterates=True)
    errs = [float((t - z_star).norm()) for t in trace[:30]]
    assert all(e <= 0.7 ** k * errs[0] * (1 + 1e-9) for k, e in enumerate(errs))


def test_fixed_point_is_solved_by_the_core_engine_and_is_a_fixed_point():
    torch.manual_seed(7)
    model = PIGN(4, 5, 3, max_iter=3, alpha=0.3, lipschitz=0.6).double().eval()
    with torch.no_grad():
        model.operator.conv.bias.fill_(0.5)  # a non-trivial fixed point (with c = 0 it may be H* = 0)
    X = torch.randn(N, 4, dtype=torch.float64)
    logits, st = model.fixed_point(X, _edge_index(), tol=1e-10, max_iter=400)
    assert bool(st.converged.all()) and float(st.rel_residual.max()) <= 1e-10
    # independently of the solver's statistics: H* (from the logits' preimage, via a long plain iteration)
    long_logits, _ = model.logits_trace(X, _edge_index(), max_iter=200)
    torch.testing.assert_close(logits, long_logits[-1], atol=1e-8, rtol=0)
    g = model.graph(_edge_index(), N, torch.float64)
    h = torch.relu(model.encoder(X))
    z = relaxed_picard(model.operator, h, g, alpha=0.3, max_iter=200).z
    assert float(z.norm()) > 0.1
    resid = (model.picard.relaxed(z, g) - z).norm() / z.norm()
    assert float(resid) < 1e-10
    torch.testing.assert_close(model.decoder(z), logits, atol=1e-8, rtol=0)
