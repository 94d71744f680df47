"""2-D convolutional deep frames: the per-frequency (FFT / polyphase) Gram, DFP, N and gradient against the explicit
dense construction (torch's convolution applied to basis images), the derived structural coherence bound."""
import math

import pytest
import torch

from iterlayers.errors import ShapeMismatchError, UnsupportedError, ValidationError
from iterlayers.frames import (
    ConvFrameArchitecture,
    ConvFrameNet,
    conv_coherence_bound,
    conv_gram_potential,
    conv_mutual_coherence,
    conv_symbol,
    deep_frame_potential,
    deep_frame_potential_lower_bound,
    frame_potential,
    global_frame_potential,
    minimize_deep_frame_potential,
    mutual_coherence,
    welch_bound,
)

CASES = [
    dict(input_shape=(2, 6, 6), channels=(3,)),
    dict(input_shape=(2, 6, 6), channels=(3, 4), stride=(2, 1)),
    dict(input_shape=(1, 8, 8), channels=(3, 4, 2), kernel_size=(3, 2, 2), stride=(2, 2, 1)),
    dict(input_shape=(3, 5, 5), channels=(4, 2), kernel_size=(5, 4)),
    dict(input_shape=(2, 6, 6), channels=(3, 3, 3, 3), structure="residual"),
    dict(input_shape=(2, 8, 8), channels=(3, 2, 3, 2, 3), stride=(2, 1, 1, 1, 1), structure="residual"),
    dict(input_shape=(2, 6, 6), channels=(3,) * 5, kernel_size=(3, 1, 3, 5, 3), structure="residual", skip=3),
    dict(input_shape=(2, 8, 8), channels=(3, 2, 4, 2), stride=(2, 1, 1, 1), structure="dense"),
]


def _weights(arch, seed=0):
    return arch.init_weights(generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ConvFrameArchitecture(**kw).name)
def test_spectral_dfp_and_support_equal_the_explicit_construction(kw):
    arch = ConvFrameArchitecture(**kw)
    W = _weights(arch)
    frame = arch.explicit_global_frame(W)
    assert arch.gram_nonzeros() == int(frame.gram_mask().sum())
    for normalize in ("nonzero", "full", "none"):
        ref = global_frame_potential(frame, normalize=normalize)
        ours = deep_frame_potential((arch, W), normalize=normalize)
        assert torch.allclose(ours, ref, rtol=1e-11, atol=0), normalize
    assert deep_frame_potential_lower_bound(arch) <= float(deep_frame_potential((arch, W))) * (1 + 1e-12)


@pytest.mark.parametrize("kw", [CASES[2], CASES[5], CASES[7]], ids=["chain", "residual", "dense"])
def test_spectral_dfp_gradient_equals_the_explicit_gradient(kw):
    arch = ConvFrameArchitecture(**kw)
    W1 = [w.requires_grad_() for w in _weights(arch, 1)]
    W2 = [w.detach().clone().requires_grad_() for w in W1]
    g1 = torch.autograd.grad(deep_frame_potential((arch, W1)), W1)
    g2 = torch.autograd.grad(global_frame_potential(arch.explicit_global_frame(W2)), W2)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)
    assert any(float(a.abs().max()) > 1e-6 for a in g1)


@pytest.mark.parametrize("p,s,f", [(6, 1, 3), (8, 2, 3), (8, 2, 2), (6, 3, 5)])
def test_layer_gram_kernel_entries_equal_the_explicit_gram(p, s, f):
    """``G[(a, U), (b, U')] = K[a, b, U' - U mod q]`` with ``K = irfft2(A^ A^H)`` (module docstring)."""
    arch = ConvFrameArchitecture((2, p, p), (3,), kernel_size=f, stride=s)
    (W,) = _weights(arch, 2)
    (B,) = arch.explicit_layer_frames([W])
    G = B.T @ B
    q = p // s
    S = conv_symbol(W, p, s)
    K = torch.fft.irfft2((S @ S.conj().transpose(-1, -2)).permute(2, 3, 0, 1), s=(q, q))
    idx = torch.arange(q)
    Uh, Uw, Vh, Vw = torch.meshgrid(idx, idx, idx, idx, indexing="ij")
    for a in range(3):
        for b in range(3):
            ours = K[a, b][(Vh - Uh) % q, (Vw - Uw) % q]
            ref = G[a * q * q + Uh * q + Uw, b * q * q + Vh * q + Vw]
            assert torch.allclose(ours, ref, atol=1e-12)
    Bn = B / B.norm(dim=0, keepdim=True)
    assert torch.allclose(conv_mutual_coherence(W, p, s), mutual_coherence(Bn), atol=1e-12)
    assert torch.allclose(conv_gram_potential(W, p, s), frame_potential(B), rtol=1e-12)


def test_conv_operator_is_the_layer_frame_transpose_and_the_net_uses_it():
    arch = ConvFrameArchitecture((2, 6, 6), (3, 3, 3), stride=(2, 1, 1), structure="residual", skip=2)
    torch.manual_seed(0)
    net = ConvFrameNet(arch, 4).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    frames = arch.explicit_layer_frames(net.weights())
    codes = net.codes(x)
    u = x.reshape(5, -1)
    ref = []
    for j, (B, m) in enumerate(zip(frames, net.layers)):
        z = (ref[-1] if j else u) @ B + m.bias.repeat_interleave(9)
        if j >= 2:
            z = z + ref[j - 2]
        ref.append(torch.relu(z))
    for c, r in zip(codes, ref):
        assert torch.allclose(c.reshape(5, -1), r)
    heads = sum(p.numel() for p in net.head.parameters())
    assert sum(p.numel() for p in net.parameters()) - heads == arch.num_parameters()
    assert net(x).shape == (5, 4) and "residual" in repr(net)
    ref_dfp = deep_frame_potential((arch, net.weights()))
    assert torch.equal(deep_frame_potential(net), ref_dfp)
    assert torch.equal(deep_frame_potential(torch.nn.Sequential(torch.nn.Unflatten(1, (2, 6, 6)), net)), ref_dfp)
    dense = ConvFrameArchitecture((3, 8, 8), (4, 5, 6), structure="dense")
    assert sum(p.numel() for p in ConvFrameNet(dense, 10).layers.parameters()) == dense.num_parameters() \
        == 4 * 3 * 9 + 5 * 4 * 9 + 6 * 9 * 9 + 15


def test_structural_coherence_bound_is_respected_and_above_welch():
    """Random and coherence-minimised conv frames stay above the derived bound; a dense frame of the same size,
    minimised the same way, goes below it (the bound is a property of weight sharing, not of the size)."""
    p, d, k, f, s = 10, 1, 4, 3, 1
    bound = conv_coherence_bound(p, d, k, f, s)
    K, D = k * (p // s) ** 2, d * p * p
    assert bound > welch_bound(K, D) * 1.5
    for args in [(8, 2, 16, 3, 2), (8, 1, 8, 3, 1), (12, 3, 20, 5, 2)]:
        pp, dd, kk, ff, ss = args
        assert conv_coherence_bound(*args) >= welch_bound(kk * (pp // ss) ** 2, dd * pp * pp)
    # L = p / s (the filter spans the grid): the bound is exactly Welch's
    assert conv_coherence_bound(4, 1, 3, 3, 1) == pytest.approx(welch_bound(3 * 16, 16))

    def soft_coherence(G):
        off = G[~torch.eye(G.shape[0], dtype=torch.bool)]
        return torch.logsumexp(40 * off.abs(), 0) / 40

    g = torch.Generator().manual_seed(0)
    Wc = torch.randn(k, d, f, f, generator=g, dtype=torch.float64, requires_grad=True)
    Bd = torch.randn(D, K, generator=g, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([Wc, Bd], lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        (B,) = ConvFrameArchitecture((d, p, p), (k,), kernel_size=f).explicit_layer_frames([Wc])
        Gc = (B / B.norm(dim=0)).T @ (B / B.norm(dim=0))
        Gd = (Bd / Bd.norm(dim=0)).T @ (Bd / Bd.norm(dim=0))
        (soft_coherence(Gc) + soft_coherence(Gd)).backward()
        opt.step()
    mu_conv = float(conv_mutual_coherence(Wc.detach(), p, s))
    mu_dense = float(mutual_coherence(Bd.detach()))
    assert mu_conv >= bound - 1e-12
    assert mu_dense < bound < mu_conv + 0.15  # the dense frame beats the conv bound; the conv one gets near it
    for seed in range(5):
        Wr = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert float(conv_mutual_coherence(Wr, 8, 2)) >= conv_coherence_bound(8, 2, 8, 3, 2)


def test_minimised_conv_chain_reaches_the_closed_form_bound():
    """Weight sharing does not keep a conv chain with f >= s from tight layers (filters on one s x s block:
    per-frequency symbols ``H D(xi)``, ``D`` diagonal unitary), so Adam reaches the FC-form bound."""
    arch = ConvFrameArchitecture((2, 8, 8), (6, 6, 10), stride=(2, 1, 1))
    res = minimize_deep_frame_potential(arch, steps=600, lr=0.03, dtype=torch.float64, tol=0)
    assert res.dfp / res.lower_bound - 1 < 1e-3
    assert res.dfp <= res.initial_dfp


def test_bad_conv_architectures_and_zero_padding_are_refused():
    with pytest.raises(ValidationError, match="stride 3 does not divide"):
        ConvFrameArchitecture((3, 8, 8), (4,), stride=3)
    with pytest.raises(ValidationError, match="kernel 5 is larger"):
        ConvFrameArchitecture((3, 8, 8), (4, 4), kernel_size=5, stride=(4, 1))
    with pytest.raises(ValidationError, match="spans a strided layer"):
        ConvFrameArchitecture((3, 8, 8), (4, 4, 4), stride=(1, 2, 1), structure="residual")
    with pytest.raises(ValidationError, match="first layer only"):
        ConvFrameArchitecture((3, 8, 8), (4, 4), stride=(1, 2), structure="dense")
    with pytest.raises(ValidationError, match="padding"):
        ConvFrameArchitecture((3, 8, 8), (4,), padding="same")
    with pytest.raises(ValidationError, match="square"):
        ConvFrameArchitecture((3, 8, 6), (4,))
    with pytest.raises(ValidationError, match="one value per layer"):
        ConvFrameArchitecture((3, 8, 8), (4, 4), stride=(1,))
    arch = ConvFrameArchitecture((2, 6, 6), (3, 3), padding="zero")
    W = _weights(arch)
    with pytest.raises(UnsupportedError, match="circular"):
        deep_frame_potential((arch, W))
    with pytest.raises(ShapeMismatchError, match="layer 2"):
        ConvFrameArchitecture((2, 6, 6), (3, 3)).potential([W[0], W[0]])
    # zero padding: border atoms are truncated; the explicit frame differs from the circular one there only
    circ = ConvFrameArchitecture((2, 6, 6), (3, 3))
    Bz, Bc = arch.explicit_layer_frames(W)[0], circ.explicit_layer_frames(W)[0]
    assert not torch.equal(Bz, Bc) and torch.equal(Bz[Bz != 0], Bc[Bz != 0])
    assert math.isfinite(float(global_frame_potential(arch.explicit_global_frame(W))))


@pytest.mark.parametrize("kw", [
    dict(input_shape=(3, 8, 8), channels=(6, 6, 12), kernel_size=(2, 3, 3), stride=(2, 1, 1)),
    dict(input_shape=(2, 8, 8), channels=(8, 16, 16), kernel_size=(3, 3, 1), stride=(2, 1, 1)),
    dict(input_shape=(3, 8, 8), channels=(13, 7, 7, 20), kernel_size=(2, 3, 3, 1), stride=(2, 1, 1, 1)),
    dict(input_shape=(3, 8, 8), channels=(4, 4, 4, 4), kernel_size=(2, 3, 3, 3), stride=(2, 1, 1, 1),
         structure="residual"),
], ids=["chain-s2", "chain-expand", "chain-harmonic", "residual"])
def test_tight_weights_attain_the_closed_form_bound(kw):
    arch = ConvFrameArchitecture(**kw)
    W = arch.tight_weights(dtype=torch.float64)
    assert all(torch.allclose(w.flatten(1).norm(dim=1), torch.ones(w.shape[0], dtype=torch.float64)) for w in W)
    dfp = float(deep_frame_potential((arch, W)))
    assert dfp == pytest.approx(deep_frame_potential_lower_bound(arch), rel=1e-12)
    # the explicit support at these sparse weights is smaller than the structural one: compare ||G||_F^2
    fp = float(global_frame_potential(arch.explicit_global_frame(W), normalize="none"))
    assert float(deep_frame_potential((arch, W), normalize="none")) == pytest.approx(fp, rel=1e-12)
    with pytest.raises(UnsupportedError, match="no tight start"):
        ConvFrameArchitecture((2, 8, 8), (5, 3), kernel_size=(1, 3), stride=(2, 1)).tight_weights()


@pytest.mark.parametrize("structure", ["chain", "residual", "dense"])
def test_fc_potential_through_the_conv_path_equals_the_explicit_one(structure):
    from iterlayers.frames import FrameArchitecture

    arch = FrameArchitecture((7,), (5, 5, 5, 5), structure=structure)
    W1 = [w.requires_grad_() for w in arch.init_weights(generator=torch.Generator().manual_seed(3), dtype=torch.float64)]
    W2 = [w.detach().clone().requires_grad_() for w in W1]
    a, b = arch.potential(W1), deep_frame_potential((arch, W2))
    assert torch.allclose(a, b, rtol=1e-12)
    for g1, g2 in zip(torch.autograd.grad(a, W1), torch.autograd.grad(b, W2)):
        assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-14)
