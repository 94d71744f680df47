"""iterlayers vs torchdeq, same process, same cells, same batch, same tolerance.

Run: ``make bench`` (or ``python benchmarks/bench_torchdeq.py --out results/bench [--quick]``).

For each cell the forward pass is solved to the same absolute residual ``tol`` (per-sample 2-norm; torchdeq
stops when the batch maximum is below ``tol``, iterlayers when every sample is) by every solver of both
libraries; the backward pass is the implicit (IFT) gradient with each library's adjoint solver to the same
tolerance (incoming gradients of unit norm per sample). Reported: median wall time, NFE, achieved max
residual, and the bytes saved for backward by autograd (the activation memory that an implicit gradient must
keep flat in the number of forward iterations). Ratios are iterlayers-best / torchdeq-best (lower is better).

Both libraries get the same cell object. torchdeq evaluates it as written (``lambda z: cell(z, x)``, its
documented usage); iterlayers' ``DEQ`` hoists the cell's ``z``-independent part (``U x`` of the MLP cells) out
of the solver loop (:mod:`iterlayers.hoist`). The ``hoist=False`` rows and the second ratio column show
iterlayers without it, so the two sources of the difference (fewer/cheaper evaluations vs. loop overhead) can
be told apart.
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


class ResNetCell(nn.Module):
    """The residual conv cell of the "Deep Implicit Layers" tutorial (Kolter, Duvenaud, Johnson, ch. 4):

        y = GN(relu(conv1(z))),    z' = GN(relu(z + GN(x + conv2(y))))

    with N(0, 0.01) weights: the typical small convolutional DEQ cell, which needs tens of iterations.
    """

    def __init__(self, c: int = 16, inner: int = 32, groups: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(c, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, c, 3, padding=1, bias=False)
        self.norm1, self.norm2, self.norm3 = nn.GroupNorm(groups, inner), nn.GroupNorm(groups, c), nn.GroupNorm(groups, c)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(0.01 * torch.randn(conv.weight.shape, generator=g))

    def forward(self, z, x):
        y = self.norm1(torch.relu(self.conv1(z)))
        return self.norm3(torch.relu(z + self.norm2(x + self.conv2(y))))


def pin_allocator() -> str:
    """Fix glibc's malloc thresholds for the whole process, so timings measure compute, not page faults.

    By default glibc serves blocks above a *dynamic* threshold with fresh ``mmap``s (zeroed pages, faulted in
    on first touch) and raises that threshold only once a large block has been freed. A 1 MB activation then
    costs ~0.5 ms of page faults until the process happens to free a big enough block, and the same cell
    runs 2x faster later in the run than earlier: whichever library is timed first pays. Pinning the
    thresholds (what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do) removes the order effect; both
    libraries run under the same setting.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        ok = 0
    return "glibc mmap threshold 32 MB, trim threshold 1 GB" if ok else "default allocator (mallopt unavailable)"


def saved_bytes(fn):
    """Run ``fn`` and count the bytes autograd saves for backward during it."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def unit_rows(z):
    """A fixed incoming gradient with unit-norm rows: every sample's gradient has norm 1, so torchdeq's
    absolute backward tolerance and iterlayers' relative one (relative to ``||g_i||``) are the same number."""
    G = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=z.dtype)
    return G / G.flatten(1).norm(dim=1).view(-1, *[1] * (G.dim() - 1))


def interleaved(configs, reps):
    """Median forward (no graph) and backward times of every config, timed round-robin.

    Each repetition runs every config once, so a slow spell of a shared machine hits all of them alike instead
    of whichever happened to be timed during it. ``config["fwd"]()`` is the no-grad forward;
    ``config["graph"]()`` the forward with a graph, whose output gets ``backward(unit_rows)``.
    """
    for c in configs:
        c["tf"], c["tb"] = [], []
    for _ in range(reps):
        for c in configs:
            with torch.no_grad():
                t0 = time.perf_counter()
                c["fwd"]()
                c["tf"].append(time.perf_counter() - t0)
            if "graph" in c:
                z = c["graph"]()
                G = unit_rows(z)
                t0 = time.perf_counter()
                (z * G).sum().backward()
                c["tb"].append(time.perf_counter() - t0)
    for c in configs:
        c["fwd_s"] = statistics.median(c["tf"])
        c["bwd_s"] = statistics.median(c["tb"]) if c["tb"] else float("nan")


def bench_case(name, cell, x, tol, max_iter, reps, ours, theirs):
    z0 = torch.zeros_like(x)
    xg = x.clone().requires_grad_()
    configs = []
    for solver, opts, hoist in ours:
        deq = il.DEQ(cell, solver=solver, solver_options=opts, atol=tol, rtol=0, max_iter=max_iter,
                     backward_solver="anderson", backward_atol=tol, backward_rtol=0, backward_max_iter=max_iter,
                     on_failure="ignore", hoist=hoist)
        configs.append(dict(lib="iterlayers", solver=solver if hoist else f"{solver} (hoist=False)", hoist=hoist,
                            deq=deq, fwd=lambda d=deq: d(x, z0), graph=lambda d=deq: d(xg, z0)))
    for solver in theirs:
        deq = get_deq(ift=True, f_solver=solver, f_max_iter=max_iter, f_tol=tol,
                      b_solver="anderson" if solver != "broyden" else "broyden", b_max_iter=max_iter, b_tol=tol)
        info = {}

        def fwd(xx, train, d=deq, info=info):
            d.train(train)  # its no-grad forward is timed in eval mode, as one would deploy it
            zs, fwd_info = d(lambda z: cell(z, xx), z0, backward_writer=info.setdefault("bwd", {}).update)
            info["fwd"] = fwd_info
            return zs[-1]

        configs.append(dict(lib="torchdeq", solver=solver, deq=deq, info=info, fwd=lambda f=fwd: f(x, False),
                            graph=lambda f=fwd: f(xg, True)))
    # One cell evaluation, timed with the rest: n of them is the overhead-free floor below.
    configs.append(dict(lib="cell", fwd=lambda: cell(z0, x)))
    interleaved(configs, reps)

    rows = []
    for c in configs[:-1]:
        if c["lib"] == "iterlayers":
            deq = c["deq"]
            with torch.no_grad():
                deq(x, z0)
            st = deq.stats["forward"]
            (_, mem) = saved_bytes(lambda: deq(xg, z0))
            deq(xg, z0).mul(unit_rows(x)).sum().backward()
            bst = deq.stats["backward"]
            rows.append(dict(case=name, lib="iterlayers", solver=c["solver"], hoist=c["hoist"],
                             hoisted_ops=st.info.get("hoisted_ops", 0), fwd_s=c["fwd_s"], fwd_nfe=st.nfe,
                             fwd_res=float(st.abs_residual.max()), converged=st.status == "converged",
                             bwd_s=c["bwd_s"], bwd_nfe=bst.nfe if bst else None, saved_MB=mem / 2**20))
        else:
            info = c["info"]
            with torch.no_grad():
                c["fwd"]()
            fi = info["fwd"]
            res, nfe = float(fi["abs_lowest"].max()), int(fi["nstep"].max())
            (_, mem) = saved_bytes(c["graph"])
            info["bwd"] = {}
            c["graph"]().mul(unit_rows(x)).sum().backward()
            bi = info["bwd"]
            rows.append(dict(case=name, lib="torchdeq", solver=c["solver"], fwd_s=c["fwd_s"], fwd_nfe=nfe,
                             fwd_res=res, converged=res < tol, bwd_s=c["bwd_s"],
                             bwd_nfe=int(bi["nstep"].max()) if "nstep" in bi else None, saved_MB=mem / 2**20))
    # The overhead-free floor: n cell evaluations, n = the NFE of torchdeq's fastest converged solver.
    # floor / torchdeq-best is the ratio a library with zero overhead would reach at torchdeq's NFE: where it
    # is near 1, only fewer or cheaper cell evaluations can give a lower ratio.
    theirs_ok = [r for r in rows if r["lib"] == "torchdeq" and r["converged"]]
    n = min(theirs_ok, key=lambda r: r["fwd_s"])["fwd_nfe"] if theirs_ok else min(r["fwd_nfe"] for r in rows)
    for r in rows:
        r["floor_s"], r["floor_nfe"] = n * configs[-1]["fwd_s"], n
    return rows


def memory_flatness(cell, x):
    """Bytes saved for backward by the implicit DEQ at 10 and 100 forward iterations."""
    out = {}
    for iters in (10, 100):
        deq = il.DEQ(cell, solver="picard", atol=1e-30, rtol=1e-30, max_iter=iters, on_failure="ignore")
        with torch.no_grad():
            deq(x)  # build the hoisting split first: its one-off verification is not part of a solve
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
        def best(lib, key, hoist=True):
            cand = [r[key] for r in rows if r["case"] == case and r["lib"] == lib and r["converged"]
                    and r.get("hoist", True) == hoist]
            return min(cand) if cand else float("nan")

        floor = next(r for r in rows if r["case"] == case)
        out[case] = {
            "fwd_ratio": best("iterlayers", "fwd_s") / best("torchdeq", "fwd_s"),
            "floor_ratio": floor["floor_s"] / best("torchdeq", "fwd_s"),
            "floor_nfe": floor["floor_nfe"],
            "fwd_ratio_no_hoist": best("iterlayers", "fwd_s", False) / best("torchdeq", "fwd_s"),
            "bwd_ratio": best("iterlayers", "bwd_s") / best("torchdeq", "bwd_s"),
            "torchdeq_converged": any(r["converged"] for r in rows if r["case"] == case and r["lib"] == "torchdeq"),
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    a = p.parse_args(argv)
    allocator = pin_allocator()
    torch.manual_seed(0)
    reps = 3 if a.quick else 11
    d, B, tol = 512, 256, 1e-4
    x = torch.randn(B, d)
    ours = [("picard", {}, True), ("anderson", {"m": 6}, True), ("broyden", {"memory": 30}, True),
            ("picard", {}, False), ("anderson", {"m": 6}, False)]
    theirs = ["fixed_point_iter", "anderson", "broyden"]
    xc = torch.randn(64, 16, 16, 16)
    cases = [
        ("mlp d=512 contractive", MLPCell(d, 0.9), x, 60),
        ("mlp d=512 hard (Picard oscillates)", OscillatingCell(d), x, 100),
        ("conv tanh cell 16x16x16, batch 64", ConvCell(16), xc, 60),
        ("conv ResNet cell (DEQ tutorial) 16x16x16, batch 64", ResNetCell(16), xc, 100),
    ]
    # One untimed pass over everything first. The process's first large backward passes change the state
    # of the allocator (glibc raises its mmap threshold once big blocks are freed), after which the same
    # convolution runs ~2x faster; without this warm-up whichever library is timed first pays for it.
    for name, cell, inp, max_iter in cases:
        bench_case(name, cell, inp, tol, max_iter, 1, ours, theirs)
    rows = []
    for name, cell, inp, max_iter in cases:
        rows += bench_case(name, cell, inp, tol, max_iter, reps, ours, theirs)
    mem = memory_flatness(MLPCell(d, 0.9), x)
    r = ratios(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    summary = {"rows": rows, "ratios": r, "implicit_saved_bytes_by_forward_iters": mem,
               "memory_growth_10_to_100": mem[100] / mem[10] - 1, "threads": torch.get_num_threads(),
               "settings": {"d": d, "batch": B, "tol": tol, "reps": reps, "allocator": allocator}}
    (a.out / "bench.json").write_text(json.dumps(summary, indent=2))
    md = [table(rows), "", "| case | forward ratio (iterlayers/torchdeq) | forward ratio, hoist=False | "
          "overhead-free floor (n cell calls / torchdeq) | backward ratio |", "|---|---|---|---|---|"]
    for case, v in r.items():
        md.append(f"| {case} | {v['fwd_ratio']:.2f} | {v['fwd_ratio_no_hoist']:.2f} | "
                  f"{v['floor_ratio']:.2f} (n={v['floor_nfe']}) | {v['bwd_ratio']:.2f} |")
    md += ["", f"Implicit-backward saved activations: {mem[10] / 2**20:.2f} MB at 10 forward iterations, "
           f"{mem[100] / 2**20:.2f} MB at 100 ({100 * summary['memory_growth_10_to_100']:+.1f}%).",
           f"CPU threads: {torch.get_num_threads()}; tol {tol} (absolute, per sample); median of {reps} runs; "
           f"{allocator}; one untimed warm-up pass over all cases."]
    (a.out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return summary


if __name__ == "__main__":
    main()
