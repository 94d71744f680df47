"""The Picard transformer and the iterated denoiser follow their stated update rules exactly."""
import pytest
import torch

from iterlayers.errors import ShapeMismatchError, ValidationError
from iterlayers.operators import IterativeDenoiser, PatchTransformer, PicardTransformer


def _manual_transformer(m, x, alphas):
    u = m.embed(x) + m.pos
    z = torch.zeros_like(u)
    for a in alphas:
        z = a * z + (1 - a) * m.operator.block(z + u)
    return m.head(m.norm(z))


def test_single_pass_is_the_plain_block_and_iteration_follows_the_rule():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 2, dtype=torch.float64)
    one = PicardTransformer(2, 8, 1, seq_len=8, max_iter=1, alpha=0.0).double().eval()
    with torch.no_grad():
        plain = one.head(one.norm(one.operator.block(one.embed(x) + one.pos)))
        torch.testing.assert_close(one(x), plain, atol=1e-12, rtol=0)
    it = PicardTransformer(2, 8, 1, seq_len=8, max_iter=3, alpha=0.3, eval_max_iter=5).double()
    it.train()
    with torch.no_grad():
        torch.testing.assert_close(it(x), _manual_transformer(it, x, [0.3] * 3), atol=1e-12, rtol=0)
        it.eval()
        torch.testing.assert_close(it(x), _manual_transformer(it, x, [0.3] * 5), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="seq_len"):
        it(torch.randn(3, 7, 2, dtype=torch.float64))


def test_denoiser_iterates_from_the_noisy_signal():
    torch.manual_seed(1)
    m = IterativeDenoiser(max_iter=3, alpha=0.25, channels=4).double()
    y = torch.randn(5, 40, dtype=torch.float64)
    z = y
    for _ in range(3):
        z = 0.25 * z + 0.75 * (z + m.operator.net(torch.stack([z, y], 1)).squeeze(1))
    torch.testing.assert_close(m(y), z, atol=1e-12, rtol=0)
    assert m.picard.stats["forward"].nstep.tolist() == [3] * 5
    with pytest.raises(ValueError, match="1-D signals"):
        m(torch.randn(2, 1, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="kernel_size"):
        IterativeDenoiser(kernel_size=4)


def test_injected_forms_follow_their_rules():
    torch.manual_seed(2)
    op = PicardTransformer(2, 8, 1, seq_len=6, form="injected").double().operator
    z, u = torch.randn(3, 6, 8, dtype=torch.float64), torch.randn(3, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(op(z, u), u + op.block(z) - z, atol=1e-12, rtol=0)
    dn = IterativeDenoiser(max_iter=2, alpha=0.0, channels=4, form="injected").double()
    y = torch.randn(2, 30, dtype=torch.float64)
    z = y
    for _ in range(2):
        z = y + dn.operator.net(torch.stack([z, y], 1)).squeeze(1)
    with torch.no_grad():
        torch.testing.assert_close(dn(y), z, atol=1e-12, rtol=0)
    with pytest.raises(ValidationError, match="form"):
        PicardTransformer(2, 8, 1, seq_len=6, form="skip")
    with pytest.raises(ValidationError, match="form"):
        IterativeDenoiser(form="skip")


def test_patch_transformer_tokens_round_trip_and_are_the_patches():
    m = PatchTransformer(grid=8, patch=4, d_model=8, max_iter=2).double()
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    t = m.tokens(x)
    assert t.shape == (2, 4, 16)
    torch.testing.assert_close(t[:, 1].reshape(2, 4, 4), x[:, :4, 4:], atol=0, rtol=0)  # row-major patches
    torch.testing.assert_close(m.field(t), x, atol=0, rtol=0)
    assert m(x).shape == (2, 8, 8)
    with pytest.raises(ShapeMismatchError, match="x must be"):
        m(torch.randn(2, 6, 6, dtype=torch.float64))
    with pytest.raises(ValidationError, match="multiple of patch"):
        PatchTransformer(grid=10, patch=4)


def test_deq_trained_injected_operator_reaches_its_fixed_point():
    # the implicit-gradient mode returns z* of T(., u): the residual, measured by calling the operator, is small
    torch.manual_seed(3)
    m = PatchTransformer(grid=8, patch=4, d_model=8, max_iter=60, alpha=0.0, form="injected", backward="implicit",
                         tol=1e-6).double()
    with torch.no_grad():
        for p in m.operator.parameters():
            p.mul_(0.3)  # a small F: T is a contraction
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    u = m.inject(x)
    z = m.picard(u, z0=m.start(u))
    t = m.operator(z, u)
    assert float(((t - z).flatten(1).norm(dim=1) / t.flatten(1).norm(dim=1)).max().detach()) < 1e-5
    z.sum().backward()  # the implicit gradient runs
    assert m.net.embed.weight.grad is not None and torch.isfinite(m.net.embed.weight.grad).all()
