"""DEQOptions.divergence_ratio reaches the forward loop (no hard-coded ratio) and is validated."""
import pytest
import torch

import iterlayers as il
from iterlayers.errors import ValidationError


def test_divergence_ratio_decides_when_a_growing_residual_is_divergence():
    x = torch.ones(2, 3, dtype=torch.float64)

    def f(z, x):  # z -> x - 1.5 z: Picard oscillates with growing amplitude (the fixed point x / 2.5 exists)
        return x - 1.5 * z

    tight, loose = {}, {}
    with torch.no_grad():
        il.deq_solve(f, torch.zeros_like(x), args=(x,), solver="picard", max_iter=60, on_failure="ignore",
                     divergence_ratio=10.0, stats=tight)
        il.deq_solve(f, torch.zeros_like(x), args=(x,), solver="picard", max_iter=60, on_failure="ignore",
                     stats=loose)
    # |r_k| = 1.5^k |r_0|: above 10 |r_0| after 6 steps; the default 1e6 is crossed after 35
    assert tight["forward"].status == "diverged" and int(tight["forward"].nstep.max()) == 6
    assert loose["forward"].status == "diverged" and int(loose["forward"].nstep.max()) == 35


@pytest.mark.parametrize("bad", [1.0, 0.5, float("nan"), "2"])
def test_bad_divergence_ratio(bad):
    with pytest.raises((ValidationError, TypeError)):
        il.DEQOptions(divergence_ratio=bad)
