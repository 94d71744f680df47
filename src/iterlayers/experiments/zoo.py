"""The model zoo trained end to end (issue #19): every registry model of the zoo through ``iterlayers train``'s
loop on built-in data, with its accuracy (perplexity for the language model) and solver statistics.

These are *sanity checks*, not paper claims: each model must beat a data-derived chance level by a margin fixed
here in advance (``CHECKS``), its forward solves must have converged, and its adjoint solves must have run. The
chance levels are computed from the data: the majority-class test accuracy for classifiers, and for the character
model the perplexity of the unigram distribution of the training characters on the test characters.
Settings (epochs, sizes, learning rates) are small enough for 2 CPU cores; the docs pages in ``docs/models/``
give longer runs.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

#: model -> (data, model options, epochs quick / tiny, learning rate, batch size, n_train / n_test (quick))
RUNS = {
    "mdeq": ("digits", {}, (3, 1), 5e-3, 64, (None, None)),
    "mondeq": ("digits", {}, (3, 1), 1e-3, 64, (None, None)),
    "mondeq_conv": ("digits", {}, (2, 1), 1e-3, 64, (600, 200)),
    "ignn": ("graph:csbm", {"graph": "csbm"}, (50, 5), 1e-2, 140, (None, None)),
    "deq_transformer": ("stdlib_chars", {}, (2, 1), 3e-3, 64, (1024, 256)),
}
#: pre-registered margins over the data's chance level: classifiers must gain this much accuracy over the
#: majority class; the character model must reach at most this fraction of the unigram perplexity
MARGIN_ACC = 0.2
PPL_FRACTION = 0.95


def _chance(data_name: str, n_train, n_test, seed: int) -> tuple[str, float]:
    import torch

    from iterlayers.data import load_dataset

    data = load_dataset(data_name, seed=seed)
    if n_train is not None or n_test is not None:
        data = data.subset(n_train, n_test)
    if data_name == "stdlib_chars":
        counts = torch.bincount(data.y_train.flatten(), minlength=data.num_classes).double() + 1.0  # add-one
        logp = (counts / counts.sum()).log()
        return "unigram perplexity", float(torch.exp(-logp[data.y_test.flatten()].mean()))
    y = data.y_test
    return "majority-class accuracy", float(torch.bincount(y).max()) / y.numel()


def run(*, out: Path, quick: bool = True, tiny: bool = False, seed: int = 0) -> dict:
    """Train each zoo model once; write ``metrics.json`` (sanity checks) and ``table.md`` into ``out``."""
    from iterlayers.experiments.claims import mode_of, read_metrics, sanity_check, sanity_markdown, write_metrics
    from iterlayers.training import TrainConfig, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mode = mode_of(quick=quick, tiny=tiny)
    rows, checks = {}, []
    for name, (data, options, (epochs_quick, epochs_tiny), lr, batch, (n_train, n_test)) in RUNS.items():
        if tiny:
            n_train, n_test = (256 if n_train is None else min(n_train, 256)), (128 if n_test is None else min(n_test, 128))
            if data.startswith("graph:"):
                n_train = n_test = None  # the graph's own masks
        t0 = time.process_time()
        res = train(TrainConfig(model=name, data=data, epochs=epochs_tiny if tiny else epochs_quick, lr=lr,
                                batch_size=batch, seed=seed, out=str(out / f"{name}_run"), model_options=options,
                                n_train=n_train, n_test=n_test), progress=False)
        last = res.rows[-1]
        what, chance = _chance(data, n_train, n_test, seed)
        lm = data == "stdlib_chars"
        value = math.exp(last["test_loss"]) if lm else last["test_acc"]
        rows[name] = dict(data=data, epochs=last["epoch"], metric="perplexity" if lm else "test accuracy",
                          value=value, chance=chance, chance_kind=what, fwd_iters=last["fwd_iters"],
                          fwd_converged=last["fwd_converged"], bwd_iters=last["bwd_iters"],
                          cpu_s=time.process_time() - t0)
        if lm:
            passed = value <= PPL_FRACTION * chance
            statement = f"{name} trained: perplexity <= {PPL_FRACTION} x the {what} ({chance:.3g})"
        else:
            passed = value >= chance + MARGIN_ACC
            statement = f"{name} trained: test accuracy >= the {what} ({chance:.3g}) + {MARGIN_ACC}"
        checks.append(sanity_check(id=f"zoo_{name}_trained", statement=statement, value=value,
                                   passed=bool(passed),
                                   note="tiny mode: too few steps to be required to train" if tiny else ""))
        checks.append(sanity_check(id=f"zoo_{name}_solves", statement=f"{name}: forward solves converged "
                                   "(fraction of samples, last epoch) and the adjoint ran",
                                   value=last["fwd_converged"],
                                   passed=bool(last["fwd_converged"] >= 0.99 and last["bwd_iters"] > 0)))
    settings = {"runs": {k: {"data": v[0], "epochs": v[2][1] if tiny else v[2][0], "lr": v[3]} for k, v in RUNS.items()},
                "margin_acc": MARGIN_ACC, "ppl_fraction": PPL_FRACTION, "seed": seed}
    write_metrics(out, {"models": rows}, settings=settings, mode=mode, claims=[], sanity_checks=checks)
    lines = ["| model | data | epochs | metric | value | chance level | forward iters | converged | backward iters |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['data']} | {r['epochs']} | {r['metric']} | {r['value']:.3f} | "
                     f"{r['chance']:.3f} ({r['chance_kind']}) | {r['fwd_iters']:.1f} | {r['fwd_converged']:.2f} | "
                     f"{r['bwd_iters']:.1f} |")
    # rendered from metrics.json alone, like every experiment's table
    (out / "table.md").write_text("\n".join(lines) + "\n\n" + sanity_markdown(read_metrics(out)), encoding="utf-8")
    return {"models": rows, "sanity_checks": checks}
