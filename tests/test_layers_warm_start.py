"""Warm starts: the previous frame's z* cuts the evaluations on a slowly varying sequence and reaches the same
fixed point; batch norm statistics are updated once per solve from any start. And the docs/aids pages run."""
import re
from pathlib import Path

import pytest
import torch

import iterlayers as il
from problems import BatchNormCell, TanhCell

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs" / "aids").glob("*.md"))


def test_warm_start_cuts_evaluations_and_keeps_the_fixed_point():
    cell = TanhCell(16, norm=0.6)
    layer = il.DEQ(cell, atol=1e-7, rtol=0, max_iter=300).eval()
    g = torch.Generator().manual_seed(0)
    base, drift = torch.randn(6, 16, generator=g, dtype=torch.float64), torch.randn(6, 16, generator=g,
                                                                                   dtype=torch.float64)
    cold, warm, z = [], [], None
    with torch.no_grad():
        for t in range(8):
            x = base + 1e-3 * t * drift
            z_cold = layer(x)
            cold.append(layer.stats["forward"].nfe)
            z_new = layer(x, z0=z) if z is not None else z_cold
            if z is not None:
                warm.append(layer.stats["forward"].nfe)
                torch.testing.assert_close(z_new, z_cold, atol=1e-6, rtol=0)
                # the true residual of the warm-started answer, measured here
                r = (cell(z_new, x) - z_new).norm(dim=1)
                assert float(r.max()) <= 1e-7 * 1.01
            z = z_new
    assert sum(warm) < 0.75 * sum(cold[1:]), (cold, warm)
    print("nfe per frame, cold", cold[1:], "warm", warm)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
def test_batch_norm_updated_once_per_solve_from_a_warm_start(backward):
    torch.manual_seed(0)
    cell = BatchNormCell()
    layer = il.DEQ(cell, backward=backward, on_failure="ignore")  # statistics matter here, not the tolerance
    x = torch.randn(8, 4)
    z = layer(x)
    z.sum().backward()
    assert int(cell.bn.num_batches_tracked) == 1
    layer(x, z0=z.detach()).sum().backward()
    assert int(cell.bn.num_batches_tracked) == 2


def test_every_aid_has_a_page():
    assert {p.stem for p in DOCS} >= {"jacobian", "dropout", "spectral_norm", "warm_start", "trajectory"}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.stem)
def test_aid_page_examples_run(page):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name}[{i}]", "exec"), {})  # noqa: S102 - our own documentation
