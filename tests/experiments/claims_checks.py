"""Shared assertions on an experiment's claims (imported explicitly by each experiment's tests)."""
from __future__ import annotations

from iterlayers.experiments.claims import DOES_NOT_HOLD, VERDICTS, recompute_verdict

CLAIM_FIELDS = ("id", "statement", "source", "statistic", "threshold", "value", "interval", "n_seeds", "verdict",
                "control")


def assert_claims_valid(metrics: dict, *, min_claims: int = 1) -> None:
    """Every claim has the fields, a control that comes out "does not hold", and the computed verdict."""
    assert "settings" in metrics and metrics["settings"]["mode"] in ("tiny", "quick", "full")
    mode = metrics["settings"]["mode"]
    claims = metrics["claims"]
    assert isinstance(claims, list) and len(claims) >= min_claims
    assert isinstance(metrics["sanity_checks"], list)
    for c in claims:
        for f in CLAIM_FIELDS:
            assert f in c, (c.get("id"), f)
        assert c["verdict"] in VERDICTS, c
        assert {"text", "op", "value"} <= set(c["threshold"]), c
        assert {"description", "value", "verdict"} <= set(c["control"]), c
        assert c["control"]["verdict"] == DOES_NOT_HOLD, (c["id"], c["control"])
        assert c["verdict"] == recompute_verdict(c, mode), c["id"]
        if c["interval"] is not None:
            assert c["interval"][0] <= c["interval"][1], c["id"]
