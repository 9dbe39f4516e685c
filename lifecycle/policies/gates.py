"""Gate checks as pure functions: facts about a version in, one readable result per gate out."""

from __future__ import annotations

import math
import operator
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from lifecycle.policies import schema as s

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
}


@dataclass(frozen=True)
class Candidate:
    """What the registry knows about a version when a gate is checked.

    ``model_size_bytes`` and ``has_signature`` are ``None`` when they were not looked up (the
    gate that needs them then fails with a reason rather than guessing).
    """

    version: str
    tags: Mapping[str, str]
    model_size_bytes: int | None = None
    has_signature: bool | None = None
    baseline_version: str | None = None
    baseline_tags: Mapping[str, str] | None = None
    last_production_change: float | None = None
    now: float = field(default_factory=time.time)
    #: The newest canary verdict of this version: {"code": 0|10|11, "seq": n, "production": version}.
    canary_verdict: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict. ``status`` is ``pass``, ``fail`` or ``skipped`` (mode disabled)."""

    gate: str
    kind: str
    mode: str
    status: str
    reason: str

    @property
    def blocking(self) -> bool:
        """True when this result refuses the promotion (an enabled gate that failed)."""
        return self.mode == "enabled" and self.status == "fail"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the ledger."""
        return asdict(self)


def _num(tags: Mapping[str, str], key: str) -> float | None:
    raw = tags.get(key)
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _threshold(g: s.ThresholdGate, c: Candidate) -> tuple[bool, str]:
    value = _num(c.tags, g.metric)
    if value is None:
        return False, f"version {c.version} has no numeric tag {g.metric} (evaluate it first)"
    ok = _OPS[g.op](value, g.value)
    return ok, f"{g.metric} = {_fmt(value)} {'satisfies' if ok else 'violates'} {g.op} {_fmt(g.value)}"


def _baseline(g: s.BaselineGate, c: Candidate) -> tuple[bool, str]:
    if c.baseline_version is None:
        return True, "no production version yet: nothing to compare against"
    if c.baseline_version == c.version:
        return True, f"version {c.version} already holds production"
    base = c.baseline_tags or {}
    if g.require_same_data:
        mine, theirs = c.tags.get("eval_data_digest"), base.get("eval_data_digest")
        if not mine or not theirs:
            return False, (f"cannot compare with production v{c.baseline_version}: eval_data_digest missing on "
                           f"{'the candidate' if not mine else 'production'}")
        if mine != theirs:
            return False, (f"evaluated on different data than production v{c.baseline_version} "
                           f"({mine[:12]} != {theirs[:12]}): re-evaluate on the same data")
    new, old = _num(c.tags, g.metric), _num(base, g.metric)
    if new is None or old is None:
        return False, f"{g.metric} missing on {'the candidate' if new is None else f'production v{c.baseline_version}'}"
    # Improvement as a fraction of the production value, positive = better in the metric's direction.
    gain = (old - new) if s.lower_is_better(g.metric) else (new - old)
    rel = gain / abs(old) if old != 0 else (math.inf if gain > 0 else -math.inf if gain < 0 else 0.0)
    parts = [f"{g.metric} {_fmt(new)} vs production v{c.baseline_version} {_fmt(old)} ({rel:+.2%} improvement)"]
    ok = True
    if g.min_improvement is not None and rel < g.min_improvement:
        ok = False
        parts.append(f"needs >= {g.min_improvement:.2%}")
    if g.max_regression is not None and rel < -g.max_regression:
        ok = False
        parts.append(f"regression beyond {g.max_regression:.2%}")
    if g.require_ci_excludes_zero:
        hi = _num(c.tags, "compare/loss_delta_ci_high")
        if hi is None:
            ok = False
            parts.append("no compare/loss_delta_ci_high tag (run the comparison)")
        elif hi >= 0:
            ok = False
            parts.append(f"loss delta CI high {_fmt(hi)} does not exclude zero")
        else:
            parts.append(f"loss delta CI high {_fmt(hi)} < 0")
    return ok, "; ".join(parts)


def _latency(g: s.LatencyGate, c: Candidate) -> tuple[bool, str]:
    value = _num(c.tags, "eval/latency_p95_ms")
    if value is None:
        return False, f"version {c.version} has no eval/latency_p95_ms tag"
    ok = value <= g.max_p95_ms
    return ok, f"latency p95 {_fmt(value)} ms {'within' if ok else 'over'} budget {_fmt(g.max_p95_ms)} ms"


def _size(g: s.ModelSizeGate, c: Candidate) -> tuple[bool, str]:
    size = _num(c.tags, "model_size_bytes")
    size = size if size is not None else c.model_size_bytes
    if size is None:
        return False, "model size unknown (no model_size_bytes tag and artifacts not listed)"
    ok = size <= g.max_bytes
    return ok, f"model size {int(size)} bytes {'<=' if ok else '>'} {g.max_bytes}"


def _signature(g: s.SignatureGate, c: Candidate) -> tuple[bool, str]:
    if c.has_signature is None:
        return False, "could not read the version's MLmodel"
    return c.has_signature, "MLmodel has a signature" if c.has_signature else "MLmodel has no signature"


def _required(g: s.RequiredTagsGate, c: Candidate) -> tuple[bool, str]:
    missing = [t for t in g.tags if not str(c.tags.get(t, "")).strip()]
    if missing:
        return False, f"missing required tag(s): {', '.join(missing)}"
    return True, "tags present: " + ", ".join(f"{t}={c.tags[t]}" for t in g.tags)


def _checks(g: s.ChecksGate, c: Candidate) -> tuple[bool, str]:
    checks = {k: v for k, v in c.tags.items() if k.startswith("eval/check_")}
    failed = sorted(k for k, v in checks.items() if _num(checks, k) != 1.0)
    if failed:
        return False, f"failed behavioural checks: {', '.join(failed)}"
    if len(checks) < g.min_checks:
        return False, f"{len(checks)} eval/check_* tag(s), need at least {g.min_checks}"
    return True, f"all {len(checks)} behavioural checks passed"


def _cooldown(g: s.CooldownGate, c: Candidate) -> tuple[bool, str]:
    if c.last_production_change is None:
        return True, "no earlier production change in the ledger"
    elapsed = c.now - c.last_production_change
    ok = elapsed >= g.min_seconds
    return ok, f"{elapsed:.0f} s since the last production change ({'>=' if ok else '<'} {g.min_seconds:.0f} s)"


def _compression(g: s.CompressionGate, c: Candidate) -> tuple[bool, str]:
    parent = c.tags.get("compressed_from")
    if not parent:
        return True, "not a compressed variant"
    short = g.metric.partition("/")[2]
    base = _num(c.tags, f"compress/parent_{short}")
    value = _num(c.tags, g.metric)
    if base is None or value is None:
        return False, (f"compressed variant of v{parent} without {g.metric} and compress/parent_{short} tags: "
                       "make it with `lifecycle compress` (it measures both on the same data)")
    measured, now = c.tags.get("compress/eval_data_digest"), c.tags.get("eval_data_digest")
    if measured and now and measured != now:
        return False, (f"re-evaluated on other data ({now[:12]}) than its comparison with v{parent} "
                       f"({measured[:12]}): run `lifecycle compress` again")
    loss = (value - base) if s.lower_is_better(g.metric) else (base - value)  # > 0: worse than the parent
    rel = loss / abs(base) if base != 0 else (math.inf if loss > 0 else 0.0)
    parts = [f"{g.metric} {_fmt(value)} vs parent v{parent} {_fmt(base)} ({rel:+.2%} loss)"]
    ok = True
    if g.max_regression is not None and rel > g.max_regression:
        ok = False
        parts.append(f"more than the allowed {g.max_regression:.2%}")
    if g.max_delta is not None and loss > g.max_delta:
        ok = False
        parts.append(f"loss {_fmt(loss)} exceeds max_delta {_fmt(g.max_delta)}")
    return ok, "; ".join(parts)


def _canary(g: s.CanaryPolicy, c: Candidate) -> tuple[bool, str]:
    if c.baseline_version is None:
        return True, "no production version yet: nothing to compare against on live traffic"
    if c.baseline_version == c.version:
        return True, f"version {c.version} already holds production"
    v = c.canary_verdict
    if not v:
        return False, (f"no canary verdict for v{c.version}: serve it beside production (lifecycle serve --canary/"
                       "--shadow) and run `lifecycle canary`")
    if v.get("production") != c.baseline_version:
        return False, (f"canary verdict #{v.get('seq')} compared v{c.version} with v{v.get('production')}, but "
                       f"production is v{c.baseline_version} now: run `lifecycle canary` again")
    code = v.get("code")
    words = {0: "holds", 10: "not enough evidence", 11: "worse than production"}
    ok = code == 0
    return ok, f"canary verdict #{v.get('seq')} for v{c.version}: {code} ({words.get(code, 'unknown')})"


def check_gates(target: s.TargetPolicy, candidate: Candidate) -> list[GateResult]:
    """Evaluate every configured gate of ``target`` for ``candidate``; one result per gate."""
    checks: list[tuple[str, str, Any, Callable[[Any, Candidate], tuple[bool, str]]]] = []
    for g in target.thresholds:
        checks.append((f"{g.metric} {g.op} {_fmt(g.value)}", "threshold", g, _threshold))
    named = [("baseline", _baseline), ("latency", _latency), ("model_size", _size), ("signature", _signature),
             ("required_tags", _required), ("checks", _checks), ("cooldown", _cooldown),
             ("compression", _compression), ("canary", _canary)]
    for kind, fn in named:
        g = getattr(target, kind)
        if g is not None:
            checks.append((kind, kind, g, fn))
    results = []
    for name, kind, gate, fn in checks:
        if gate.mode == "disabled":
            results.append(GateResult(name, kind, gate.mode, "skipped", "gate disabled"))
            continue
        ok, reason = fn(gate, candidate)
        results.append(GateResult(name, kind, gate.mode, "pass" if ok else "fail", reason))
    return results


def blocking_failures(results: list[GateResult]) -> list[GateResult]:
    """The results that refuse the promotion (dry-run failures are reported, not blocking)."""
    return [r for r in results if r.blocking]
