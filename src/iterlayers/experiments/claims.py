"""Claims as data: one record, one verdict rule, one writer for every experiment.

A *claim* is a statement of a paper (or ours, labelled so) turned into a measurement that can fail:

- a ``statistic`` (what is measured) with a point ``value`` and an ``interval`` ``[low, high]`` over seeds
  (:func:`seed_interval`) or by bootstrap (:func:`bootstrap_interval`, :func:`spearman`);
- a pre-registered ``threshold`` (:class:`Threshold`: ``value op number``), fixed in the code before the run;
- a negative ``control``: the same statistic, by the same code path, in a configuration where the claim should
  *not* hold (the property removed, labels permuted, a ranking shuffled, a non-contractive cell, ...).

The verdict is never typed by hand: :func:`verdict` computes it from value, interval and threshold, and
:func:`make_claim` applies the control rule (a control that does not come out ``"does not hold"`` makes the
claim ``"not testable here"``), the seed rule (:func:`required_seeds`) and the baseline rule (a comparison
against a baseline that did not train is ``"not testable here"``).

Checks that only confirm the code (a closed form equals itself, a bound that holds by construction) are
:func:`sanity_check` records, kept in a separate ``"sanity_checks"`` list and never reported as claims.

Every experiment writes ``metrics.json`` with ``"settings"`` (its ``mode``: tiny / quick / full),
``"claims"`` and ``"sanity_checks"`` through :func:`write_metrics`, and renders its claims section of
``table.md`` with :func:`claims_markdown` from that JSON alone.
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from iterlayers.errors import OptionTypeError, ValidationError

__all__ = [
    "VERDICTS", "HOLDS", "PARTLY", "DOES_NOT_HOLD", "NOT_TESTABLE",
    "Threshold", "verdict", "make_claim", "sanity_check", "required_seeds", "mode_of",
    "seed_interval", "bootstrap_interval", "spearman", "partial_spearman",
    "write_metrics", "read_metrics", "claims_markdown", "sanity_markdown", "fmt", "new_figure", "save_figure",
]

HOLDS, PARTLY, DOES_NOT_HOLD, NOT_TESTABLE = "holds", "partly", "does not hold", "not testable here"
VERDICTS = (HOLDS, PARTLY, DOES_NOT_HOLD, NOT_TESTABLE)

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}


@dataclass(frozen=True)
class Threshold:
    """The pre-registered pass rule ``statistic op value`` (e.g. ``Threshold(">", 0.0, "NAG gap - GD gap > 0")``)."""

    op: str
    value: float
    text: str = ""

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValidationError(f"threshold op must be one of {sorted(_OPS)}, got {self.op!r}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value)):
            raise ValidationError(f"threshold value must be a finite number, got {self.value!r}")

    def passes(self, x: float) -> bool:
        return bool(_OPS[self.op](float(x), float(self.value)))

    def to_dict(self) -> dict:
        text = self.text or f"statistic {self.op} {self.value:g}"
        return {"op": self.op, "value": float(self.value), "text": text}


def mode_of(*, quick: bool, tiny: bool) -> str:
    """``"tiny"`` (the test suite), ``"quick"`` (``make run``) or ``"full"`` (``make full``)."""
    return "tiny" if tiny else ("quick" if quick else "full")


def required_seeds(mode: str, *, comparison: bool) -> int:
    """Seeds a claim needs: a comparison of two methods >= 3 in quick and >= 10 in full (2 in tiny, where only
    the mechanism is exercised); a single-configuration measurement >= 1."""
    if not comparison:
        return 1
    return {"tiny": 2, "quick": 3, "full": 10}[mode]


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def verdict(value, interval: Sequence[float] | None, threshold: Threshold) -> str:
    """The verdict of a measurement against its pre-registered threshold.

    - ``"holds"``: the point value and the whole interval pass;
    - ``"partly"``: the point value passes but the interval reaches the failing side;
    - ``"does not hold"``: the point value fails;
    - ``"not testable here"``: no finite value (or a malformed interval).
    """
    if not _finite(value):
        return NOT_TESTABLE
    lo, hi = (float(value), float(value)) if interval is None else (interval[0], interval[1])
    if not (_finite(lo) and _finite(hi)) or lo > hi:
        return NOT_TESTABLE
    if not threshold.passes(value):
        return DOES_NOT_HOLD
    return HOLDS if threshold.passes(lo) and threshold.passes(hi) else PARTLY


def _interval(interval, value) -> list[float] | None:
    if interval is None:
        return None if not _finite(value) else [float(value), float(value)]
    return [float(interval[0]), float(interval[1])]


def make_claim(
    *,
    id: str,
    statement: str,
    source: str,
    statistic: str,
    threshold: Threshold,
    value,
    interval: Sequence[float] | None,
    n_seeds: int,
    control: dict,
    mode: str,
    comparison: bool = False,
    baseline_trained: bool | None = None,
    note: str = "",
    **extra: Any,
) -> dict:
    """One claim record (a plain dict, JSON-ready) with its verdict computed, never typed.

    ``control`` is ``{"description": str, "value": float, "interval": [lo, hi] | None}``: the same statistic in
    a configuration where the claim should fail. Its verdict is computed with the same ``threshold``; unless it
    is ``"does not hold"``, the claim is ``"not testable here"`` (the measurement could not have failed).
    ``baseline_trained=False`` (a compared baseline that did not train) and too few seeds
    (:func:`required_seeds`) also make it ``"not testable here"``; ``note`` says which rule applied.
    """
    if not isinstance(control, dict) or "description" not in control or "value" not in control:
        raise ValidationError(f"claim {id!r}: control must be a dict with 'description' and 'value'")
    ctrl_interval = _interval(control.get("interval"), control["value"])
    ctrl_value = float(control["value"]) if _finite(control["value"]) else None
    ctrl = {
        "description": control["description"],
        "value": ctrl_value,
        "interval": ctrl_interval,
        "verdict": verdict(ctrl_value, ctrl_interval, threshold),
    }
    for k, v in control.items():
        if k not in ctrl:
            ctrl[k] = v
    interval = _interval(interval, value)
    value_f = float(value) if _finite(value) else None
    v = verdict(value_f, interval, threshold)
    reasons = [note] if note else []
    need = required_seeds(mode, comparison=comparison)
    if n_seeds < need:
        reasons.append(f"{n_seeds} seed(s) < {need} required in {mode} mode")
        v = NOT_TESTABLE
    if baseline_trained is False:
        reasons.append("the baseline did not train")
        v = NOT_TESTABLE
    if ctrl["verdict"] != DOES_NOT_HOLD:
        reasons.append(f"negative control came out {ctrl['verdict']!r}, not 'does not hold'")
        v = NOT_TESTABLE
    record = {
        "id": id, "statement": statement, "source": source, "statistic": statistic,
        "threshold": threshold.to_dict(), "value": value_f, "interval": interval, "n_seeds": int(n_seeds),
        "verdict": v, "control": ctrl, "comparison": bool(comparison), "baseline_trained": baseline_trained,
        "note": "; ".join(r for r in reasons if r),
    }
    record.update(extra)
    return record


def recompute_verdict(claim: dict, mode: str) -> str:
    """The verdict :func:`make_claim` gives for a stored record (tests use it to check nothing was hand-typed)."""
    th = claim["threshold"]
    rebuilt = make_claim(
        id=claim["id"], statement=claim["statement"], source=claim["source"], statistic=claim["statistic"],
        threshold=Threshold(th["op"], th["value"], th["text"]), value=claim["value"], interval=claim["interval"],
        n_seeds=claim["n_seeds"], control=claim["control"], mode=mode, comparison=claim["comparison"],
        baseline_trained=claim["baseline_trained"],
    )
    return rebuilt["verdict"]


def sanity_check(*, id: str, statement: str, value, passed: bool, note: str = "") -> dict:
    """A check that confirms the code, not a paper (it holds by construction when the code is right)."""
    return {"id": id, "statement": statement, "value": value if not isinstance(value, float) else float(value),
            "passed": bool(passed), "note": note}


# --------------------------------------------------------------------------------------------- statistics

def seed_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, list[float]]:
    """Mean over seeds and its Student-t interval (``[v, v]`` for one seed: no spread is known)."""
    from scipy import stats as sps

    x = np.asarray([float(v) for v in values], dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    m = float(x.mean())
    if x.size == 1:
        return m, [m, m]
    half = float(sps.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, [m - half, m + half]


def bootstrap_interval(statistic: Callable[..., float], *arrays, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, list[float]]:
    """``statistic(*arrays)`` and its percentile bootstrap interval (rows resampled jointly)."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    value = float(statistic(*arrays))
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        r = statistic(*[a[idx] for a in arrays])
        if np.isfinite(r):
            reps.append(r)
    if not reps:
        return value, [float("nan"), float("nan")]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return value, [float(lo), float(hi)]


def _spearman(x, y) -> float:
    from scipy import stats as sps

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)


def spearman(x, y, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """Spearman rank correlation of ``x`` and ``y`` with a bootstrap interval."""
    return bootstrap_interval(_spearman, x, y, n_boot=n_boot, seed=seed)


def _partial_spearman(x, y, z) -> float:
    from scipy import stats as sps

    rx, ry, rz = (sps.rankdata(a) for a in (x, y, z))
    r = np.corrcoef(np.vstack([rx, ry, rz]))
    rxy, rxz, ryz = r[0, 1], r[0, 2], r[1, 2]
    den = math.sqrt(max((1 - rxz ** 2) * (1 - ryz ** 2), 0.0))
    return float("nan") if den == 0 else float((rxy - rxz * ryz) / den)


def partial_spearman(x, y, z, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """Partial rank correlation of ``x`` and ``y`` given ``z`` (e.g. DFP and error given parameter count)."""
    return bootstrap_interval(_partial_spearman, x, y, z, n_boot=n_boot, seed=seed)


# ------------------------------------------------------------------------------------------------ writing

def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise OptionTypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_metrics(out: Path, metrics: dict, *, settings: dict, mode: str, claims: list[dict],
                  sanity_checks: list[dict]) -> Path:
    """Write ``out/metrics.json`` with ``settings`` (and its ``mode``), ``claims`` and ``sanity_checks``."""
    ids = [c["id"] for c in claims] + [s["id"] for s in sanity_checks]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValidationError(f"duplicate claim / sanity-check ids: {dup}")
    if mode not in ("tiny", "quick", "full"):
        raise ValidationError(f"mode must be tiny, quick or full, got {mode!r}")
    body = dict(metrics)
    body["settings"] = {**settings, "mode": mode}
    body["claims"] = claims
    body["sanity_checks"] = sanity_checks
    path = Path(out) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1, default=_json_default, allow_nan=True), encoding="utf-8")
    return path


def read_metrics(out: Path) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))


def fmt(x, spec: str = ".3g") -> str:
    """A number for a table ("n/a" for None / NaN)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return format(float(x), spec)


def _fmt_interval(iv) -> str:
    return "" if not iv else f"[{fmt(iv[0])}, {fmt(iv[1])}]"


def claims_markdown(metrics: dict) -> str:
    """The "Paper's claims vs ours" section of ``table.md``, rendered from ``metrics["claims"]`` alone."""
    lines = [
        "## Paper's claims vs ours",
        "",
        "Each verdict is computed from the value, its interval and the pre-registered threshold; the negative "
        "control runs the same code where the claim should fail and must come out 'does not hold'.",
        "",
        "| id | claim (source) | statistic | threshold | ours [interval], seeds | control: value -> verdict | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in metrics.get("claims", []):
        ctrl = c["control"]
        note = f" ({c['note']})" if c.get("note") else ""
        lines.append(
            f"| {c['id']} | {c['statement']} ({c['source']}) | {c['statistic']} | {c['threshold']['text']} | "
            f"{fmt(c['value'])} {_fmt_interval(c['interval'])}, n={c['n_seeds']} | "
            f"{ctrl['description']}: {fmt(ctrl['value'])} -> {ctrl['verdict']} | **{c['verdict']}**{note} |"
        )
    return "\n".join(lines) + "\n"


def sanity_markdown(metrics: dict) -> str:
    """The "Sanity checks" section: checks of the code, not of a paper."""
    checks = metrics.get("sanity_checks", [])
    if not checks:
        return ""
    lines = ["## Sanity checks (these confirm the code, not a paper)", "", "| id | check | value | passed |",
             "|---|---|---|---|"]
    for s in checks:
        val = s["value"] if not isinstance(s["value"], (int, float)) else fmt(s["value"])
        lines.append(f"| {s['id']} | {s['statement']} | {val} | {'yes' if s['passed'] else 'NO'} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ figures

def new_figure(ncols: int = 1, width: float = 5.0, height: float = 4.0):
    """A matplotlib ``Figure`` on the Agg canvas (never pyplot: the user's backend is untouched)."""
    from iterlayers.analysis.plots import _figure

    return _figure(ncols, width, height)


def save_figure(fig, path) -> Path:
    from iterlayers.analysis.plots import _save

    return _save(fig, path)
