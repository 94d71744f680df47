"""Implicit graph network: well-posed by construction, joint solve over the graph, exact gradients."""
import numpy as np
import pytest
import torch

from iterlayers.data import load_dataset
from iterlayers.models import build_model
from iterlayers.models.ignn import IGNNCell, perron_frobenius
from iterlayers.operators.graph_conv import normalized_adjacency
from iterlayers.operators.graph_data import load_graph

f64 = torch.float64


def test_every_offline_graph_is_a_dataset():
    from iterlayers.data import DATASETS, GRAPH_NAMES
    from iterlayers.operators.graph_data import GRAPHS

    assert sorted(GRAPH_NAMES) == sorted(GRAPHS)
    assert all(f"graph:{name}" in DATASETS for name in GRAPHS)


def test_perron_frobenius_matches_the_dense_eigenvalues():
    g = load_graph("csbm", seed=0)
    adj = normalized_adjacency(g.adj)
    dense = adj.to_dense().double()
    expected = float(torch.linalg.eigvalsh(dense).abs().max())
    assert perron_frobenius(adj) == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(1.0, abs=1e-6)  # D^-1/2 (A + I) D^-1/2: eigenvector D^1/2 1
    raw = g.adj.to_dense().double()  # an unnormalised graph: lambda_pf is the degree-like scale, not 1
    assert perron_frobenius(g.adj) == pytest.approx(float(torch.linalg.eigvalsh(raw).abs().max()), rel=1e-8)


def test_ignn_cell_is_a_kappa_contraction_over_the_whole_graph():
    torch.manual_seed(0)
    n, d = 30, 5
    a = (torch.rand(n, n, dtype=f64) < 0.2).double()
    a = torch.triu(a, 1) + torch.triu(a, 1).T  # symmetric 0/1 adjacency, not normalised
    lam = perron_frobenius(a)
    cell = IGNNCell(d, kappa=0.7, lambda_pf=lam).double()
    with torch.no_grad():
        cell.v.mul_(10.0)  # far outside the ball: the cap must hold it
    assert float(torch.linalg.matrix_norm(cell.weight().detach(), 2)) == pytest.approx(0.7 / lam, rel=1e-10)
    u = torch.randn(n, d, dtype=f64)
    for _ in range(5):
        z1, z2 = torch.randn(n, d, dtype=f64), torch.randn(n, d, dtype=f64)
        with torch.no_grad():
            gap = float((cell(z1, u, adj=a) - cell(z2, u, adj=a)).norm())
        assert gap <= 0.7 * float((z1 - z2).norm()) + 1e-12


def test_ignn_solves_the_graph_jointly_to_its_fixed_point():
    torch.manual_seed(1)
    model = build_model("ignn", 2, 2, graph="karate", width=6, atol=1e-11, max_iter=400).double()
    data = load_dataset("graph:karate")
    logits = model(data.x_test)
    st = model.deq.stats["forward"]
    assert st.info["stopping"] == "joint" and st.status == "converged"
    assert st.batch_size == 34  # every node of the graph, not the batch's 22
    with torch.no_grad():
        u = model.adj.double() @ model.encoder(model.features.double())
        z = model.embed()
        # the true residual, measured independently of the solver's statistics
        assert float((model.cell(z, u, adj=model.adj.double()) - z).norm(dim=1).max()) < 1e-10
        zp = torch.zeros_like(u)
        for _ in range(500):  # Picard: 0.9^500 ~ 1e-23
            zp = model.cell(zp, u, adj=model.adj.double())
    torch.testing.assert_close(logits.detach(), model.head(zp[data.x_test[:, 0]]), rtol=0, atol=1e-9)


def test_ignn_gradient_equals_the_dense_ift_gradient():
    torch.manual_seed(2)
    model = build_model("ignn", 2, 2, graph="karate", width=3, atol=1e-13, max_iter=600,
                        backward_atol=1e-13, backward_max_iter=600).double()
    adj = model.adj.double().to_dense()
    u = torch.randn(34, 3, dtype=f64, requires_grad=True)
    g = torch.randn(34, 3, dtype=f64)
    (model.deq(u, adj=model.adj.double()) * g).sum().backward()
    # dense implicit function theorem: z = relu(A z W^T + u), J = D (W kron A) in vec (column-major) order;
    # d<g, z*>/du = D (I - J^T)^{-1} g
    with torch.no_grad():
        z = model.deq(u, adj=model.adj.double())
        W = model.cell.weight()
        pre = adj @ z @ W.T + u
        D = torch.diag((pre > 0).double().T.reshape(-1))  # vec stacks columns: index = j * N + i
        J = D @ torch.kron(W, adj)
        grad_u = torch.linalg.solve((torch.eye(102, dtype=f64) - J).T, g.T.reshape(-1))
        grad_u = (D @ grad_u).reshape(3, 34).T
    torch.testing.assert_close(u.grad, grad_u, rtol=1e-8, atol=1e-10)


def test_ignn_refuses_nodes_of_another_graph_and_wrong_shapes():
    model = build_model("ignn", 2, 7, graph="csbm", width=4)
    other = load_dataset("graph:karate")
    with pytest.raises(ValueError, match="fingerprint"):
        model(other.x_test)
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="7 classes"):
        build_model("ignn", 2, 3, graph="csbm")
    with pytest.raises(ValueError, match="graph='cora'"):
        build_model("ignn", 2, 7, graph="cora")
