"""Multilayer sparse coding: exact inference reaches the optimum (KKT, SciPy), T = 1 is the ReLU network."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from iterlayers.frames import (
    STRUCTURES,
    DeepFrameNet,
    FrameArchitecture,
    apg,
    feed_forward,
    kkt_residual,
    objective,
    objective_gradient,
    pad_input,
    solve_sparse_coding,
)


def _problem(structure, seed=0):
    torch.manual_seed(seed)
    arch = FrameArchitecture((6,), (5, 5, 5), structure=structure)
    net = DeepFrameNet(arch, 3).double()
    with torch.no_grad():
        for m in net.layers:
            m.bias.copy_(-torch.rand_like(m.bias) * 0.3)  # lambda >= 0: a bounded problem
    x = torch.randn(4, 6, dtype=torch.float64)
    B = net.global_frame().matrix.detach()
    lam = torch.cat(net.lambdas()).detach()
    return net, x, pad_input(x, B.shape[0]), B, lam


def _scipy_solution(xt, B, lam):
    Bn, ln = B.numpy(), lam.numpy()
    sols = []
    for xi in xt.numpy():
        f = lambda w: 0.5 * np.sum((xi - Bn @ w) ** 2) + ln @ w
        g = lambda w: Bn.T @ (Bn @ w - xi) + ln
        r = minimize(f, np.zeros(B.shape[1]), jac=g, method="L-BFGS-B", bounds=[(0, None)] * B.shape[1],
                     options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000})
        sols.append(r.x)
    return torch.tensor(np.array(sols))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_apg_and_deq_reach_kkt_point_and_scipy_optimum(structure):
    net, x, xt, B, lam = _problem(structure)
    w_apg = apg(xt, B, lam, max_iter=3000)
    w_deq = solve_sparse_coding(xt, B, lam, solver="deq", deq_options={"atol": 1e-10, "max_iter": 2000})
    w_ref = _scipy_solution(xt, B, lam)
    f_ref = objective(w_ref, xt, B, lam)
    for w in (w_apg, w_deq):
        assert (w >= 0).all()
        g = objective_gradient(w, xt, B, lam)
        assert (g > -1e-6).all()  # dual feasibility
        assert (w * g).abs().max() < 1e-6  # complementary slackness
        assert kkt_residual(w, xt, B, lam).max() < 1e-6
        assert torch.all(objective(w, xt, B, lam) <= f_ref + 1e-9)
        assert torch.allclose(w, w_ref, atol=1e-4)


def test_apg_objective_decreases_with_iterations():
    net, x, xt, B, lam = _problem("chain", seed=1)
    w0 = torch.cat(feed_forward(x, net.layer_frames(), net.lambdas()), -1).detach()
    f = [objective(apg(xt, B, lam, w0=w0, max_iter=t), xt, B, lam).mean().item() for t in (0, 5, 50, 500)]
    assert f[0] > f[1] > f[2] >= f[3] - 1e-12


@pytest.mark.parametrize("structure", STRUCTURES)
def test_T1_equals_relu_network(structure):
    torch.manual_seed(2)
    arch = FrameArchitecture((7,), (4, 4, 4, 4), structure=structure)
    net = DeepFrameNet(arch, 3)
    x = torch.randn(5, 7)
    L1, L2, L3, L4 = net.layers
    relu = torch.relu
    if structure == "chain":
        h1 = relu(L1(x)); h2 = relu(L2(h1)); h3 = relu(L3(h2)); feat = relu(L4(h3))
    elif structure == "residual":  # basic blocks: the shortcut spans two layers
        h1 = relu(L1(x)); h2 = relu(L2(h1)); h3 = relu(L3(h2) + h1); feat = relu(L4(h3) + h2)
    else:  # dense among hidden layers: the input feeds layer 1 only
        w1 = relu(L1(x)); w2 = relu(L2(w1)); w3 = relu(L3(torch.cat([w1, w2], 1)))
        w4 = relu(L4(torch.cat([w1, w2, w3], 1)))
        feat = torch.cat([w1, w2, w3, w4], 1)
    assert torch.equal(net(x), net.head(feat))


def test_conv_T1_equals_conv_relu_network():
    torch.manual_seed(3)
    arch = FrameArchitecture((2, 10), (3, 3), structure="chain", kind="conv")
    net = DeepFrameNet(arch, 4).double()
    x = torch.randn(6, 2, 10, dtype=torch.float64)
    h = torch.relu(net.layers[1](torch.relu(net.layers[0](x))))
    assert torch.allclose(net(x), net.head(h.reshape(6, -1)))


def test_recurrent_network_approaches_exact_inference_and_deq_gradient():
    net, x, xt, B, lam = _problem("dense", seed=4)
    exact = _scipy_solution(xt, B, lam)
    errs = []
    for T in (1, 5, 100):
        net.max_iter = T
        errs.append((torch.cat(net.encode(x), -1) - exact).abs().max().item())
    assert errs[0] > errs[1] > errs[2]
    net.max_iter, net.solver = 1, "deq"
    net.deq_options = {"atol": 1e-11, "max_iter": 1000}
    assert torch.allclose(torch.cat(net.encode(x), -1), exact, atol=1e-5)
    # implicit gradient w.r.t. the input vs central finite differences of the exact solution
    xg = x.clone().requires_grad_(True)
    loss = net(xg).pow(2).sum()
    (g,) = torch.autograd.grad(loss, xg)
    h = 1e-6
    for i, j in [(0, 0), (1, 3), (3, 5)]:
        e = torch.zeros_like(x); e[i, j] = h
        with torch.no_grad():
            fd = (net(x + e).pow(2).sum() - net(x - e).pow(2).sum()) / (2 * h)
        assert float(g[i, j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)


def test_bad_options():
    arch = FrameArchitecture((4,), (3,))
    with pytest.raises(ValueError, match="max_iter"):
        DeepFrameNet(arch, 2, max_iter=0)
    with pytest.raises(TypeError):  # the old name is gone (no alias; #14)
        DeepFrameNet(arch, 2, iterations=3)
    with pytest.raises(ValueError, match="max_iter"):
        apg(torch.zeros(2, 7), torch.randn(7, 3), torch.zeros(3), max_iter=-1)
    with pytest.raises(ValueError, match="solver"):
        DeepFrameNet(arch, 2, solver="ista")
    with pytest.raises(ValueError, match="input"):
        DeepFrameNet(arch, 2)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="structure"):
        feed_forward(torch.randn(2, 4), [torch.randn(4, 3)], [torch.zeros(3)], structure="skip")
    with pytest.raises(ValueError, match="rows"):
        pad_input(torch.randn(2, 9), 4)
