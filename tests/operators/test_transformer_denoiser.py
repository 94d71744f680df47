"""The Picard transformer and the iterated denoiser follow their stated update rules exactly."""
import pytest
import torch

from iterlayers.operators import IterativeDenoiser, PicardTransformer


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
