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
    I = torch.eye(n, dtype=torch.float64)
    Bs = [torch.randn(d0, n, dtype=torch.float64)] + [torch.randn(n, n, dtype=torch.float64) for _ in range(3)]
    R = assemble_global_frame(Bs, structure="residual", normalize_atoms=False).matrix
    # rows: [x (5); w_1 (3); w_2 (3); w_3 (3)], columns: [w_1, w_2, w_3, w_4]
    assert R.shape == (d0 + 3 * n, 4 * n)
    blk = lambda M, r, c: M[(0 if r == 0 else d0 + (r - 1) * n):(d0 if r == 0 else d0 + r * n), c * n:(c + 1) * n]
    expected = {(0, 0): Bs[0], (1, 1): Bs[1], (2, 2): Bs[2], (3, 3): Bs[3],  # the layer frames
                (1, 0): -I, (2, 1): -I, (3, 2): -I,  # each code's own -I
                (1, 2): I, (2, 3): I}  # one identity per shortcut: w_1 -> layer 3, w_2 -> layer 4
    for r in range(4):
        for c in range(4):
            ref = expected.get((r, c), torch.zeros_like(blk(R, r, c)))
            assert torch.equal(blk(R, r, c), ref), (r, c)
    # skip span 3: the only shortcut is w_1 -> layer 4
    R3 = assemble_global_frame(Bs, structure="residual", normalize_atoms=False, skip=3).matrix
    assert torch.equal(blk(R3, 1, 3), I) and torch.count_nonzero(blk(R3, 1, 2)) == 0
    assert torch.count_nonzero(blk(R3, 2, 3)) == 0
    Dn = [torch.randn(d0, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64),
          torch.randn(5, 4, dtype=torch.float64)]
    D = assemble_global_frame(Dn, structure="dense", normalize_atoms=False).matrix
    # rows: [x (5); w_1 (2); w_2 (3)], columns: [w_1 (2), w_2 (3), w_3 (4)]
    assert D.shape == (d0 + 2 + 3, 2 + 3 + 4)
    assert torch.equal(D[:5, :2], Dn[0]) and torch.count_nonzero(D[:5, 2:]) == 0  # only B_1 acts on the input
    assert torch.equal(D[5:7, :2], -torch.eye(2, dtype=torch.float64)) and torch.equal(D[5:7, 2:5], Dn[1])
    assert torch.equal(D[5:7, 5:9], Dn[2][:2]) and torch.equal(D[7:10, 5:9], Dn[2][2:])  # B_3 split over w_1, w_2
    assert torch.equal(D[7:10, 2:5], -torch.eye(3, dtype=torch.float64)) and torch.count_nonzero(D[7:10, :2]) == 0


def _net_parameters(arch, head=False):
    from iterlayers.frames import DeepFrameNet

    net = DeepFrameNet(arch, 10)
    return sum(p.numel() for m in net.layers for p in m.parameters())


@pytest.mark.parametrize("structure, support, params", [
    # Gram block support at depth 4: chain block tridiagonal, ResNet banded (zero (1,4)/(4,1)), DenseNet full.
    ("chain", [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], 64 * 16 + 3 * 16 * 16 + 4 * 16),
    ("residual", [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], 64 * 16 + 3 * 16 * 16 + 4 * 16),
    ("dense", [[1] * 4] * 4, 64 * 16 + (16 + 32 + 48) * 16 + 4 * 16),
])
def test_gram_support_and_parameter_count_at_depth_4(structure, support, params):
    arch = FrameArchitecture((64,), (16, 16, 16, 16), structure=structure)
    W = arch.init_weights(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    frame = arch.global_frame(W)
    assert frame.gram_block_support.int().tolist() == support
    # the entry-wise support of the actual Gram matrix agrees block by block, and with the closed count
    G = frame.matrix.T @ frame.matrix
    for j in range(4):
        for k in range(4):
            nz = torch.count_nonzero(G[16 * j:16 * (j + 1), 16 * k:16 * (k + 1)].abs() > 1e-12)
            assert bool(nz) == bool(support[j][k]), (j, k)
    assert arch.gram_nonzeros() == int(frame.gram_mask().sum()) == int((G.abs() > 1e-12).sum())
    assert arch.num_parameters() == params == _net_parameters(arch)
    if structure == "dense":
        assert params == 2624  # 64 inputs, 4 x 16 units: the input feeds layer 1 only


def test_conv_architecture_frames_match_conv_layers():
    arch = FrameArchitecture((2, 9), (3, 3), structure="dense", kind="conv", kernel_size=3)
    W = arch.init_weights(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    frames = arch.layer_frames(W)
    x = torch.randn(2, 9, dtype=torch.float64)
    assert torch.allclose(x.reshape(-1) @ frames[0], F.conv1d(x[None], W[0], padding=1).reshape(-1))
    u = torch.randn(3, 9, dtype=torch.float64)  # layer 2 of a dense net reads the hidden code w_1 only
    assert frames[1].shape == (3 * 9, 3 * 9)
    assert torch.allclose(u.reshape(-1) @ frames[1], F.conv1d(u[None], W[1], padding=1).reshape(-1))


def test_bad_shapes_and_options():
    with pytest.raises(ValueError, match="structure"):
        assemble_global_frame([torch.randn(3, 2)], structure="skip")
    with pytest.raises(ValueError, match="rows"):
        assemble_global_frame([torch.randn(3, 2), torch.randn(4, 2)], structure="chain")
    with pytest.raises(ValueError, match="widths"):
        assemble_global_frame([torch.randn(3, 2), torch.randn(2, 3), torch.randn(3, 3)], structure="residual")
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


@pytest.mark.parametrize("structure", ["chain", "residual", "dense"])
def test_every_normalisation_against_a_direct_computation(structure):
    from iterlayers.frames.deep_potential import NORMALIZATIONS

    arch = FrameArchitecture((6,), (4, 4, 4, 4), structure=structure)
    W = arch.init_weights(generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    B = arch.global_frame(W).matrix
    Bn = B / B.norm(dim=0, keepdim=True)
    G = Bn.T @ Bn
    S = (B != 0).double().T @ (B != 0).double() > 0
    off = S & ~torch.eye(G.shape[0], dtype=torch.bool)
    direct = {"nonzero": (G ** 2).sum() / S.sum(), "none": (G ** 2).sum(), "full": (G ** 2).sum() / G.shape[0] ** 2,
              "offdiagonal": (G[off] ** 2).mean(), "rms": (G[off] ** 2).mean().sqrt(), "mean_abs": G[off].abs().mean()}
    assert set(direct) == set(NORMALIZATIONS)
    for name, ref in direct.items():
        assert float(deep_frame_potential((arch, W), normalize=name)) == pytest.approx(float(ref), rel=1e-12), name
