"""Turn monitor metrics and the policy's ``monitoring`` thresholds into ``ok`` / ``warn`` / ``retrain``.

Every monitoring metric is "higher is worse" (drift statistics, error rate, latency), so a
metric reaches a level when its value is >= that level. A metric the window could not measure
(NaN: e.g. token statistics without recorded text) never raises the verdict; it is listed as
unavailable so that nobody reads its silence as health.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

#: Exit codes of ``lifecycle monitor`` (documented in :mod:`lifecycle.errors`).
EXIT_CODES = {"ok": 0, "warn": 10, "retrain": 11}
_RANK = {"ok": 0, "warn": 1, "retrain": 2}


@dataclass(frozen=True)
class Finding:
    """One threshold a metric reached."""

    metric: str
    value: float
    level: str  # "warn" | "retrain"
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}={self.value:.4g} >= {self.level} {self.threshold:g}"


@dataclass
class Verdict:
    """The outcome of one monitor run."""

    verdict: str
    findings: list[Finding] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)  # thresholded metrics that were not measured
    unknown: list[str] = field(default_factory=list)  # thresholded metrics this monitor never computes

    @property
    def exit_code(self) -> int:
        """0, 10 or 11."""
        return EXIT_CODES[self.verdict]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (logged as ``verdict.json``)."""
        return {"verdict": self.verdict, "exit_code": self.exit_code,
                "findings": [f.__dict__ for f in self.findings],
                "unavailable": self.unavailable, "unknown": self.unknown}


def _levels(threshold: Any) -> tuple[float | None, float | None]:
    if isinstance(threshold, Mapping):
        return threshold.get("warn"), threshold.get("retrain")
    return getattr(threshold, "warn", None), getattr(threshold, "retrain", None)


def decide(metrics: Mapping[str, float], thresholds: Mapping[str, Any]) -> Verdict:
    """The worst level any metric reached; ``thresholds`` maps ``monitor/...`` names to warn/retrain.

    ``metrics`` are keyed by full name (``monitor/error_rate``). Findings are sorted worst first.
    """
    findings: list[Finding] = []
    unavailable: list[str] = []
    unknown: list[str] = []
    for name, threshold in thresholds.items():
        warn, retrain = _levels(threshold)
        if name not in metrics:
            unknown.append(name)
            continue
        value = float(metrics[name])
        if math.isnan(value):
            unavailable.append(name)
            continue
        if retrain is not None and value >= retrain:
            findings.append(Finding(name, value, "retrain", float(retrain)))
        elif warn is not None and value >= warn:
            findings.append(Finding(name, value, "warn", float(warn)))
    findings.sort(key=lambda f: (-_RANK[f.level], f.metric))
    worst = max((f.level for f in findings), key=_RANK.__getitem__, default="ok")
    return Verdict(worst, findings, sorted(unavailable), sorted(unknown))
