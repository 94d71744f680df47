"""Every training aid with every forward solver for general maps (picard, anderson, broyden; gmres solves affine
maps only) and every gradient mode: one training-mode forward and backward on a small cell, with the aid's own
invariant checked and the fixed point's residual measured here, independently of the solver's statistics."""
import pytest
import torch
from torch import nn

import iterlayers as il

SOLVERS = ["picard", "anderson", "broyden"]
MODES = ["implicit", "phantom", "jfb", "unrolled"]
D, B = 6, 5


class Cell(nn.Module):
    def __init__(self, dropout: bool = False, spectral: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.W = nn.Linear(D, D, bias=False).double()
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))
        if spectral:
            il.spectral_norm(self.W, bound=0.5)
        self.U = nn.Linear(D, D).double()
        self.drop = il.VariationalDropout(0.3) if dropout else None
        self.calls = 0

    def forward(self, z, x):
        self.calls += 1
        h = self.W(z)
        if self.drop is not None:
            h = self.drop(h)
        return torch.tanh(h + self.U(x))


def inputs():
    g = torch.Generator().manual_seed(1)
    # samples of different scales stop at different iterations (per-sample stopping is exercised)
    return torch.randn(B, D, generator=g, dtype=torch.float64) * torch.logspace(-2, 0.5, B, dtype=torch.float64)[:, None]


def layer(cell, solver, mode, **aids):
    return il.DEQ(cell, solver=solver, backward=mode, atol=1e-9, rtol=0, max_iter=300, on_failure="raise",
                  backward_atol=1e-9, **aids).train()


def true_residual(cell, z, x):
    with torch.no_grad():
        return float((cell(z, x) - z).norm(dim=1).max())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_jacobian_penalty_and_spectral_monitor(solver, mode):
    cell, x = Cell(), inputs()
    deq = layer(cell, solver, mode, jacobian_penalty=il.JacobianPenalty(samples=64, distribution="rademacher"),
                spectral_monitor=il.SpectralMonitor())
    z = deq(x)
    assert deq.penalty is not None and deq.penalty.requires_grad and torch.isfinite(deq.penalty)
    (z.square().sum() + deq.penalty).backward()
    assert cell.W.weight.grad is not None and torch.isfinite(cell.W.weight.grad).all()
    # the radius of J = diag(1 - tanh^2) W at z* is at most ||W||_2 = 0.5
    rho = deq.stats["spectral_radius"].value  # per sample
    assert bool(((rho > 0) & (rho <= 0.5 + 1e-6)).all()), rho
    if mode != "unrolled":
        assert true_residual(cell, z.detach(), x) < 1e-6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_variational_dropout_mask_is_fixed_for_the_solve(solver, mode):
    cell, x = Cell(dropout=True), inputs()
    deq = layer(cell, solver, mode)
    z = deq(x)
    z.sum().backward()
    mask = cell.drop.mask.clone()
    # the returned state is the fixed point of the one masked map: the same mask, evaluated on the whole batch
    cell.drop.deq_rows(None)
    with torch.no_grad():
        out = cell(z.detach(), x)  # no deq_reset in between: the module applies the mask of this forward
    assert torch.equal(cell.drop.mask, mask)
    tol = 1e-6 if mode in ("implicit", "unrolled") else 1e-2  # phantom / jfb return steps taken from z*
    assert float((out - z.detach()).norm(dim=1).max()) < tol
    deq(x)
    assert not torch.equal(cell.drop.mask, mask)  # redrawn at the next forward


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_spectral_norm_updates_once_per_forward(solver, mode):
    cell, x = Cell(spectral=True), inputs()
    deq = layer(cell, solver, mode)
    sn = cell.W.parametrizations.weight[0]
    before = int(sn.updates)  # a counter tensor, updated in place
    z = deq(x)
    assert int(sn.updates) == before + 1
    z.sum().backward()
    assert cell.W.parametrizations.weight.original.grad is not None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_fixed_point_correction(solver, mode):
    cell, x = Cell(), inputs()
    deq = layer(cell, solver, mode, correction=il.FixedPointCorrection(count=3, weights="exponential"))
    z = deq(x)
    assert 1 <= len(deq.states) <= 3 and all(s.requires_grad for _, s, _ in deq.states)
    (z.sum() + deq.correction_loss(lambda s: s.square().sum())).backward()
    assert torch.isfinite(cell.U.weight.grad).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_warm_start_from_the_fixed_point_takes_no_iteration(solver, mode):
    cell, x = Cell(), inputs()
    deq = layer(cell, solver, mode)
    with torch.no_grad():
        z = deq(x)
    out = deq(x, z0=z.detach())
    assert int(deq.stats["forward"].nstep.max()) <= 1
    if mode == "unrolled":
        # the gradient of the truncated iteration: started at its fixed point it takes no step, so the output
        # does not depend on the parameters (documented behaviour of backward="unrolled")
        assert int(deq.stats["forward"].nstep.max()) == 0 and not out.requires_grad
    else:
        out.sum().backward()
        assert torch.isfinite(cell.U.weight.grad).all()
