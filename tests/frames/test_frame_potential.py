"""Frame potential, coherence and their bounds against closed forms (orthonormal, simplex ETF, harmonic UNTF)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iterlayers.frames import frame_potential, frame_potential_lower_bound, mutual_coherence, welch_bound


def simplex_etf(d: int) -> torch.Tensor:
    """d+1 unit vectors in R^d with pairwise inner products -1/d (the regular simplex)."""
    k = d + 1
    E = torch.eye(k, dtype=torch.float64) - 1.0 / k  # centred basis vectors, in the sum-zero hyperplane
    Q, _ = torch.linalg.qr(torch.cat([torch.ones(k, 1, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64)], 1))
    basis = Q[:, 1:]  # orthonormal basis of the sum-zero hyperplane
    V = basis.T @ E
    return V / V.norm(dim=0, keepdim=True)


def harmonic_frame(k: int, d: int) -> torch.Tensor:
    """Real harmonic unit-norm tight frame (d even, k > d)."""
    j = torch.arange(k, dtype=torch.float64)
    rows = []
    for m in range(1, d // 2 + 1):
        rows += [torch.cos(2 * math.pi * m * j / k), torch.sin(2 * math.pi * m * j / k)]
    return torch.stack(rows) * math.sqrt(2.0 / d)


@pytest.mark.parametrize("d", [2, 3, 5, 8])
def test_simplex_etf_closed_forms(d):
    V = simplex_etf(d)
    k = d + 1
    G = V.T @ V
    assert torch.allclose(G[~torch.eye(k, dtype=torch.bool)], torch.full((k * (k - 1),), -1.0 / d, dtype=torch.float64))
    assert float(mutual_coherence(V)) == pytest.approx(1.0 / d, abs=1e-12)
    assert float(mutual_coherence(V)) == pytest.approx(welch_bound(k, d), abs=1e-12)
    assert float(frame_potential(V)) == pytest.approx(k * k / d, rel=1e-12)
    assert float(frame_potential(V)) == pytest.approx(frame_potential_lower_bound(k, d), rel=1e-12)


@pytest.mark.parametrize("k,d", [(7, 4), (9, 6), (12, 2)])
def test_harmonic_untf_reaches_fp_bound(k, d):
    F = harmonic_frame(k, d)
    assert torch.allclose(F.norm(dim=0), torch.ones(k, dtype=torch.float64))
    assert torch.allclose(F @ F.T, (k / d) * torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert float(frame_potential(F)) == pytest.approx(k * k / d, rel=1e-12)


def test_orthonormal_frame_potential_is_k_and_scale_invariant():
    Q, _ = torch.linalg.qr(torch.randn(9, 5, dtype=torch.float64))
    assert float(frame_potential(Q)) == pytest.approx(5.0, rel=1e-12)
    assert float(frame_potential(Q * torch.arange(1.0, 6.0, dtype=torch.float64))) == pytest.approx(5.0, rel=1e-12)
    assert float(mutual_coherence(Q)) == pytest.approx(0.0, abs=1e-12)
    assert frame_potential_lower_bound(5, 9) == 5.0
    # unnormalised potential is ||B^T B||_F^2
    B = torch.randn(4, 6, dtype=torch.float64)
    assert float(frame_potential(B, normalize=False)) == pytest.approx(float((B.T @ B).pow(2).sum()), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 8), k=st.integers(2, 20), seed=st.integers(0, 10_000))
def test_bounds_hold_on_random_frames(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, k, generator=g, dtype=torch.float64)
    assert float(frame_potential(B)) >= frame_potential_lower_bound(k, d) * (1 - 1e-12)
    assert float(mutual_coherence(B)) >= welch_bound(k, d) - 1e-12


def test_batched_and_float32():
    B = torch.randn(3, 4, 6)
    fp = frame_potential(B)
    assert fp.shape == (3,) and fp.dtype == torch.float32
    assert torch.allclose(fp[1], frame_potential(B[1]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="k"):
        welch_bound(1, 3)
    with pytest.raises(ValueError, match="d"):
        frame_potential_lower_bound(3, 0)
    with pytest.raises(ValueError, match="shape"):
        frame_potential(torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        frame_potential(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 atoms"):
        mutual_coherence(torch.ones(3, 1))
