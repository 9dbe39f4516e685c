"""Policy loading (with file:line:field errors) and gate checks as pure functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.errors import ConfigError
from lifecycle.policies import Candidate, blocking_failures, check_gates, is_known_metric, load_policy
from lifecycle.policies.loader import parse_policy

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_policies_load():
    default = load_policy(ROOT / "registry_policies" / "default.yaml")
    strict = load_policy(ROOT / "registry_policies" / "strict.yaml")
    assert default.production.required_tags.tags == ("approved_by",)
    assert strict.production.baseline.require_ci_excludes_zero is True
    assert strict.production.cooldown.min_seconds == 3600
    assert strict.monitoring["monitor/error_rate"].retrain == 0.05
    assert default.digest != strict.digest and len(default.digest) == 16


def test_default_policy_used_when_none_named(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load_policy(None).path.endswith("default.yaml")


@pytest.mark.tried(
    "policies",
    "policy files with an unknown key, a bad comparator, an unknown metric name, a wrong type, a bad "
    "mode, a missing required key, contradictory baseline bounds",
    "refused on load as `file:line: field: message`, naming the line and the field")
@pytest.mark.parametrize("text, line, needle", [
    ("staging:\n  thresholds:\n    - {metric: eval/loss, op: '<=', value: 2}\n  colldown: {min_seconds: 1}\n",
     4, "staging.colldown: unknown key 'colldown'"),
    ("production:\n  thresholds:\n    - metric: eval/loss\n      op: '=<'\n      value: 2\n",
     4, "production.thresholds[0].op: bad comparator '=<'"),
    ("production:\n  thresholds:\n    - {metric: eval/accuracy, op: '>=', value: 0.5}\n",
     3, "production.thresholds[0].metric: no such metric 'eval/accuracy'"),
    ("production:\n  latency: {max_p95_ms: fast}\n", 2, "production.latency.max_p95_ms: expected a number"),
    ("production:\n  checks: {mode: maybe}\n", 2, "production.checks.mode: 'maybe' is not one of disabled"),
    ("production:\n  latency: {mode: enabled}\n", 2, "missing required key 'max_p95_ms'"),
    ("monitoring:\n  monitor/psi: {warn: 0.1, retrian: 0.2}\n", 2, "monitoring.monitor/psi.retrian: unknown key"),
    ("monitoring:\n  monitor/psi: {warn: high}\n", 2, "monitoring.monitor/psi.warn: expected a number"),
    ("shipping:\n  checks: {}\n", 1, "unknown key 'shipping'"),
    ("production:\n  baseline: {min_improvement: 0.1, max_regression: 0.1}\n", 2, "not both"),
])
def test_bad_policy_names_file_line_and_field(tmp_path, text, line, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert needle in message


@pytest.mark.tried(
    "policies",
    "a policy file that does not exist, and one with broken YAML",
    "refused with the file (and the line of the YAML error) named")
def test_missing_and_malformed_policy(tmp_path):
    with pytest.raises(ConfigError, match="policy file not found"):
        load_policy(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("production:\n  checks: {mode: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_policy(bad)


def test_known_metric_names():
    for name in ("eval/bits_per_byte", "eval/check_no_pii", "compare/loss_delta", "compare/loss_delta_ci_high",
                 "compare/win_rate", "eval/latency_p95_ms"):
        assert is_known_metric(name), name
    for name in ("eval/accuracy", "train/loss", "compare/foo_delta", "bits_per_byte"):
        assert not is_known_metric(name), name


POLICY = """
production:
  thresholds:
    - {metric: eval/bits_per_byte, op: "<=", value: 2.0}
    - {metric: eval/rougeL, op: ">=", value: 0.9, mode: dry_run}
    - {metric: eval/bleu, op: ">=", value: 99, mode: disabled}
  baseline: {metric: eval/loss, max_regression: 0.02, require_ci_excludes_zero: true}
  latency: {max_p95_ms: 200}
  model_size: {max_bytes: 1000}
  signature: {}
  required_tags: {tags: [approved_by]}
  checks: {min_checks: 2}
  cooldown: {min_seconds: 3600}
"""

TAGS = {"eval/bits_per_byte": "1.5", "eval/rougeL": "0.2", "eval/loss": "2.0", "eval_data_digest": "abc",
        "compare/loss_delta_ci_high": "-0.01", "eval/latency_p95_ms": "150", "approved_by": "bob",
        "eval/check_a": "1", "eval/check_b": "1.0"}


def _results(**overrides):
    policy = parse_policy(POLICY, "p.yaml")
    cand = dict(version="5", tags=TAGS, model_size_bytes=800, has_signature=True, baseline_version="4",
                baseline_tags={"eval/loss": "2.02", "eval_data_digest": "abc"}, last_production_change=0.0,
                now=10_000.0)
    cand.update(overrides)
    return {r.gate: r for r in check_gates(policy.production, Candidate(**cand))}


def test_all_gates_pass_and_modes():
    res = _results()
    assert [r.status for r in res.values()].count("fail") == 1  # only the dry-run rougeL
    assert res["eval/rougeL >= 0.9"].mode == "dry_run" and not res["eval/rougeL >= 0.9"].blocking
    assert res["eval/bleu >= 99"].status == "skipped"
    assert "improvement" in res["baseline"].reason
    assert blocking_failures(list(res.values())) == []


@pytest.mark.tried(
    "policies",
    "a version that fails one gate at a time: threshold violated or its tag missing, baseline "
    "regression, other evaluation data, an interval that includes zero, latency, size (also unknown),"
    " no signature, no approval, a failed check, too few checks, cooldown",
    "that gate alone blocks, with a reason naming what failed")
@pytest.mark.parametrize("overrides, gate, needle", [
    (dict(tags={**TAGS, "eval/bits_per_byte": "2.5"}), "eval/bits_per_byte <= 2", "violates"),
    (dict(tags={k: v for k, v in TAGS.items() if k != "eval/bits_per_byte"}), "eval/bits_per_byte <= 2",
     "no numeric tag"),
    (dict(tags={**TAGS, "eval/loss": "2.2"}), "baseline", "regression beyond 2.00%"),
    (dict(tags={**TAGS, "eval_data_digest": "xyz"}), "baseline", "different data"),
    (dict(tags={**TAGS, "compare/loss_delta_ci_high": "0.003"}), "baseline", "does not exclude zero"),
    (dict(tags={**TAGS, "eval/latency_p95_ms": "250"}), "latency", "over budget"),
    (dict(model_size_bytes=5000), "model_size", "5000 bytes > 1000"),
    (dict(model_size_bytes=None), "model_size", "unknown"),
    (dict(has_signature=False), "signature", "no signature"),
    (dict(tags={k: v for k, v in TAGS.items() if k != "approved_by"}), "required_tags", "approved_by"),
    (dict(tags={**TAGS, "eval/check_b": "0"}), "checks", "eval/check_b"),
    (dict(tags={k: v for k, v in TAGS.items() if k != "eval/check_b"}), "checks", "need at least 2"),
    (dict(now=100.0), "cooldown", "100 s since the last production change (< 3600 s)"),
])
def test_each_gate_fails_with_a_reason(overrides, gate, needle):
    res = _results(**overrides)
    assert res[gate].status == "fail" and res[gate].blocking
    assert needle in res[gate].reason
    assert [r.gate for r in blocking_failures(list(res.values()))] == [gate]


def test_size_tag_wins_and_no_baseline_passes():
    res = _results(tags={**TAGS, "model_size_bytes": "10"}, model_size_bytes=None, baseline_version=None)
    assert res["model_size"].status == "pass"
    assert res["baseline"].status == "pass" and "nothing to compare" in res["baseline"].reason
