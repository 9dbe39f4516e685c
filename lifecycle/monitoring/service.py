"""Service metrics of a window of inference records: volume, errors, latency, tokens, finish mix.

Pure functions over record dicts (the serving stage's contract); nothing here talks to MLflow.
A shadow copy the router dropped under load (``status`` ``dropped``) was never run: it is counted
apart (``shadow_dropped``) and left out of every other figure, never taken for an error (its
``error`` field only says why it was dropped).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from lifecycle.monitoring.drift import percentile
from lifecycle.serving.records import DROPPED

#: Categories of the outcome mix; ``error`` covers refused (invalid) and failed requests.
OUTCOMES = ("stop", "length", "error")


def is_dropped(rec: dict[str, Any]) -> bool:
    """True for a shadow copy dropped under load (never run: it measures nothing)."""
    return rec.get("status") == DROPPED


def served(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of requests that ran (dropped shadow copies left out)."""
    return [r for r in records if not is_dropped(r)]


def is_error(rec: dict[str, Any]) -> bool:
    """True for a refused or failed request (a dropped shadow copy is not one: see :func:`is_dropped`)."""
    if is_dropped(rec):
        return False
    return bool(rec.get("error")) or rec.get("status", "ok") != "ok"


def outcome(rec: dict[str, Any]) -> str:
    """``error``, else the record's finish reason (``stop`` / ``length``)."""
    if is_error(rec):
        return "error"
    return "length" if rec.get("finish_reason") == "length" else "stop"


def row_values(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """Per-row ``key`` (``prompt_tokens`` / ``completion_tokens``) of the successful requests."""
    vals = [row.get(key, 0) for rec in served(records) if not is_error(rec) for row in rec.get("rows") or []]
    return np.asarray(vals, dtype=np.float64)


def outcome_mix(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fraction of requests per outcome (``stop``, ``length``, ``error``); dropped shadow copies left out."""
    records = served(records)
    counts = Counter(outcome(r) for r in records)
    total = max(len(records), 1)
    return {k: counts.get(k, 0) / total for k in OUTCOMES}


def service_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Request count, error rate, latency percentiles, token totals and means, outcome mix, and the
    shadow copies dropped (counted apart: every other figure is over the requests that ran)."""
    ran = served(records)
    dropped = len(records) - len(ran)
    records = ran
    latency = np.asarray([float(r.get("latency_ms", 0.0)) for r in records if not is_error(r)], dtype=np.float64)
    prompt = row_values(records, "prompt_tokens")
    completion = row_values(records, "completion_tokens")
    n = len(records)
    out = {
        "request_count": float(n),
        "shadow_dropped": float(dropped),
        "row_count": float(prompt.size),
        "error_rate": sum(is_error(r) for r in records) / max(n, 1),
        "prompt_tokens_total": float(prompt.sum()),
        "completion_tokens_total": float(completion.sum()),
        "prompt_tokens_mean": float(prompt.mean()) if prompt.size else float("nan"),
        "completion_tokens_mean": float(completion.mean()) if completion.size else float("nan"),
        "batch_size_mean": float(np.mean([r.get("batch_size", 0) for r in records if not is_error(r)] or [np.nan])),
    }
    # Latency of refused requests measures the validator, not the model: successful ones only.
    for q in (50, 95, 99):
        out[f"latency_p{q}_ms"] = percentile(latency, q)
    for key, frac in outcome_mix(records).items():
        out[f"finish_{key}_rate"] = frac
    return out
