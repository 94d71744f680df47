"""SHINE's accuracy against the exact implicit gradient (docs/gradients.md has the table this prints).

Cells ``tanh(W z + U x + b)`` with ``||W||_2`` in {0.5, 0.9, 0.99}, widths 16 and 64, batch 8, float64, forward
Broyden (memory 50) to ``atol=1e-8``. Reported: the relative error of ``dL/dx`` against the implicit gradient
(Anderson adjoint to its defaults) for SHINE's estimate, JFB, and 3 / 6 adjoint iterations started from the
right-hand side (``ImplicitGradient(max_iter=k)``) or from SHINE's estimate (``ShineGradient(refine=k)``).
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

import iterlayers as il

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import TanhCell  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore", il.ConvergenceWarning)
    torch.manual_seed(0)
    modes = {"shine": "shine", "jfb": "jfb", "implicit 3 it.": il.ImplicitGradient(max_iter=3),
             "shine + 3 it.": il.ShineGradient(refine=3), "implicit 6 it.": il.ImplicitGradient(max_iter=6),
             "shine + 6 it.": il.ShineGradient(refine=6)}
    rows = []
    for norm in (0.5, 0.9, 0.99):
        for n in (16, 64):
            cell = TanhCell(n, norm=norm, seed=3)
            x = torch.randn(8, n, dtype=torch.float64)
            g = torch.randn(8, n, dtype=torch.float64)

            def grad(backward):
                xx = x.clone().requires_grad_()
                deq = il.DEQ(cell, solver="broyden", atol=1e-8, rtol=0, max_iter=200, backward=backward,
                             solver_options={"memory": 50}, on_failure="ignore")
                (deq(xx) * g).sum().backward()
                return xx.grad, deq

            ref, deq = grad("implicit")
            row = {"norm": norm, "n": n, "broyden_steps": float(deq.stats["forward"].nstep.float().mean())}
            for name, mode in modes.items():
                row[name] = float((grad(mode)[0] - ref).norm() / ref.norm())
            rows.append(row)
    head = ["||W||", "n", "Broyden steps", *modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['norm']} | {r['n']} | {r['broyden_steps']:.1f} | "
                     + " | ".join(f"{r[k]:.2g}" for k in modes) + " |")
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "shine.json").write_text(json.dumps(rows, indent=1))
        (out / "shine.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
