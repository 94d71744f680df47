"""iterlayers vs torchdeq, same process, same cells, same batch, same tolerance.

Run: ``make bench`` (or ``python benchmarks/bench_torchdeq.py --out results/bench [--quick]``).

For each cell the forward pass is solved to the same absolute residual ``tol`` (per-sample 2-norm; torchdeq
stops when the batch maximum is below ``tol``, iterlayers when every sample is) by every solver of both
libraries; the backward pass is the implicit (IFT) gradient with each library's adjoint solver to the same
tolerance (incoming gradients of unit norm per sample). Reported: median wall time, NFE, achieved max residual, and the bytes saved for backward by
autograd (the activation memory that an implicit gradient must keep flat in the number of forward
iterations). Ratios are iterlayers / torchdeq-best (lower is better).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import iterlayers as il

try:
    from torchdeq import get_deq
except ImportError as e:  # pragma: no cover - bench extra
    raise SystemExit("torchdeq is not installed: pip install -e '.[bench]'") from e


class MLPCell(nn.Module):
    """``tanh(W z + U x + b)`` with ``||W||_2 = scale``."""

    def __init__(self, d: int, scale: float, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Linear(d, d, bias=False)
        self.U = nn.Linear(d, d)
        with torch.no_grad():
            W = torch.randn(d, d, generator=g)
            self.W.weight.copy_(scale * W / torch.linalg.matrix_norm(W, 2))
            self.U.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


class OscillatingCell(nn.Module):
    """``tanh(W z + U x / 2)`` with symmetric ``W`` of spectrum ``[-1.5, 0.6]``: near the fixed point the
    Jacobian has eigenvalues below -1, so plain (undamped) fixed-point iteration oscillates and fails."""

    def __init__(self, d: int, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        self.W = nn.Linear(d, d, bias=False)
        self.U = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.W.weight.copy_(Q @ torch.diag(torch.linspace(-1.5, 0.6, d)) @ Q.T)
            self.U.weight.copy_(0.5 * torch.randn(d, d, generator=g) / d**0.5)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


class ConvCell(nn.Module):
    """``relu-free`` small conv cell ``tanh(conv2(tanh(conv1(z))) + x)``, scaled to be contractive."""

    def __init__(self, c: int, scale: float = 0.8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            for conv in (self.c1, self.c2):
                conv.weight.mul_(scale**0.5 / conv.weight.abs().sum(dim=(1, 2, 3)).max())

    def forward(self, z, x):
        return torch.tanh(self.c2(torch.tanh(self.c1(z))) + x)


def saved_bytes(fn):
    """Run ``fn`` and count the bytes autograd saves for backward during it."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def timed_fb(forward, reps):
    """Median forward (with graph) and backward times of ``(forward() * G).sum().backward()``.

    ``G`` has unit-norm rows, so the incoming gradient of every sample has norm 1 and torchdeq's absolute
    backward tolerance and iterlayers' relative one (relative to ``||g_i||``) are the same number.
    """
    tf, tb = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        z = forward()
        t1 = time.perf_counter()
        G = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=z.dtype)
        G = G / G.flatten(1).norm(dim=1).view(-1, *[1] * (G.dim() - 1))
        (z * G).sum().backward()
        tb.append(time.perf_counter() - t1)
        tf.append(t1 - t0)
    return statistics.median(tf), statistics.median(tb)


def timed(fn, reps):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_case(name, cell, x, tol, max_iter, reps, ours, theirs):
    rows = []
    z0 = torch.zeros_like(x)
    for solver, opts in ours:
        deq = il.DEQ(cell, solver=solver, solver_options=opts, atol=tol, rtol=0, max_iter=max_iter,
                     backward_solver="anderson", backward_atol=tol, backward_rtol=0, backward_max_iter=max_iter,
                     on_failure="ignore")
        with torch.no_grad():
            t_f, _ = timed(lambda: deq(x, z0), reps)
        st = deq.stats["forward"]
        xg = x.clone().requires_grad_()
        _, t_b = timed_fb(lambda: deq(xg, z0), reps)
        bst = deq.stats["backward"]
        (_, mem) = saved_bytes(lambda: deq(xg, z0))
        rows.append(dict(case=name, lib="iterlayers", solver=solver, fwd_s=t_f, fwd_nfe=st.nfe,
                         fwd_res=float(st.abs_residual.max()), converged=st.status == "converged",
                         bwd_s=t_b, bwd_nfe=bst.nfe if bst else None, saved_MB=mem / 2**20))
    for solver in theirs:
        deq = get_deq(ift=True, f_solver=solver, f_max_iter=max_iter, f_tol=tol, b_solver="anderson" if solver != "broyden"
                      else "broyden", b_max_iter=max_iter, b_tol=tol)

        bwd_info = {}

        def fwd(xx):
            return deq(lambda z: cell(z, xx), z0, backward_writer=bwd_info.update)

        with torch.no_grad():
            deq.eval()
            t_f, (zs, info) = timed(lambda: fwd(x), reps)
        deq.train()
        res = float(info["abs_lowest"].max())
        nfe = int(info["nstep"].max())
        xg = x.clone().requires_grad_()
        _, t_b = timed_fb(lambda: fwd(xg)[0][-1], reps)
        (_, mem) = saved_bytes(lambda: fwd(xg))
        rows.append(dict(case=name, lib="torchdeq", solver=solver, fwd_s=t_f, fwd_nfe=nfe, fwd_res=res,
                         converged=res < tol, bwd_s=t_b,
                         bwd_nfe=int(bwd_info["nstep"].max()) if "nstep" in bwd_info else None,
                         saved_MB=mem / 2**20))
    return rows


def memory_flatness(cell, x):
    """Bytes saved for backward by the implicit DEQ at 10 and 100 forward iterations."""
    out = {}
    for iters in (10, 100):
        deq = il.DEQ(cell, solver="picard", atol=1e-30, rtol=1e-30, max_iter=iters, on_failure="ignore")
        xg = x.clone().requires_grad_()
        _, mem = saved_bytes(lambda: deq(xg))
        assert int(deq.stats["forward"].nstep.max()) == iters
        out[iters] = mem
    return out


def table(rows):
    lines = ["| case | library | solver | fwd time (ms) | fwd NFE | max residual | converged | bwd time (ms) | "
             "bwd NFE | saved for backward (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['lib']} | {r['solver']} | {1e3 * r['fwd_s']:.1f} | {r['fwd_nfe']} | "
            f"{r['fwd_res']:.1e} | {'yes' if r['converged'] else 'no'} | {1e3 * r['bwd_s']:.1f} | "
            f"{r['bwd_nfe'] if r['bwd_nfe'] is not None else 'n/a'} | "
            f"{r['saved_MB']:.2f} |"
        )
    return "\n".join(lines)


def ratios(rows):
    """iterlayers' best converged solver vs torchdeq's best converged solver, per case."""
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        def best(lib, key):
            cand = [r[key] for r in rows if r["case"] == case and r["lib"] == lib and r["converged"]]
            return min(cand) if cand else float("nan")

        out[case] = {
            "fwd_ratio": best("iterlayers", "fwd_s") / best("torchdeq", "fwd_s"),
            "bwd_ratio": best("iterlayers", "bwd_s") / best("torchdeq", "bwd_s"),
            "torchdeq_converged": any(r["converged"] for r in rows if r["case"] == case and r["lib"] == "torchdeq"),
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    reps = 3 if a.quick else 7
    d, B, tol = 512, 256, 1e-4
    x = torch.randn(B, d)
    ours = [("picard", {}), ("anderson", {"m": 6}), ("broyden", {"memory": 30})]
    theirs = ["fixed_point_iter", "anderson", "broyden"]
    rows = []
    rows += bench_case("mlp d=512 contractive", MLPCell(d, 0.9), x, tol, 60, reps, ours, theirs)
    rows += bench_case("mlp d=512 hard (Picard oscillates)", OscillatingCell(d), x, tol, 100, reps, ours, theirs)
    xc = torch.randn(64, 16, 16, 16)
    rows += bench_case("conv 16x16x16, batch 64", ConvCell(16), xc, tol, 60, reps, ours, theirs)
    mem = memory_flatness(MLPCell(d, 0.9), x)
    r = ratios(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    summary = {"rows": rows, "ratios": r, "implicit_saved_bytes_by_forward_iters": mem,
               "memory_growth_10_to_100": mem[100] / mem[10] - 1, "threads": torch.get_num_threads(),
               "settings": {"d": d, "batch": B, "tol": tol, "reps": reps}}
    (a.out / "bench.json").write_text(json.dumps(summary, indent=2))
    md = [table(rows), "", "| case | forward ratio (iterlayers/torchdeq) | backward ratio |", "|---|---|---|"]
    for case, v in r.items():
        md.append(f"| {case} | {v['fwd_ratio']:.2f} | {v['bwd_ratio']:.2f} |")
    md += ["", f"Implicit-backward saved activations: {mem[10] / 2**20:.2f} MB at 10 forward iterations, "
           f"{mem[100] / 2**20:.2f} MB at 100 ({100 * summary['memory_growth_10_to_100']:+.1f}%).",
           f"CPU threads: {torch.get_num_threads()}; tol {tol} (absolute, per sample); median of {reps} runs."]
    (a.out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return summary


if __name__ == "__main__":
    main()
