"""Multiscale DEQ: the cell is a gamma-contraction, the output is its fixed point, gradients are exact."""
import pytest
import torch
from torch.nn import functional as F

from iterlayers.models import build_model
from iterlayers.models.mdeq import MDEQ, MultiscaleCell, resample

f64 = torch.float64


def _flat(z):
    return torch.cat([t.flatten(1) for t in z], 1)


def test_resampling_has_operator_norm_one():
    # the exact operator norms, from the dense matrices of the linear maps on 1 x 8 x 8 images
    eye = torch.eye(64, dtype=f64).reshape(64, 1, 8, 8)
    for factor in (2, 4):
        down = resample(eye, factor).reshape(64, -1)
        assert float(torch.linalg.matrix_norm(down, 2)) == pytest.approx(1.0, rel=1e-12)
        side = 8 // factor
        small = torch.eye(side * side, dtype=f64).reshape(-1, 1, side, side)
        up = resample(small, 1 / factor).reshape(side * side, -1)
        assert float(torch.linalg.matrix_norm(up, 2)) == pytest.approx(1.0, rel=1e-12)


def test_multiscale_cell_is_a_gamma_contraction_across_resolutions():
    torch.manual_seed(0)
    cell = MultiscaleCell((3, 4, 5), gamma=0.8).double()
    with torch.no_grad():  # large, unbalanced weights: the bound must still hold
        cell.K[0].mul_(7.0)
        cell.M["0_2"].mul_(20.0)
    shapes = [(6, 3, 8, 8), (6, 4, 4, 4), (6, 5, 2, 2)]
    u = tuple(torch.randn(s, dtype=f64) for s in shapes)
    z1 = tuple(torch.randn(s, dtype=f64) for s in shapes)
    z2 = tuple(torch.randn(s, dtype=f64) for s in shapes)
    lhs = (_flat(cell(z1, u)) - _flat(cell(z2, u))).norm(dim=1)
    assert bool((lhs <= 0.8 * (_flat(z1) - _flat(z2)).norm(dim=1) + 1e-12).all())
    # and the bound is not vacuous: the linear part's true norm (dense, per sample) is at most gamma, and close
    n = sum(s[1] * s[2] * s[3] for s in shapes)
    basis = torch.eye(n, dtype=f64)
    parts, off = [], 0
    for s in shapes:
        size = s[1] * s[2] * s[3]
        parts.append(basis[:, off:off + size].reshape(n, *s[1:]))
        off += size
    dense = _flat(tuple(cell.scale() * t for t in cell.linear(tuple(parts)))).detach()
    true = float(torch.linalg.matrix_norm(dense, 2))
    assert 0.1 < true <= 0.8 + 1e-12


def test_mdeq_output_is_the_fixed_point_of_the_multiscale_map():
    torch.manual_seed(1)
    model = MDEQ(64, 10, channels=(4, 6, 8), atol=1e-12, max_iter=200).double()
    x = torch.randn(5, 64, dtype=f64)
    logits = model(x)
    u = model.inject(x)
    z = model.cell.init_state(u)
    with torch.no_grad():
        for _ in range(400):  # plain Picard: 0.9^400 ~ 5e-19
            z = model.cell(z, u)
        expected = model.head(torch.cat([F.adaptive_avg_pool2d(t, 2).flatten(1) for t in z], 1))
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=1e-10)
    assert model.deq.stats["forward"].status == "converged"


def test_mdeq_gradient_passes_gradcheck():
    torch.manual_seed(2)
    model = MDEQ(16, 3, channels=(2, 3), pool=1, atol=1e-13, max_iter=300, backward_atol=1e-13,
                 backward_max_iter=300).double()
    x = torch.randn(2, 16, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: model(inp), (x,), eps=1e-6, atol=1e-6)


def test_mdeq_registry_and_bad_shapes():
    model = build_model("mdeq", 64, 10, channels=[4, 8, 8])
    assert model.cell.channels == (4, 8, 8) and model(torch.randn(3, 64)).shape == (3, 10)
    with pytest.raises(ValueError, match="divisible by 2"):
        build_model("mdeq", 36, 10, channels=[4, 4, 4])  # side 6 cannot be halved twice
    with pytest.raises(ValueError, match="1 to 4 resolutions"):
        build_model("mdeq", 64, 10, channels=[])
