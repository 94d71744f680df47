"""Induced global frames: conv matrices vs torch convolutions, block structures, DFP vs a direct computation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iterlayers.frames import (
    FrameArchitecture,
    assemble_global_frame,
    conv_matrix,
    deep_frame_potential,
)


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 2), (2, 1)])
def test_conv1d_matrix_equals_convolution_on_basis_vectors(stride, padding):
    W = torch.randn(3, 2, 5, dtype=torch.float64)
    A = conv_matrix(W, (2, 11), stride=stride, padding=padding)
    E = torch.eye(22, dtype=torch.float64).view(22, 2, 11)
    ref = F.conv1d(E, W, stride=stride, padding=padding).reshape(22, -1).T
    assert torch.equal(A, ref)
    x = torch.randn(2, 11, dtype=torch.float64)
    assert torch.allclose(A @ x.reshape(-1), F.conv1d(x[None], W, stride=stride, padding=padding).reshape(-1))


def test_conv2d_matrix_equals_convolution_and_is_differentiable():
    W = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    A = conv_matrix(W, (3, 5, 6), stride=(2, 1), padding=(1, 0))
    n = 3 * 5 * 6
    E = torch.eye(n, dtype=torch.float64).view(n, 3, 5, 6)
    ref = F.conv2d(E, W, stride=(2, 1), padding=(1, 0)).reshape(n, -1).T
    assert torch.allclose(A, ref)
    (gA,) = torch.autograd.grad(A.sum(), W)
    (gR,) = torch.autograd.grad(ref.sum(), W)
    assert torch.allclose(gA, gR)


def _direct_chain(B1, B2, B3):
    """Chain global frame built by hand: [[B1,0,0],[-I,B2,0],[0,-I,B3]] with unit-norm layer atoms."""
    n = lambda B: B / B.norm(dim=0, keepdim=True)
    B1, B2, B3 = n(B1), n(B2), n(B3)
    d0, n1, n2, n3 = B1.shape[0], B1.shape[1], B2.shape[1], B3.shape[1]
    Z = lambda r, c: torch.zeros(r, c, dtype=torch.float64)
    top = torch.cat([B1, Z(d0, n2), Z(d0, n3)], 1)
    mid = torch.cat([-torch.eye(n1, dtype=torch.float64), B2, Z(n1, n3)], 1)
    bot = torch.cat([Z(n2, n1), -torch.eye(n2, dtype=torch.float64), B3], 1)
    return torch.cat([top, mid, bot], 0)


def test_chain_dfp_equals_direct_computation():
    torch.manual_seed(0)
    d0, n1, n2, n3 = 5, 4, 6, 3
    B1, B2, B3 = (torch.randn(d0, n1, dtype=torch.float64), torch.randn(n1, n2, dtype=torch.float64),
                  torch.randn(n2, n3, dtype=torch.float64))
    Bg = _direct_chain(B1, B2, B3)
    frame = assemble_global_frame([B1, B2, B3], structure="chain")
    assert torch.allclose(frame.matrix, Bg)
    Bn = Bg / Bg.norm(dim=0, keepdim=True)
    G = Bn.T @ Bn
    n_nonzero = n1**2 + n2**2 + n3**2 + 2 * (n1 * n2 + n2 * n3)  # block-tridiagonal Gram
    assert int(frame.gram_mask().sum()) == n_nonzero
    expected = G.pow(2).sum() / n_nonzero
    assert float(deep_frame_potential([B1, B2, B3])) == pytest.approx(float(expected), rel=1e-12)
    assert float(deep_frame_potential([B1, B2, B3], normalize="none")) == pytest.approx(float(G.pow(2).sum()), rel=1e-12)
    # the same network as nn.Sequential (last Linear = classifier, not part of the frame)
    seq = nn.Sequential(nn.Linear(d0, n1), nn.ReLU(), nn.Linear(n1, n2), nn.ReLU(), nn.Linear(n2, n3), nn.ReLU(),
                        nn.Linear(n3, 2)).double()
    with torch.no_grad():
        for lin, B in zip([seq[0], seq[2], seq[4]], [B1, B2, B3]):
            lin.weight.copy_(B.T)
    assert float(deep_frame_potential(seq).detach()) == pytest.approx(float(expected), rel=1e-12)


def test_residual_and_dense_block_structures():
    torch.manual_seed(1)
    d0, n = 5, 3
    Bs = [torch.randn(d0, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)]
    R = assemble_global_frame(Bs, structure="residual", normalize_atoms=False).matrix
    I = torch.eye(n, dtype=torch.float64)
    # rows: [x (5); h_1 (3); h_2 (3)], columns: [w_1, w_2, w_3]
    assert torch.equal(R[:5, :3], Bs[0]) and torch.equal(R[5:8, 3:6], Bs[1]) and torch.equal(R[8:11, 6:9], Bs[2])
    assert torch.equal(R[5:8, :3], -I) and torch.equal(R[8:11, :3], -I) and torch.equal(R[8:11, 3:6], -I)
    assert torch.count_nonzero(R[:5, 3:]) == 0 and torch.count_nonzero(R[5:8, 6:]) == 0
    Dn = [torch.randn(d0, 2, dtype=torch.float64), torch.randn(d0 + 2, 3, dtype=torch.float64),
          torch.randn(d0 + 5, 4, dtype=torch.float64)]
    D = assemble_global_frame(Dn, structure="dense", normalize_atoms=False).matrix
    assert D.shape == (d0 + 2 + 3, 2 + 3 + 4)
    assert torch.equal(D[:, 5:9], Dn[2])  # the last layer's frame spans every row block
    assert torch.equal(D[:7, 2:5], Dn[1]) and torch.equal(D[7:10, 2:5], -torch.eye(3, dtype=torch.float64))
    assert torch.equal(D[5:7, :2], -torch.eye(2, dtype=torch.float64))
    # the Gram matrices of residual/dense frames have more non-zero entries than the chain's
    chain = assemble_global_frame(Bs, structure="chain")
    res = assemble_global_frame(Bs, structure="residual")
    assert int(res.gram_mask().sum()) > int(chain.gram_mask().sum())


def test_conv_architecture_frames_match_conv_layers():
    arch = FrameArchitecture((2, 9), (3, 3), structure="dense", kind="conv", kernel_size=3)
    W = arch.init_weights(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    frames = arch.layer_frames(W)
    x = torch.randn(2, 9, dtype=torch.float64)
    assert torch.allclose(x.reshape(-1) @ frames[0], F.conv1d(x[None], W[0], padding=1).reshape(-1))
    u = torch.cat([x, torch.randn(3, 9, dtype=torch.float64)])
    assert torch.allclose(u.reshape(-1) @ frames[1], F.conv1d(u[None], W[1], padding=1).reshape(-1))


def test_bad_shapes_and_options():
    with pytest.raises(ValueError, match="structure"):
        assemble_global_frame([torch.randn(3, 2)], structure="skip")
    with pytest.raises(ValueError, match="rows"):
        assemble_global_frame([torch.randn(3, 2), torch.randn(4, 2)], structure="chain")
    with pytest.raises(ValueError, match="widths"):
        assemble_global_frame([torch.randn(3, 2), torch.randn(2, 3)], structure="residual")
    with pytest.raises(ValueError, match="channels"):
        conv_matrix(torch.randn(2, 3, 3), (2, 8))
    with pytest.raises(ValueError, match="kind"):
        FrameArchitecture((4,), (3,), kind="rnn")
    with pytest.raises(ValueError, match="normalize"):
        deep_frame_potential([torch.randn(3, 2)], normalize="mean")


def test_dfp_of_conv_sequential_matches_architecture():
    torch.manual_seed(5)
    seq = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv1d(3, 3, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 8, 2)).double()
    arch = FrameArchitecture((2, 8), (3, 3), structure="chain", kind="conv", kernel_size=3)
    ref = deep_frame_potential((arch, [seq[0].weight, seq[2].weight])).detach()
    got = deep_frame_potential(seq, input_shape=(2, 8)).detach()
    assert float(got) == pytest.approx(float(ref), rel=1e-12)
    with pytest.raises(ValueError, match="input_shape"):
        deep_frame_potential(seq)
