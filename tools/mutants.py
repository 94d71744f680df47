#!/usr/bin/env python3
"""Mutation testing of iterlayers' numerical core: does the test suite catch plausible one-line bugs?

Each mutant is ``(name, file, original, replacement, tests)``: ``original`` is an exact substring of
``src/iterlayers/<file>`` that must occur exactly once (give a few characters of context when a line
repeats), ``replacement`` what it becomes, ``tests`` the test files (or node ids) that should catch it
(``None``: the default set :data:`DEFAULT_TESTS`). For every mutant the script copies ``src/`` and
``tests/`` to a fresh temporary directory, applies the one replacement, runs ``pytest -x -q`` on the
tests with a timeout, and records:

- ``caught``: some test failed (or the run timed out: a hang is a visible bug),
- ``MISSED``: every test passed with the bug planted,
- ``STALE``: ``original`` is not found exactly once; the source changed and the mutant must be updated.

The unmutated copy is run first: if the tests fail without a mutant, nothing can be concluded and the
script stops. Usage (from the repository root)::

    python tools/mutants.py                    # all mutants, their own test sets
    python tools/mutants.py --list             # the mutants and whether each still applies
    python tools/mutants.py -k anderson -k best  # mutants whose name contains a word
    python tools/mutants.py --tests tests      # every mutant against the whole suite (slow)
    python tools/mutants.py --jobs 2           # two mutants at a time

Exit status: 0 when the caught fraction is at least ``--min-score`` (default 0.9) and no mutant is stale
(``--allow-stale`` relaxes the latter), 1 otherwise, 2 when the unmutated tests fail.
See tools/mutants.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "src/iterlayers"

SOLVER_TESTS = ("tests/solvers",)
GRAD_TESTS = ("tests/test_implicit.py", "tests/test_implicit_exact.py")
HOIST_TESTS = ("tests/test_hoist.py", "tests/test_hoist_cache.py")
DEFAULT_TESTS = SOLVER_TESTS + GRAD_TESTS + HOIST_TESTS
LOOP_TESTS = ("tests/solvers/test_loop_exact.py", "tests/solvers/test_loop_stopping.py",
              "tests/solvers/test_loop_inputs.py", "tests/solvers/test_failures.py", "tests/solvers/test_anderson_exact.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/iterlayers
    original: str
    replacement: str
    tests: tuple | None = None

    @property
    def path(self) -> Path:
        return Path(PACKAGE) / self.file

    def count(self, root: Path) -> int:
        p = root / self.path
        return p.read_text().count(self.original) if p.exists() else 0


def M(name, file, original, replacement, tests=None):
    return Mutant(name, file, original, replacement, None if tests is None else tuple(tests))


L, ST, A, BR, IM, H = "solvers/_loop.py", "solvers/stats.py", "solvers/anderson.py", "solvers/broyden.py", \
    "implicit.py", "hoist.py"
S, G, HT = SOLVER_TESTS, SOLVER_TESTS + GRAD_TESTS, HOIST_TESTS + GRAD_TESTS

MUTANTS = [
    # --- the generic loop ------------------------------------------------------------------------------
    # --- the loop (rewritten for issue #12; these are the loop's own mutants, all caught when written) ---
    M('loop: return the last iterate instead of the best', L,
      '        out_z, best_fz, out_res = self.best_z, self.best_fz, self.best_res',
      '        out_z, best_fz, out_res = self.z, self.best_fz, self.best_res', LOOP_TESTS),
    M('stats: per-iteration test ignores rtol', ST,
      '    if rtol == 0 or fnorm is None:\n        return residual <= atol',
      '    if True:\n        return residual <= atol', LOOP_TESTS),
    M('loop: best flag set when best equals last', L,
      'best=~self.best_is_last,',
      'best=self.best_res <= self.last_res,', LOOP_TESTS),
    M('loop: relative tolerance from ||z|| instead of ||f(z)||', L,
      'return (ff - zz).norm(dim=1), (ff.norm(dim=1) if self.use_rel else None)',
      'return (ff - zz).norm(dim=1), (zz.norm(dim=1) if self.use_rel else None)', LOOP_TESTS),
    M('stats: `<` at the mixed tolerance (loop tests)', ST,
      'return (residual <= atol + rtol * fnorm)',
      'return (residual < atol + rtol * fnorm)', LOOP_TESTS),
    M('stats: `<` at the absolute tolerance (loop tests)', ST,
      '        return residual <= atol  # NaN',
      '        return residual < atol  # NaN', LOOP_TESTS),
    M('loop: coupling needs both a moved row and a stale one', L,
      '    return (moved | stale).any()',
      '    return (moved & stale).any()', LOOP_TESTS),
    M('loop: no final whole-batch check', L,
      '            return False\n        self.z, self.fz = self.best_z, self.best_fz',
      '            return False\n        return False\n        self.z, self.fz = self.best_z, self.best_fz', LOOP_TESTS),
    M('loop: ties replace the best iterate', L,
      '        improved = active & (self.last_res < self.best_res)',
      '        improved = active & (self.last_res <= self.best_res)', LOOP_TESTS),
    M('loop: joint solve never diverges', L,
      '        bad = ~(r <= self.joint_limit()) & ~conv',
      '        bad = ~(r <= self.joint_limit()) & ~conv & False', LOOP_TESTS),
    M('loop: joint best iterate never replaced', L,
      '            self.best_z, self.best_fz, self.best_res, self.best_worst = self.z, self.fz, r, worst',
      '            self.best_z, self.best_fz, self.best_res, self.best_worst = self.z, self.fz, r, worst * 0', LOOP_TESTS),
    M('loop: no probe rows in the first sub-batch', L,
      '        return cand[: max(1, self.n_sys // 8)] if cand.numel() else None',
      '        return None', LOOP_TESTS),
    # --- statistics ------------------------------------------------------------------------------------
    M("stats: `<=` turned into `<` at the absolute tolerance", ST, "return residual <= atol", "return residual < atol", S),
    M("stats: `<=` turned into `<` at the mixed tolerance", ST, "(residual <= atol + rtol * fnorm)",
      "(residual < atol + rtol * fnorm)", S),
    M("stats: infinite residual passes a relative tolerance", ST,
      "return (residual <= atol + rtol * fnorm) & torch.isfinite(residual)",
      "return residual <= atol + rtol * fnorm", S),
    M("stats: relative residual not divided by ||f(z)||", ST, "rel_residual=res / fnorm.clamp_min",
      "rel_residual=res * fnorm.clamp_min", S),
    M("stats: status says max_iter when a sample diverged", ST,
      "(DIVERGED if bool(diverged.any()) else MAX_ITER)", "(MAX_ITER if bool(diverged.any()) else DIVERGED)", S),
    # --- Anderson --------------------------------------------------------------------------------------
    M("anderson: ridge scaled by the largest residual", A, ".amin(-1, keepdim=True)", ".amax(-1, keepdim=True)", S),
    M("anderson: damping ignored", A, "y = fz if self.damping == 1.0 else z + self.damping * g", "y = fz", S),
    M("anderson: safeguard returns z instead of a damped Picard step", A,
      "mixed = torch.where(ok.unsqueeze(-1), mixed, y)", "mixed = torch.where(ok.unsqueeze(-1), mixed, z)", S),
    M("anderson: weights not normalised to sum 1", A, "alpha = a / total", "alpha = a", S),
    M("anderson: Gram matrix column not updated", A, "\n            H[:, :nh, slot] = row", "\n            pass", S),
    M("anderson: ring-buffer slot off by one", A, "slot = k % self.m", "slot = (k + 1) % self.m", S),
    M("anderson: one extra Picard step before mixing", A, "if nh == 1:", "if nh <= 2:", S),
    M("anderson: active-subset Gram rows not written back", A, "            H[idx] = Hs", "            H[idx] = H[idx]", S),
    M("anderson: fallbacks not counted", A, 'state["fallbacks"] += int((~ok).sum())', 'state["fallbacks"] += 0', S),
    # --- Broyden ---------------------------------------------------------------------------------------
    M("broyden: updates with a negative denominator skipped", BR, "ok = denom.abs() > tiny", "ok = denom > tiny", S),
    M("broyden: transposed product computed as H x", BR, "return _apply(V, U, x)", "return _apply(U, V, x)", S),
    M("broyden: wrong sign in the secant correction", BR, "(dz - Hdg) / torch.where", "(dz + Hdg) / torch.where", S),
    M("broyden: dg taken as the change of f instead of g", BR, "dg = (fz_new - z_new) - g", "dg = fz_new - fz", S),
    M("broyden: line search halves only once", BR, "t *= 0.5", "t = 0.5", S),
    M("broyden: no restart when the memory is full", BR, 'if state["k"] == self.memory:',
      'if state["k"] == self.memory + 1:', S),
    # --- the implicit backward -------------------------------------------------------------------------
    M("implicit: adjoint rtol falls back to the forward atol", IM,
      "            rtol = min(forward_rtol, ADJOINT_MAX_TOL)",
      "            rtol = min(forward_atol, ADJOINT_MAX_TOL)", G),
    M("implicit: adjoint atol falls back to the forward rtol", IM,
      "else max(min(forward_atol, ADJOINT_MAX_TOL), eps)",
      "else max(min(forward_rtol, ADJOINT_MAX_TOL), eps)", G),
    M("implicit: backward_max_iter ignored", IM,
      "return max(forward_max_iter, ADJOINT_MIN_ITER) if self.max_iter is None else self.max_iter",
      "return max(forward_max_iter, ADJOINT_MIN_ITER)", G),
    M("implicit: adjoint solution not rescaled by ||grad||", IM, "return u * scale, stats", "return u, stats", G),
    M("implicit: adjoint map without the per-sample scaling D^-1 J^T D", IM, "return vjp / scale + rhs", "return vjp + rhs", G),
    M("implicit: phantom damping ignored", IM,
      "z = (1 - self.damping) * z + self.damping * solve.f_flat(z)", "z = solve.f_flat(z)", G),
    M("unroll: damping ignored", "unrolling.py", "a + d * (b - a) for a, b in zip(zp, fp))", "b for a, b in zip(zp, fp))",
      G + ("tests/test_unrolling.py",)),
    # --- hoisting --------------------------------------------------------------------------------------
    M("hoist: the check verifies only the first iterate", H, "for i in range(2):", "for i in range(1):", HT),
    M("hoist: cached split reused whatever the fingerprint", H,
      "if entry is not None and entry[1] == fingerprint:", "if entry is not None:", HT),
    M("hoist: hooks on inlined submodules ignored", H,
      'path == "" or not tracer.is_leaf_module(m, path)', 'path == ""', HT),
    M("hoist: global hooks ignored", H, "return bool(g._global_forward_hooks or g._global_forward_pre_hooks)",
      "return False", HT),
    M("hoist: training-mode buffers hoisted", H, "return m.training and any(True for _ in m.buffers(recurse=True))",
      "return False", HT),
    M("hoist: submodule attributes left out of the fingerprint", H,
      "for path, m in cell.named_modules():\n        d = m.__dict__",
      "for path, m in [('', cell)]:\n        d = m.__dict__", HT),
    M("hoist: verification tolerance loosened", H, "tol = 8 * torch.finfo(a.dtype).eps", "tol = 0.5", HT),

    # --- "blind" mutants: written after the tests above as a check that the suite's strength generalises to
    # bugs it was not tuned for (select them with -k blind). The first run caught 5 of 9 (three more were
    # dropped as equivalent, see tools/mutants.md); the tests added for the 4 missed ones make them no longer
    # blind. Add new blind mutants here before writing tests for them.
    M("blind loop: the caller's z0 handed back as the solution", L, "if z.numel() and isinstance(z0, torch.Tensor) and z.data_ptr() == z0.data_ptr():",
      "if False:", S),
    M("blind loop: a non-finite initial residual not diverged", L, "diverged = ~torch.isfinite(r)",
      "diverged = torch.zeros_like(r, dtype=torch.bool)", S),
    M("blind broyden: line search accepts equal residuals", BR, "worse = ~((fz_new - z_new).norm(dim=1) < gnorm)",
      "worse = ~((fz_new - z_new).norm(dim=1) <= gnorm)", S),
    M("blind broyden: every sample backtracks", BR, "z_try = torch.where(worse.unsqueeze(1), z + t * dz, z_new)",
      "z_try = z + t * dz", S),
    M("blind implicit: a zero incoming gradient divided by zero", IM,
      "scale = torch.where(scale > 0, scale, torch.ones_like(scale))\n    rhs = grad / scale",
      "rhs = grad / scale", G),
    M("blind unroll: frozen samples keep counting steps", "unrolling.py", "nstep += step.long()", "nstep += 1",
      G + ("tests/test_unrolling.py",)),
    # --- a second blind set, written by the integrator after the merge of issue #12, before reading the tests
    # (run with -k fresh). Its score is the suite's strength on bugs nobody targeted.
    M("fresh loop: divergence limit from the tolerance alone", L,
      "self.div_limit = self.divergence_ratio * torch.clamp(self.best_res, min=self.atol)",
      "self.div_limit = self.divergence_ratio * torch.full_like(self.best_res, self.atol)", S),
    M("fresh loop: frozen samples keep counting steps", L,
      "self.nstep.index_add_(0, idx, torch.ones_like(idx))", "self.nstep.add_(1)", S),
    M("fresh stats: relative residual divided by ||z||", ST,
      "rel_residual=res / fnorm.clamp_min(torch.finfo(fnorm.dtype).tiny)",
      "rel_residual=res / (res + 1.0)", S),
    M("fresh anderson: ridge not applied", A,
      "A = Hh + (self.lam * scale).unsqueeze(-1) * torch.eye(nh, dtype=Hh.dtype, device=Hh.device)",
      "A = Hh + 0.0 * (self.lam * scale).unsqueeze(-1) * torch.eye(nh, dtype=Hh.dtype, device=Hh.device)", S),
    M("fresh broyden: line search starts at half a step", BR, "            t = 1.0\n", "            t = 0.5\n", S),
    M("fresh broyden: restart one update late", BR, 'if state["k"] == self.memory:',
      'if state["k"] >= self.memory + 1:', S),
    M("fresh implicit: double backward silently allowed", IM,
      "            if torch.is_grad_enabled():\n                raise UnsupportedError(",
      "            if False:\n                raise UnsupportedError(", ("tests/test_implicit_autograd.py",)),
    M("fresh implicit: train-mode batch norm not seen as coupling", IM,
      "if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats):",
      "if isinstance(m, _BatchNorm) and (not m.training and not m.track_running_stats):",
      ("tests/test_layers_inputs.py", "tests/test_implicit_differential.py")),
    M("fresh implicit: running statistics not restored after the solve", IM,
      "    saved = _snapshot(modules)\n    try:\n        yield\n    finally:",
      "    saved = []\n    try:\n        yield\n    finally:", ("tests/test_layers_inputs.py",)),
    M("fresh state: wrong batch size of f(z) accepted", "solvers/_loop.py",
      "if isinstance(fz, (tuple, list)) != self.is_tuple or len(parts) != len(self.shapes):",
      "if isinstance(fz, (tuple, list)) != self.is_tuple:", ("tests/solvers",)),
    M("blind hoist: in-place methods not detected", H, 'return name.endswith("_") and not name.endswith("__")',
      "return False", HT),
    M("blind hoist: module state changed by the trace ignored", H, "if _state_changed(snap):", "if False:", HT),
    M("blind hoist: non-batch-shaped input values hoisted", H, "if fa and not _batch_shaped(v, batch)]",
      "if False]", HT),
]


def _copy(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for sub in ("src", "tests", "docs"):  # docs: tests run its examples
        shutil.copytree(ROOT / sub, dst / sub, ignore=ignore)
    for f in ("pyproject.toml", "setup.cfg", "pytest.ini", "conftest.py"):
        if (ROOT / f).exists():
            shutil.copy2(ROOT / f, dst / f)


def _pytest(root: Path, tests, timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(root / "src"), PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t, ""
    tail = [ln for ln in p.stdout.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")]
    return ("pass" if p.returncode == 0 else "fail"), time.monotonic() - t, (tail[0] if tail else p.stdout[-200:])


def run_one(m: Mutant, tests, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        root = Path(tmp)
        _copy(root)
        n = m.count(root)
        if n != 1:
            return dict(mutant=m, status="STALE", seconds=0.0,
                        detail=f"original text found {n} times in {m.path} (must be exactly once)")
        p = root / m.path
        p.write_text(p.read_text().replace(m.original, m.replacement, 1))
        outcome, secs, detail = _pytest(root, tests or m.tests or DEFAULT_TESTS, timeout)
    status = {"pass": "MISSED", "fail": "caught", "timeout": "caught (timeout)"}[outcome]
    return dict(mutant=m, status=status, seconds=secs, detail=detail if outcome == "fail" else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", action="append", default=[], help="run mutants whose name contains this (repeatable)")
    ap.add_argument("--tests", nargs="+", help="test paths for every mutant (default: each mutant's own)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant run")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--min-score", type=float, default=0.9)
    ap.add_argument("--allow-stale", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the mutants and whether they apply; run nothing")
    a = ap.parse_args(argv)

    chosen = [m for m in MUTANTS if not a.k or any(w.lower() in m.name.lower() for w in a.k)]
    if a.list:
        for m in chosen:
            n = m.count(ROOT)
            print(f"{'ok   ' if n == 1 else 'STALE'}  {m.file:22s} {m.name}" + ("" if n == 1 else f"  (found {n}x)"))
        return 0

    with tempfile.TemporaryDirectory(prefix="mutant-base-") as tmp:
        _copy(Path(tmp))
        base_tests = a.tests or sorted({t for m in chosen for t in (m.tests or DEFAULT_TESTS)})
        outcome, secs, detail = _pytest(Path(tmp), base_tests, a.timeout)
    print(f"unmutated: {outcome} in {secs:.0f}s ({' '.join(base_tests)})", flush=True)
    if outcome != "pass":
        print(f"the tests fail without a mutant: {detail}")
        return 2

    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = [pool.submit(run_one, m, a.tests, a.timeout) for m in chosen]
        for fut in futures:
            r = fut.result()
            results.append(r)
            m = r["mutant"]
            extra = f"  {r['detail']}" if r["status"] in ("caught", "STALE") and r["detail"] else ""
            print(f"{r['status']:16s} {r['seconds']:6.1f}s  {m.file:22s} {m.name}{extra}", flush=True)

    applied = [r for r in results if r["status"] != "STALE"]
    caught = [r for r in applied if r["status"].startswith("caught")]
    stale = [r for r in results if r["status"] == "STALE"]
    missed = [r for r in applied if r["status"] == "MISSED"]
    score = len(caught) / len(applied) if applied else 0.0
    print(f"\ncaught {len(caught)} of {len(applied)} applicable mutants ({score:.0%}); "
          f"{len(stale)} stale, {len(missed)} missed")
    for r in missed:
        print(f"  MISSED: {r['mutant'].name}")
    for r in stale:
        print(f"  STALE:  {r['mutant'].name}: {r['detail']}")
    ok = score >= a.min_score and (a.allow_stale or not stale)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
