"""PIGN (Zappala et al., arXiv 2310.01618, Sec. 5.1): normalised adjacency, message passing and the Picard loop
against dense hand-built references, sparse vs dense adjacency."""
import math

import pytest
import torch

from iterlayers.operators import (GCN, PIGN, DeepGCN, GraphConv, edge_index_to_adjacency, make_schedule,
                                  normalized_adjacency)

EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (4, 5)]  # a 4-cycle with a chord, plus a separate edge
N = 7  # node 6 is isolated


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


def _sparse_A():
    ei = torch.tensor(EDGES, dtype=torch.long).T
    return edge_index_to_adjacency(ei, N, dtype=torch.float64)


def test_normalized_adjacency_dense_sparse_and_hand_built_agree():
    ref = _hand_built_a_hat()
    dense = normalized_adjacency(_dense_A())
    sparse = normalized_adjacency(_sparse_A())
    assert sparse.is_sparse and not dense.is_sparse
    torch.testing.assert_close(dense, ref, atol=1e-15, rtol=0)
    torch.testing.assert_close(sparse.to_dense(), ref, atol=1e-15, rtol=0)
    # pre-existing self loops (any weight) are replaced, not added twice
    A_loops = _dense_A() + 3.0 * torch.eye(N, dtype=torch.float64)
    torch.testing.assert_close(normalized_adjacency(A_loops), ref, atol=1e-15, rtol=0)
    torch.testing.assert_close(normalized_adjacency(A_loops.to_sparse()).to_dense(), ref, atol=1e-15, rtol=0)
    # symmetric, spectrum in (-1, 1], top eigenvalue 1 => ||A^||_2 = 1 (the basis of PIGN's Lipschitz bound)
    ev = torch.linalg.eigvalsh(ref)
    assert abs(float(ev.max()) - 1.0) < 1e-12 and float(ev.min()) > -1.0


def test_graph_conv_sparse_equals_dense_reference():
    torch.manual_seed(0)
    conv = GraphConv(3, 4).double()
    H = torch.randn(N, 3, dtype=torch.float64)
    ref = _hand_built_a_hat() @ H @ conv.weight + conv.bias
    torch.testing.assert_close(conv(H, normalized_adjacency(_sparse_A())), ref, atol=1e-13, rtol=0)
    torch.testing.assert_close(conv(H, normalized_adjacency(_dense_A())), ref, atol=1e-13, rtol=0)


@pytest.mark.parametrize("mode", ["uniform", "learnable", "scheduled"])
def test_pign_forward_matches_the_definition(mode):
    torch.manual_seed(1)
    num_iter, alpha = 5, 0.35
    model = PIGN(4, 6, 3, num_iter=num_iter, alpha=alpha, alpha_mode=mode, schedule="sigmoid").double().eval()
    X = torch.randn(N, 4, dtype=torch.float64)
    a_hat = _hand_built_a_hat()
    W, c = model.operator.conv.weight, model.operator.conv.bias
    a_learn = float(model.alpha.detach()) if mode == "learnable" else alpha  # float32-stored logit
    alphas = {"uniform": [alpha] * num_iter, "learnable": [a_learn] * num_iter,
              "scheduled": list(make_schedule("sigmoid", num_iter))}[mode]
    H = torch.relu(X @ model.encoder.weight.T + model.encoder.bias)
    for a in alphas:
        H = a * H + (1 - a) * torch.relu(a_hat @ H @ W + c)
    ref = H @ model.decoder.weight.T + model.decoder.bias
    with torch.no_grad():
        for adj in (_sparse_A(), _dense_A()):
            torch.testing.assert_close(model(X, adj), ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(model(X, a_hat, normalized=True), ref, atol=1e-12, rtol=0)
    if mode == "learnable":
        assert abs(a_learn - alpha) < 1e-6


def test_pign_eval_num_iter_and_trace():
    torch.manual_seed(2)
    model = PIGN(4, 5, 2, num_iter=2, eval_num_iter=6, alpha=0.5).double()
    X = torch.randn(N, 4, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        out, h = model(X, _dense_A(), return_hidden=True)
    trace, stats = model.hidden_trace(X, _dense_A(), num_iter=6)
    assert len(trace) == 7 and stats.nstep == 6
    torch.testing.assert_close(h, trace[-1])


def test_operator_lipschitz_bound_dominates_its_jacobian():
    torch.manual_seed(3)
    model = PIGN(4, 5, 2, num_iter=3).double().eval()
    a_hat = normalized_adjacency(_dense_A())
    H = torch.randn(N, 5, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda h: model.operator(h, a_hat), H).reshape(N * 5, N * 5)
    assert float(torch.linalg.matrix_norm(J, ord=2)) <= model.operator.lipschitz_bound() + 1e-12
    # with every ReLU active the Jacobian is A^ (x) W^T, whose norm is exactly ||W||_2 ||A^||_2 = ||W||_2
    H_big = H.abs() + 1e3
    J = torch.autograd.functional.jacobian(lambda h: model.operator(h, a_hat), H_big).reshape(N * 5, N * 5)
    if bool((a_hat @ H_big @ model.operator.conv.weight + model.operator.conv.bias > 0).all()):
        assert math.isclose(float(torch.linalg.matrix_norm(J, ord=2)), model.operator.lipschitz_bound(),
                            rel_tol=1e-10)


def test_baselines_match_their_definitions_and_equal_compute():
    torch.manual_seed(4)
    X = torch.randn(N, 4, dtype=torch.float64)
    a_hat = _hand_built_a_hat()
    gcn = GCN(4, 6, 3).double().eval()
    ref = a_hat @ torch.relu(a_hat @ X @ gcn.conv1.weight + gcn.conv1.bias) @ gcn.conv2.weight + gcn.conv2.bias
    with torch.no_grad():
        torch.testing.assert_close(gcn(X, _sparse_A()), ref, atol=1e-12, rtol=0)
    deep = DeepGCN(4, 6, 3, num_layers=4).double().eval()
    H = torch.relu(X @ deep.encoder.weight.T + deep.encoder.bias)
    for conv in deep.layers:
        H = torch.relu(a_hat @ H @ conv.weight + conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(deep(X, _dense_A()), H @ deep.decoder.weight.T + deep.decoder.bias,
                                   atol=1e-12, rtol=0)
    pign = PIGN(4, 6, 3, num_iter=4)
    n_op = sum(p.numel() for p in pign.operator.parameters())
    assert sum(p.numel() for p in deep.parameters()) == sum(p.numel() for p in pign.parameters()) + 3 * n_op


def test_learnable_alpha_stays_in_unit_interval_during_training():
    torch.manual_seed(5)
    model = PIGN(4, 5, 2, num_iter=3, alpha=0.5, alpha_mode="learnable", dropout=0.0)
    X, y = torch.randn(N, 4), torch.tensor([0, 1, 0, 1, 0, 1, 0])
    opt = torch.optim.Adam(model.parameters(), lr=5.0)
    seen = []
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X, _dense_A().float()), y).backward()
        opt.step()
        seen.append(float(model.alpha.detach()))
    assert all(0.0 < a < 1.0 for a in seen) and len(set(seen)) > 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha_mode="adaptive"), "alpha_mode"), (dict(dropout=1.0), "dropout"), (dict(num_iter=0), "num_iter"),
    (dict(alpha_mode="scheduled", schedule="uniform"), "schedule"), (dict(alpha=1.2), "alpha"),
])
def test_bad_pign_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PIGN(4, 5, 2, **kwargs)


def test_bad_adjacency_is_rejected():
    with pytest.raises(ValueError, match="square"):
        normalized_adjacency(torch.ones(3, 4))
    with pytest.raises(ValueError, match="N = 7"):
        PIGN(4, 5, 2)(torch.randn(5, 4), _dense_A().float())


def test_lipschitz_capped_operator_is_a_contraction_with_the_banach_rate():
    torch.manual_seed(6)
    model = PIGN(4, 5, 2, num_iter=3, alpha=0.4, lipschitz=0.5).double().eval()
    with torch.no_grad():
        model.operator.conv.weight.mul_(10.0)  # ||W||_2 far above the cap
    assert model.operator.lipschitz_bound() == pytest.approx(0.5)
    a_hat = normalized_adjacency(_dense_A())
    H = torch.randn(N, 5, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda h: model.operator(h, a_hat), H).reshape(N * 5, N * 5)
    assert float(torch.linalg.matrix_norm(J, ord=2)) <= 0.5 + 1e-12
    # iterates of the relaxed map approach the fixed point no slower than rho = a + (1 - a) * 0.5 = 0.7
    trace, _ = model.picard.trace(a_hat, z0=H, num_iter=80)
    z_star = trace[-1]
    errs = [float((t - z_star).norm()) for t in trace[:30]]
    assert all(e <= 0.7 ** k * errs[0] * (1 + 1e-9) for k, e in enumerate(errs))
