"""Deep frame potential: lower bound, its attainment for chains, dataless minimisation."""
import pytest
import torch

from iterlayers.frames import (
    STRUCTURES,
    FrameArchitecture,
    deep_frame_potential,
    deep_frame_potential_lower_bound,
    minimize_deep_frame_potential,
)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_lower_bound_holds_for_random_weights(structure, kind):
    shape = (7,) if kind == "fc" else (2, 6)
    arch = FrameArchitecture(shape, (4, 4, 4), structure=structure, kind=kind)
    lb = deep_frame_potential_lower_bound(arch)
    for seed in range(15):
        W = arch.init_weights(generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert float(deep_frame_potential((arch, W))) >= lb * (1 - 1e-12)


def test_chain_bound_attained_by_tight_layers():
    # Layer frames that are unit-norm tight frames / orthonormal reach the chain bound exactly.
    d0, n = 4, 4
    Q1, _ = torch.linalg.qr(torch.randn(d0, n, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    arch = FrameArchitecture((d0,), (n, n))
    dfp = deep_frame_potential((arch, [Q1.T, Q2.T]))
    assert float(dfp) == pytest.approx(deep_frame_potential_lower_bound(arch), rel=1e-12)
    # closed form: diagonal blocks (n + 3n)/4 and n/1 ... ; (I + I)/2 -> n ; last block n ; cross 2 n / 2
    assert float(deep_frame_potential((arch, [Q1.T, Q2.T]), normalize="none")) == pytest.approx(n + n + n, rel=1e-12)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_minimisation_decreases_to_bound(structure):
    arch = FrameArchitecture((6,), (5, 5, 5), structure=structure)
    res = minimize_deep_frame_potential(arch, steps=250, lr=0.05, seed=0, dtype=torch.float64)
    assert res.dfp < res.initial_dfp
    assert res.dfp >= res.lower_bound * (1 - 1e-9)
    gap0 = res.initial_dfp - res.lower_bound
    if structure == "dense":
        # The hidden-only dense frame's bound is loose (its learned off-diagonal Gram blocks are bounded by 0):
        # the minimum is checked instead by its reproducibility from independent starts.
        others = [minimize_deep_frame_potential(arch, steps=250, lr=0.05, seed=s, dtype=torch.float64).dfp
                  for s in (1, 2)]
        assert max(others + [res.dfp]) - min(others + [res.dfp]) < 0.01 * res.dfp
        assert res.dfp - res.lower_bound < 0.25 * gap0
    else:
        assert res.dfp - res.lower_bound < 0.05 * gap0
    if structure == "chain":  # the chain bound is the exact minimum
        assert res.dfp == pytest.approx(res.lower_bound, rel=1e-3)
    # the returned weights reproduce the reported value
    assert float(deep_frame_potential((arch, res.weights))) == pytest.approx(min(res.history), rel=1e-6)


def test_skip_connections_lower_the_minimal_dfp():
    vals = {s: minimize_deep_frame_potential(FrameArchitecture((8,), (6, 6, 6), structure=s), steps=200).dfp
            for s in STRUCTURES}
    assert vals["residual"] < vals["chain"] and vals["dense"] < vals["chain"]


def test_gradient_of_dfp_matches_finite_differences():
    arch = FrameArchitecture((4,), (3, 3), structure="dense")
    W = [w.requires_grad_(True) for w in arch.init_weights(generator=torch.Generator().manual_seed(3), dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda a, b: deep_frame_potential((arch, [a, b])), tuple(W))


def test_bad_arguments():
    with pytest.raises(TypeError, match="FrameArchitecture"):
        minimize_deep_frame_potential("chain")
    with pytest.raises(ValueError, match="lr"):
        minimize_deep_frame_potential(FrameArchitecture((3,), (2,)), lr=0.0)
    with pytest.raises(ValueError, match="different widths"):
        FrameArchitecture((3,), (2, 4, 3), structure="residual")
    with pytest.raises(ValueError, match="skip"):
        FrameArchitecture((3,), (2, 2, 2), structure="residual", skip=1)


def test_lbfgs_reaches_the_exact_chain_minimum():
    # The chain's minimum is known in closed form (tight layer frames attain the bound): L-BFGS from a
    # Gaussian start reaches it, in far fewer evaluations than Adam needs.
    arch = FrameArchitecture((6,), (4, 8, 8))
    res = minimize_deep_frame_potential(arch, steps=100, method="lbfgs", dtype=torch.float64, tol=1e-12)
    assert res.dfp == pytest.approx(res.lower_bound, rel=1e-6)
    assert res.dfp == pytest.approx(float(deep_frame_potential((arch, res.weights))), rel=1e-12)  # best = weights
    assert len(res.history) <= 200


@pytest.mark.parametrize("channels, shape, kernel, stride", [
    ((4, 8, 8), (1, 8, 8), 3, 1),  # dense conv net on 8x8 images (no closed-form minimum)
    ((8, 8, 8, 8), (3, 16, 16), (4, 3, 3, 3), (4, 1, 1, 1)),  # strided patch stem, then 3x3 convs on 4x4
])
def test_lbfgs_matches_the_adam_reference_on_dense_conv_nets(channels, shape, kernel, stride):
    # The reference: 400 Adam steps (float64, lr 0.01, no early stop: tol=-inf) from the tight start; on these
    # nets Adam has settled to 1e-8 (relative) by step 300. The fast minimiser (L-BFGS from the same start,
    # float32 as in the experiment) must reach the same minimum within 1e-5 (relative), in < 20 evaluations.
    import math

    from iterlayers.frames import ConvFrameArchitecture

    arch = ConvFrameArchitecture(shape, channels, kernel_size=kernel, stride=stride, structure="dense")
    start = arch.tight_weights(dtype=torch.float64)
    ref = minimize_deep_frame_potential(arch, steps=400, lr=0.01, init=start, dtype=torch.float64, tol=-math.inf)
    fast = minimize_deep_frame_potential(arch, steps=30, method="lbfgs", init=start)
    assert len(ref.history) == 401 and len(fast.history) < 20
    assert fast.dfp == pytest.approx(ref.dfp, rel=1e-5)
    assert fast.dfp >= fast.lower_bound and fast.dfp < 0.95 * fast.initial_dfp  # it did move off the start
    exact = float(deep_frame_potential((arch, [w.double() for w in fast.weights])))
    assert exact == pytest.approx(fast.dfp, rel=1e-5)


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        minimize_deep_frame_potential(FrameArchitecture((3,), (2,)), method="sgd")
