"""Challenger against production on the same live traffic: figures, bootstrap intervals, a verdict.

Pure functions over inference records (the serving stage's contract, with the router's ``role``,
``request_id`` and ``agreement`` fields); nothing here talks to MLflow.

Each comparison measures how much *worse* the challenger is than production (its "excess"), with
a percentile-bootstrap interval at the policy's confidence (each arm resampled on its own, with a
fixed seed so that the same records always give the same verdict), against the policy's allowed
delta:

* ``error_rate``: challenger minus production error rate (absolute);
* ``latency_p50`` / ``latency_p95``: challenger over production percentile, minus 1;
* ``completion_length``: |challenger - production| mean completion tokens over production's;
* ``finish_reason_shift``: total variation distance of the finish-reason mixes;
* for shadow pairs ``shadow_exact_match`` / ``shadow_token_overlap``: the floor minus the mean
  agreement with production's answer to the same request.

Verdict: fewer than ``min_requests`` on either arm is ``10`` (not enough evidence); an interval
entirely above its allowance is ``11`` (worse: roll back); every interval within its allowance is
``0`` (the challenger holds); anything else ``10`` (undecided yet).

A shadow copy the router dropped because its queue was full (``status`` ``dropped``) never reached
the challenger: it is counted apart (``shadow_dropped``), never as a request or an error of either
arm, so drops alone can never make the verdict 11.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lifecycle.errors import DataError
from lifecycle.monitoring.drift import percentile
from lifecycle.monitoring.records import identity
from lifecycle.monitoring.service import is_dropped, is_error, served
from lifecycle.policies.schema import CanaryPolicy

HOLDS, NOT_ENOUGH, WORSE = 0, 10, 11
VERDICT_WORDS = {HOLDS: "holds", NOT_ENOUGH: "not enough evidence", WORSE: "worse"}
_SEED = 20260131


@dataclass
class Arms:
    """The window's records of each arm (dropped shadow copies counted apart)."""

    production: list[dict[str, Any]]
    challenger: list[dict[str, Any]]
    shadow_dropped: int = 0
    roles: Counter = field(default_factory=Counter)
    #: Records of other registered models in the window (a records file shared by several servers), left out.
    other_models: Counter = field(default_factory=Counter)


def split_arms(records: Iterable[dict[str, Any]], *, name: str, production: str, challenger: str,
               since: datetime | None = None, until: datetime | None = None) -> Arms:
    """Production's and the challenger's records of ``name`` inside ``[since, until]``.

    Records of any other version of ``name`` in the window are refused (:class:`DataError` listing
    them): a comparison must not mix in a third version. Records of other models (several servers
    writing one file) are no version of ``name``: left out, counted in ``other_models``.
    """
    prod: list[dict[str, Any]] = []
    chal: list[dict[str, Any]] = []
    others: Counter = Counter()
    other_models: Counter = Counter()
    roles: Counter = Counter()
    dropped = 0
    for rec in records:
        ts = rec.get("_ts")
        if ts is not None and ((since is not None and ts < since) or (until is not None and ts > until)):
            continue
        version = str(rec.get("model_version"))
        if rec.get("model_name") != name:
            other_models[identity(rec)] += 1
            continue
        if version not in (production, challenger):
            others[identity(rec)] += 1
            continue
        if is_dropped(rec):
            dropped += 1
            continue
        roles[rec.get("role") or "production"] += 1
        (prod if version == production else chal).append(rec)
    if others:
        found = ", ".join(f"{k} ({n})" for k, n in others.most_common())
        raise DataError(f"the window holds records of other versions than {name} v{production} (production) and "
                        f"v{challenger} (challenger): {found}; narrow it with --since")
    return Arms(production=prod, challenger=chal, shadow_dropped=dropped, roles=roles, other_models=other_models)


@dataclass
class ArmFigures:
    """What one arm did in the window."""

    requests: int
    error_rate: float
    latency_p50_ms: float
    latency_p95_ms: float
    completion_tokens_mean: float
    finish_length_rate: float
    shadow_pairs: int = 0
    exact_match: float = math.nan
    token_overlap: float = math.nan


@dataclass
class Comparison:
    """One figure's excess (how much worse the challenger is), its interval and its allowance."""

    metric: str
    production: float
    challenger: float
    excess: float
    low: float
    high: float
    allowed: float
    status: str  # holds | worse | undecided | n/a

    def to_gate(self) -> dict[str, Any]:
        """The comparison as a ledger gate entry (the figures travel with the event)."""
        reason = (f"{self.metric}: production {_fmt(self.production)}, challenger {_fmt(self.challenger)}; excess "
                  f"{_fmt(self.excess)} [{_fmt(self.low)}, {_fmt(self.high)}] vs allowed {_fmt(self.allowed)}")
        status = {"holds": "pass", "worse": "fail"}.get(self.status, "undecided")
        return {"gate": self.metric, "kind": "canary", "mode": "enabled", "status": status, "reason": reason,
                **{k: _json_number(v) for k, v in asdict(self).items() if k not in ("metric", "status")}}


@dataclass
class CanaryVerdict:
    """The verdict (0 / 10 / 11), why, and every figure behind it."""

    code: int
    reason: str
    production: ArmFigures
    challenger: ArmFigures
    comparisons: list[Comparison]
    #: Shadow copies dropped under load (queue full): not requests, not errors.
    shadow_dropped: int = 0

    @property
    def word(self) -> str:
        """``holds`` / ``not enough evidence`` / ``worse``."""
        return VERDICT_WORDS[self.code]


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _json_number(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _ok(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not is_error(r)]


def _samples(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-request arrays of one arm: errors, latencies, completion lengths, finish, agreement."""
    records = served(records)
    ok = _ok(records)
    lengths = [float(sum(row.get("completion_tokens", 0) for row in rows)) / max(len(rows), 1)
               for rows in (r.get("rows") or [] for r in ok)]
    pairs = [r["agreement"] for r in ok if isinstance(r.get("agreement"), dict)]
    return {
        "error": np.asarray([1.0 if is_error(r) else 0.0 for r in records]),
        "latency": np.asarray([float(r.get("latency_ms", 0.0)) for r in ok]),
        "length": np.asarray(lengths),
        "finish_length": np.asarray([1.0 if r.get("finish_reason") == "length" else 0.0 for r in ok]),
        "exact_match": np.asarray([float(p.get("exact_match", 0.0)) for p in pairs]),
        "token_overlap": np.asarray([float(p.get("token_overlap", 0.0)) for p in pairs]),
    }


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else math.nan


def arm_figures(records: Sequence[dict[str, Any]]) -> ArmFigures:
    """Requests, error rate, latency p50/p95 (successful requests), mean completion tokens, finish mix, agreement.

    Dropped shadow copies are no requests: they are left out here (:func:`compare` counts them).
    """
    s = _samples(records)
    return ArmFigures(requests=len(served(records)), error_rate=_mean(s["error"]),
                      latency_p50_ms=percentile(s["latency"], 50), latency_p95_ms=percentile(s["latency"], 95),
                      completion_tokens_mean=_mean(s["length"]), finish_length_rate=_mean(s["finish_length"]),
                      shadow_pairs=int(s["exact_match"].size), exact_match=_mean(s["exact_match"]),
                      token_overlap=_mean(s["token_overlap"]))


Stat = Callable[[np.ndarray], np.ndarray]  # resamples (B x n) -> B statistics


def _boot(x: np.ndarray, stat: Stat, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``stat`` of ``resamples`` bootstrap resamples of ``x`` (in chunks: memory stays ~ 64 x n)."""
    if x.size == 0:
        return np.full(resamples, np.nan)
    out = []
    for start in range(0, resamples, 64):
        k = min(64, resamples - start)
        out.append(stat(x[rng.integers(0, x.size, size=(k, x.size))]))
    return np.concatenate(out)


def _quantile(q: float) -> Stat:
    return lambda m: np.percentile(m, q, axis=1)


def _means(m: np.ndarray) -> np.ndarray:
    return m.mean(axis=1)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size < values.size or finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0 * 100.0
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail))


def _relative_increase(chal: np.ndarray | float, prod: np.ndarray | float) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(prod) > 0, np.asarray(chal) / np.asarray(prod) - 1.0, np.nan)


def compare(production: Sequence[dict[str, Any]], challenger: Sequence[dict[str, Any]], policy: CanaryPolicy, *,
            shadow_dropped: int = 0) -> CanaryVerdict:
    """Compare the arms' records under ``policy`` (see the module docstring for the verdict rules).

    ``shadow_dropped`` counts drops :func:`split_arms` already took out; dropped copies still among
    the records are left out and counted too.
    """
    shadow_dropped += sum(is_dropped(r) for r in [*production, *challenger])
    rng = np.random.default_rng(_SEED)
    B, conf = policy.bootstrap_resamples, policy.confidence
    p, c = _samples(production), _samples(challenger)
    fp, fc = arm_figures(production), arm_figures(challenger)
    comps: list[Comparison] = []

    def add(metric: str, prod_value: float, chal_value: float, excess: float, boot: np.ndarray, allowed: float) -> None:
        low, high = _interval(boot, conf)
        if math.isnan(excess) or math.isnan(low):
            status = "n/a"
        elif low > allowed:
            status = "worse"
        elif high <= allowed:
            status = "holds"
        else:
            status = "undecided"
        comps.append(Comparison(metric, prod_value, chal_value, float(excess), low, high, allowed, status))

    boot_p, boot_c = _boot(p["error"], _means, B, rng), _boot(c["error"], _means, B, rng)
    add("error_rate", fp.error_rate, fc.error_rate, fc.error_rate - fp.error_rate, boot_c - boot_p,
        policy.max_error_rate_delta)
    for q, allowed in ((50, policy.max_latency_p50_increase), (95, policy.max_latency_p95_increase)):
        bp, bc = _boot(p["latency"], _quantile(q), B, rng), _boot(c["latency"], _quantile(q), B, rng)
        vp, vc = getattr(fp, f"latency_p{q}_ms"), getattr(fc, f"latency_p{q}_ms")
        add(f"latency_p{q}", vp, vc, float(_relative_increase(vc, vp)), _relative_increase(bc, bp), allowed)
    bp, bc = _boot(p["length"], _means, B, rng), _boot(c["length"], _means, B, rng)
    vp, vc = fp.completion_tokens_mean, fc.completion_tokens_mean
    add("completion_length", vp, vc, float(np.abs(_relative_increase(vc, vp))), np.abs(_relative_increase(bc, bp)),
        policy.max_completion_length_change)
    bp, bc = _boot(p["finish_length"], _means, B, rng), _boot(c["finish_length"], _means, B, rng)
    # Two outcomes (stop, length): the total variation distance is the difference of one share.
    add("finish_reason_shift", fp.finish_length_rate, fc.finish_length_rate,
        abs(fc.finish_length_rate - fp.finish_length_rate), np.abs(bc - bp), policy.max_finish_reason_shift)
    floors = (("exact_match", policy.min_shadow_exact_match), ("token_overlap", policy.min_shadow_token_overlap))
    for key, floor in floors:
        if c[key].size:
            mean = _mean(c[key])
            add(f"shadow_{key}", 1.0, mean, floor - mean, floor - _boot(c[key], _means, B, rng), 0.0)
    code, reason = _decide(fp.requests, fc.requests, comps, policy.min_requests, shadow_dropped)
    return CanaryVerdict(code=code, reason=reason, production=fp, challenger=fc, comparisons=comps,
                         shadow_dropped=shadow_dropped)


def _decide(n_prod: int, n_chal: int, comps: list[Comparison], min_requests: int,
            shadow_dropped: int = 0) -> tuple[int, str]:
    if min(n_prod, n_chal) < min_requests:
        drops = (f" ({shadow_dropped} shadow copies were dropped, queue full: a larger --shadow-queue keeps more)"
                 if shadow_dropped and n_chal < min_requests else "")
        return NOT_ENOUGH, (f"{n_chal} challenger and {n_prod} production request(s) in the window{drops}; the "
                            f"policy wants at least {min_requests} of each")
    worse = [c for c in comps if c.status == "worse"]
    if worse:
        return WORSE, "worse beyond the allowed delta: " + "; ".join(
            f"{c.metric} excess {_fmt(c.excess)} (interval low {_fmt(c.low)} > allowed {_fmt(c.allowed)})"
            for c in worse)
    open_ = [c for c in comps if c.status != "holds"]
    if open_:
        return NOT_ENOUGH, "undecided: " + "; ".join(
            f"{c.metric} interval [{_fmt(c.low)}, {_fmt(c.high)}] straddles allowed {_fmt(c.allowed)}"
            if c.status == "undecided" else f"{c.metric} not measurable" for c in open_)
    return HOLDS, f"every figure within its allowance on {n_chal} challenger / {n_prod} production request(s)"
