"""The experiments that reproduce the source papers, by name, imported lazily.

Each module ``iterlayers.experiments.<name>`` defines
``run(*, out: Path, quick: bool = True, tiny: bool = False, seed: int = 0) -> dict`` and writes
``metrics.json``, ``table.md`` (with a "## Paper's claims vs ours" section) and PNG figures into ``out``.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

from ..errors import ValidationError

__all__ = ["EXPERIMENTS", "ORDER", "ExperimentUnavailable", "ExperimentOutcome", "get_experiment", "run_experiment"]

EXPERIMENTS: dict[str, str] = {
    "core": "iterlayers.experiments.core",
    "reasoning": "iterlayers.experiments.reasoning",
    "frames": "iterlayers.experiments.frames",
    "implicit_linear": "iterlayers.experiments.implicit_linear",
    "operators": "iterlayers.experiments.operators",
    "zoo": "iterlayers.experiments.zoo",
}
ORDER: tuple[str, ...] = ("core", "reasoning", "frames", "implicit_linear", "operators", "zoo")

TITLES: dict[str, str] = {
    "core": "Core: a DEQ classifier on digits (solvers and implicit gradients)",
    "reasoning": "Reasoning layers: convergence vs stability (Chen et al., NeurIPS 2020)",
    "frames": "Deep frame approximation and the deep frame potential (Murdock et al.)",
    "implicit_linear": "Implicit deep learning: global convergence of gradient dynamics (Kawaguchi, ICLR 2021)",
    "operators": "Iterative operators and PIGN (Zappala et al., 2023)",
    "zoo": "The model zoo trained end to end (MDEQ, monDEQ, IGNN, DEQ transformer): sanity checks",
}


class ExperimentUnavailable(RuntimeError):
    """The experiment's module is not installed in this checkout, or does not define ``run``."""


@dataclass
class ExperimentOutcome:
    """What happened when an experiment ran (written to ``out/run.json`` and shown in the report)."""

    name: str
    status: str  # "ok" | "failed" | "missing"
    seconds: float
    quick: bool
    tiny: bool
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def get_experiment(name: str) -> ModuleType:
    """Import and return the experiment module ``name``."""
    if name not in EXPERIMENTS:
        raise ValidationError(f"unknown experiment {name!r}; valid: {', '.join(ORDER)}")
    module_name = EXPERIMENTS[name]
    if importlib.util.find_spec(module_name) is None:
        raise ExperimentUnavailable(f"experiment {name!r} is not available: module {module_name} does not exist")
    module = importlib.import_module(module_name)
    if not callable(getattr(module, "run", None)):
        raise ExperimentUnavailable(f"experiment {name!r} is not available: {module_name} defines no run()")
    return module


def run_experiment(name: str, *, out: Path, quick: bool = True, tiny: bool = False, seed: int = 0) -> ExperimentOutcome:
    """Run one experiment, never raising for its failures: the outcome records them (and ``out/run.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        module = get_experiment(name)
        module.run(out=out, quick=quick, tiny=tiny, seed=seed)
        outcome = ExperimentOutcome(name, "ok", time.perf_counter() - t0, quick, tiny)
    except ExperimentUnavailable as err:
        outcome = ExperimentOutcome(name, "missing", time.perf_counter() - t0, quick, tiny, str(err))
    except Exception as err:  # noqa: BLE001 -- one experiment's bug must not stop the others
        last = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
        where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
        msg = f"{type(err).__name__}: {err}".splitlines()[0] + where
        outcome = ExperimentOutcome(name, "failed", time.perf_counter() - t0, quick, tiny, msg)
    (out / "run.json").write_text(outcome.to_json(), encoding="utf-8")
    return outcome
