"""il.spectral_norm inside a DEQ: the power-iteration estimate is updated once per forward pass, so every solver
iteration (and the backward pass) sees one normalised map."""
import pytest
import torch
from torch import nn

import iterlayers as il


class TourCell(nn.Module):  # the README tour's cell
    def __init__(self, d, *, sn=il.spectral_norm):
        super().__init__()
        self.W = sn(nn.Linear(d, d))
        self.U = nn.Linear(d, d)
        self.seen = None

    def forward(self, z, x):
        if self.seen is not None:
            self.seen.append(self.W.weight.detach().clone())
        return torch.tanh(self.W(z) + self.U(x))


def tour_cell(d=64, seed=0):
    torch.manual_seed(seed)
    cell = TourCell(d, sn=lambda m: il.spectral_norm(m, bound=0.9))
    return cell


def test_one_update_per_forward_and_one_map_per_solve():
    cell = tour_cell(16)
    sn = cell.W.parametrizations.weight[0]
    layer = il.DEQ(cell, atol=1e-6, rtol=0, max_iter=60, hoist=False)
    x = torch.randn(8, 16)
    for k in range(3):
        before = int(sn.updates)
        cell.seen = []
        z = layer(x)
        cell.seen, seen = None, cell.seen
        assert int(sn.updates) == before + 1
        assert len(seen) > 5 and all(torch.equal(w, seen[0]) for w in seen)
        # z* is a fixed point of that one map: its true residual, measured with the map's own matrices
        W, U = seen[0], cell.U
        with torch.no_grad():
            r = (torch.tanh(z @ W.T + cell.W.bias + U(x)) - z).norm(dim=1)
        assert float(r.max()) <= 1e-6 * 1.01
        z.sum().backward()  # the backward pass updates nothing either
        assert int(sn.updates) == before + 1
    layer.eval()
    before = int(sn.updates)
    layer(x)
    assert int(sn.updates) == before  # eval mode reads the estimate


def test_the_normalised_norm_tracks_the_bound_over_training_steps():
    cell = tour_cell(16)
    layer = il.DEQ(cell, atol=1e-6, rtol=0)
    opt = torch.optim.SGD(cell.parameters(), lr=0.5)
    x = torch.randn(8, 16)
    for _ in range(20):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    layer(x)  # the estimate follows the weights (one power step per forward pass)
    assert abs(float(torch.linalg.matrix_norm(cell.W.weight.detach(), 2)) - 0.9) < 1e-2


def test_outside_a_deq_torch_semantics():
    lin = il.spectral_norm(nn.Linear(5, 5))
    sn = lin.parametrizations.weight[0]
    before = int(sn.updates)
    lin(torch.randn(2, 5))
    lin(torch.randn(2, 5))
    assert int(sn.updates) == before + 2  # updated at every training-mode call, as torch does


def tour_steps(sn, x, forwards=5):
    """Max Anderson steps over ``forwards`` train-mode passes, then in one eval-mode pass, of the tour's DEQ."""
    torch.manual_seed(0)
    layer = il.DEQ(TourCell(64, sn=sn), solver="anderson", atol=1e-5, max_iter=50)
    train = []
    for _ in range(forwards):
        layer(x)
        train.append(int(layer.stats["forward"].nstep.max()))
    layer.eval()
    layer(x)
    return max(train), int(layer.stats["forward"].nstep.max())


def test_train_mode_steps_close_to_eval_mode_on_the_tour_model():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    once_train, once_eval = tour_steps(lambda m: il.spectral_norm(m, bound=0.9), x)
    assert once_train <= once_eval + 1, (once_train, once_eval)
    # the control: torch's parametrisation (updated at every call) drifts during the solve
    torch_train, torch_eval = tour_steps(torch.nn.utils.parametrizations.spectral_norm, x)
    assert torch_train >= torch_eval + 5, (torch_train, torch_eval)


def test_implicit_gradient_equals_unrolled_through_the_fixed_map():
    torch.manual_seed(1)
    grads = {}
    for backward in ("implicit", "unrolled"):
        torch.manual_seed(1)
        cell = TourCell(6, sn=lambda m: il.spectral_norm(m.double(), bound=0.8))
        cell.U.double()
        layer = il.DEQ(cell, backward=backward, atol=1e-13, rtol=0, max_iter=400, backward_atol=1e-13,
                       backward_rtol=0)
        x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        layer(x).sum().backward()
        grads[backward] = cell.W.parametrizations.weight.original.grad
    torch.testing.assert_close(grads["implicit"], grads["unrolled"], atol=1e-9, rtol=1e-7)


def test_bad_arguments():
    with pytest.raises(il.ValidationError, match="matrix"):
        il.spectral_norm(nn.LayerNorm(4))
