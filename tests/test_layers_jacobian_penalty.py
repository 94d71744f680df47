"""DEQ(jacobian_penalty=...) against the dense Jacobian at z*, its gradient, its schedule; the spectral-radius
monitor against the dense eigenvalues."""
import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.analysis.spectral import spectral_radius
from iterlayers.layers import JacobianPenalty, SpectralMonitor
from problems import BatchNormCell, PairCell, TanhCell


def dense_jacobians(cell, z, x):
    """``J_b = d cell(z, x)_b / d z_b`` for every sample, by torch.autograd.functional.jacobian."""
    return torch.stack([torch.autograd.functional.jacobian(lambda zb: cell(zb[None], x[b:b + 1])[0], z[b])
                        for b in range(len(z))])


class DiagCell(nn.Module):
    """``tanh(w * z + U x)``: a diagonal Jacobian, for which a Rademacher probe is exact."""

    def __init__(self, n=5):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = nn.Parameter(0.8 * torch.rand(n, generator=g, dtype=torch.float64))
        self.U = nn.Parameter(torch.randn(n, n, generator=g, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(self.w * z + x @ self.U.T)


def test_rademacher_on_a_diagonal_jacobian_is_exact_and_so_is_its_gradient():
    cell = DiagCell()
    layer = il.DEQ(cell, atol=1e-13, rtol=0, max_iter=300,
                   jacobian_penalty=JacobianPenalty(samples=1, distribution="rademacher"))
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    zs = z.detach()
    J = dense_jacobians(cell, zs, x.detach())
    assert torch.count_nonzero(J - torch.diag_embed(torch.diagonal(J, dim1=1, dim2=2))) == 0
    ref = J.square().sum((1, 2)).mean() / 5
    torch.testing.assert_close(layer.penalty, ref, atol=0, rtol=1e-12)
    # gradient to the parameters and inputs, z* held constant: the closed form ||diag(w (1 - tanh^2))||^2
    layer.penalty.backward()
    w, U, x2 = cell.w.detach().requires_grad_(), cell.U.detach().requires_grad_(), x.detach().requires_grad_()
    closed = (w * (1 - torch.tanh(w * zs + x2 @ U.T) ** 2)).square().sum(1).mean() / 5
    gw, gU, gx = torch.autograd.grad(closed, (w, U, x2))
    torch.testing.assert_close(cell.w.grad, gw, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(cell.U.grad, gU, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(x.grad, gx, atol=1e-12, rtol=1e-10)


def test_normal_probes_match_the_dense_frobenius_norm_within_five_sigma():
    cell = TanhCell(4, norm=0.9)
    samples = 4000
    layer = il.DEQ(cell, atol=1e-12, rtol=0, max_iter=300, jacobian_penalty=JacobianPenalty(samples=samples))
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    z = layer(x).detach()
    J = dense_jacobians(cell, z, x).detach()
    B, n = 3, 4
    ref = J.square().sum((1, 2)).mean() / n
    # Var ||J^T e||^2 = 2 ||J J^T||_F^2 for e ~ N(0, I): the standard deviation of the estimate
    sd = (2 * (J @ J.transpose(1, 2)).square().sum() / samples).sqrt() / (B * n)
    err = abs(float(layer.penalty.detach()) - float(ref))
    assert err < 5 * float(sd), (err, float(sd))
    assert float(sd) < 0.02 * float(ref)  # and the test is sharp: 5 sigma is under 10% of the value
    # the gradient reaches the cell's parameters
    layer.penalty.backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in cell.parameters())


def test_schedule_every_k_and_train_mode_only():
    cell = TanhCell(4)
    layer = il.DEQ(cell, jacobian_penalty=JacobianPenalty(every=3), spectral_monitor=SpectralMonitor(every=2))
    x = torch.randn(5, 4, dtype=torch.float64)
    got = []
    for _ in range(6):
        layer(x)
        got.append((layer.penalty is not None, layer.stats["spectral_radius"] is not None))
    assert got == [(True, True), (False, False), (False, True), (True, False), (False, True), (False, False)]
    layer.eval()
    layer(x)
    assert layer.penalty is None and layer.stats["spectral_radius"] is None
    with torch.no_grad():  # no graph, no penalty (the monitor still measures)
        layer.train()
        layer.train_forwards = 0
        layer(x)
        assert layer.penalty is None and layer.stats["spectral_radius"] is not None


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jfb", "unrolled"])
@pytest.mark.parametrize("solver", ["anderson", "broyden", "picard"])
def test_every_solver_and_gradient_mode(solver, backward):
    cell = DiagCell()
    layer = il.DEQ(cell, solver=solver, backward=backward, atol=1e-12, rtol=0, max_iter=300,
                   jacobian_penalty=JacobianPenalty(distribution="rademacher"))
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z = layer(x)
    J = dense_jacobians(cell, z.detach(), x)
    torch.testing.assert_close(layer.penalty, J.square().sum((1, 2)).mean() / 5, atol=1e-10, rtol=1e-9)
    (z.sum() + layer.penalty).backward()
    assert float(cell.w.grad.abs().max()) > 0


def test_spectral_monitor_matches_dense_eigenvalues():
    cell = TanhCell(6, norm=0.9)
    layer = il.DEQ(cell, atol=1e-12, rtol=0, max_iter=300, spectral_monitor=SpectralMonitor(tol=1e-8, max_iter=200))
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    z = layer(x).detach()
    est = layer.stats["spectral_radius"]
    rho = torch.linalg.eigvals(dense_jacobians(cell, z, x)).abs().amax(-1)
    torch.testing.assert_close(est.value, rho, atol=1e-6, rtol=1e-6)
    assert bool(est.converged.all())


def test_measurements_leave_batch_norm_statistics_alone():
    cell = BatchNormCell().double()
    layer = il.DEQ(cell, jacobian_penalty=JacobianPenalty(samples=3), spectral_monitor=SpectralMonitor(),
                   on_failure="ignore")  # running statistics matter here, not the tolerance
    x = torch.randn(8, 4, dtype=torch.float64)
    z = layer(x)
    assert int(cell.bn.num_batches_tracked) == 1  # the solve's one update; the penalty and monitor add none
    mean = cell.bn.running_mean.clone()
    (z.sum() + layer.penalty).backward()
    torch.testing.assert_close(cell.bn.running_mean, mean)


def test_tuple_states():
    cell = PairCell()
    layer = il.DEQ(cell, atol=1e-12, rtol=0, jacobian_penalty=JacobianPenalty(distribution="rademacher"))
    x = torch.randn(3, 2, dtype=torch.float64)
    u, v = layer(x, z0=(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)))
    # J = [[0, a D1], [a D2, 0]] on the 4 flat coordinates (D diagonal): ||J||_F^2 = a^2 (|D1|^2 + |D2|^2)
    a = 0.5
    d1, d2 = 1 - torch.tanh(a * v + x).detach() ** 2, 1 - torch.tanh(a * u).detach() ** 2
    ref = (a ** 2 * (d1.square().sum(1) + d2.square().sum(1))).mean() / 4
    torch.testing.assert_close(layer.penalty, ref, atol=1e-12, rtol=1e-10)


def test_bad_options():
    with pytest.raises(il.ValidationError, match="every"):
        JacobianPenalty(every=0)
    with pytest.raises(il.ValidationError, match="distribution"):
        JacobianPenalty(distribution="uniform")
    with pytest.raises(il.OptionTypeError, match="jacobian_penalty"):
        il.DEQ(TanhCell(3), jacobian_penalty=0.1)
    with pytest.raises(il.ValidationError, match="tol"):
        SpectralMonitor(tol=0)
