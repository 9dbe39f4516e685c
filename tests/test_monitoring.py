"""Monitoring, pure parts: drift statistics on known distributions, windows, service metrics, verdicts."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle.errors import ConfigError, DataError
from lifecycle.monitoring import drift, service
from lifecycle.monitoring.config import MonitorConfig
from lifecycle.monitoring.records import load_records, parse_since, read_records, records_path, select_window
from lifecycle.monitoring.reference import fallback_token_ids, split_segments, unknown_rate
from lifecycle.monitoring.verdict import decide

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


# ---------------------------------------------------------------- drift statistics

def test_psi_of_identical_samples_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(50, 10, 5000)
    assert drift.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    small = drift.psi(ref, rng.normal(50, 10, 5000))
    moderate = drift.psi(ref, rng.normal(53, 10, 5000))  # ~ (0.3 sigma)^2
    major = drift.psi(ref, rng.normal(80, 10, 5000))
    assert small < 0.02 < moderate < 0.25 < major


def test_psi_handles_discrete_and_constant_references():
    # Token lengths are integers: quantile edges repeat and must merge, not crash or divide by zero.
    ref = np.array([3] * 50 + [4] * 50)
    assert drift.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi([7] * 10, [7] * 10) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi([7] * 10, [9] * 10) > 1.0
    with pytest.raises(ValueError, match="empty"):
        drift.psi(ref, [])


def test_ks_statistic_known_values():
    a = np.arange(100.0)
    assert drift.ks_statistic(a, a) == 0.0
    assert drift.ks_statistic(a, a + 1000) == 1.0  # disjoint supports
    assert drift.ks_statistic(a, a + 1000) == drift.ks_statistic(a + 1000, a)
    # Half the mass moved past the other sample: the CDF gap is exactly one half.
    assert drift.ks_statistic([0, 1, 2, 3], [2, 3, 10, 11]) == pytest.approx(0.5)


def test_js_divergence_bounds_and_symmetry():
    p = {"a": 3, "b": 1}
    assert drift.js_divergence(p, p) == 0.0
    assert drift.js_divergence({"a": 1}, {"b": 5}) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = dict(enumerate(rng.random(8)))
        y = dict(enumerate(rng.random(8) * (rng.random(8) > 0.3)))
        value = drift.js_divergence(x, y)
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(drift.js_divergence(y, x))
    # A hand-computed case: p=(1,0), q=(1/2,1/2): JS = 0.5*KL(p||m) + 0.5*KL(q||m), m=(3/4,1/4).
    expected = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert drift.js_divergence({"x": 1}, {"x": 1, "y": 1}) == pytest.approx(expected)
    with pytest.raises(ValueError):
        drift.js_divergence({}, {"a": 1})


def test_total_variation():
    assert drift.total_variation({"stop": 1}, {"stop": 2}) == 0.0
    assert drift.total_variation({"stop": 1}, {"error": 1}) == 1.0
    assert drift.total_variation({"stop": 0.8, "length": 0.2}, {"stop": 0.5, "length": 0.5}) == pytest.approx(0.3)


# ---------------------------------------------------------------- records and windows

def _rec(ts: datetime, version: str = "1", name: str = "m", *, latency: float = 10.0, error: str | None = None,
         prompt_tokens: tuple[int, ...] = (5,), completion: int = 4, finish: str = "stop") -> dict:
    rows = [] if error else [{"prompt_tokens": p, "completion_tokens": completion, "finish_reason": finish,
                              "truncated": False} for p in prompt_tokens]
    return {"ts": ts.isoformat(timespec="milliseconds"), "model_name": name, "model_version": version,
            "latency_ms": latency, "n_rows": len(rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": sum(r["completion_tokens"] for r in rows), "batch_size": len(rows),
            "finish_reason": None if error else finish, "rows": rows, "params": {}, "error": error,
            "status": "invalid" if error else "ok"}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_parse_since_relative_iso_and_bad():
    assert parse_since("24h", now=NOW) == NOW - timedelta(hours=24)
    assert parse_since("30m", now=NOW) == NOW - timedelta(minutes=30)
    assert parse_since("7d", now=NOW) == NOW - timedelta(days=7)
    assert parse_since("2026-02-01T00:00:00Z") == datetime(2026, 2, 1, tzinfo=timezone.utc)
    assert parse_since("2026-02-01T00:00:00") == datetime(2026, 2, 1, tzinfo=timezone.utc)  # naive = UTC
    assert parse_since("all") is None and parse_since(None) is None
    with pytest.raises(ConfigError, match="duration such as 30m"):
        parse_since("yesterday")


def test_read_records_skips_and_counts_malformed_lines_with_line_number(tmp_path, caplog):
    # Issue #18 item 4b: a damaged line used to raise here and block every later monitor of the
    # file; it is now skipped, counted and named (file:line) in a warning.
    good = _write(tmp_path / "r.jsonl", [_rec(NOW)])
    assert read_records(good)[0]["_ts"] == NOW
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_rec(NOW)) + "\n{not json\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="lifecycle.monitoring.records"):
        read = load_records(bad)
    assert len(read.records) == 1 and len(read.skipped) == 1
    assert "bad.jsonl:2: not a JSON record" in read.skipped[0] and "bad.jsonl:2" in caplog.text
    bad.write_text('{"hello": 1}\n', encoding="utf-8")
    read = load_records(bad)
    assert read.records == [] and "not an inference record" in read.skipped[0]


def test_a_record_glued_after_a_torn_one_is_recovered(tmp_path):
    whole, other = json.dumps(_rec(NOW, latency=1.0)), json.dumps(_rec(NOW, latency=2.0))
    path = tmp_path / "torn.jsonl"
    # A writer killed mid-line, then another writer's record appended right after the fragment.
    path.write_bytes((whole + "\n" + whole[:37] + other + "\n").encode())
    read = load_records(path)
    assert [r["latency_ms"] for r in read.records] == [1.0, 2.0]
    assert len(read.skipped) == 1 and "torn record" in read.skipped[0]


_valid_lines = st.builds(lambda lat, v, rows: json.dumps(_rec(NOW - timedelta(seconds=lat), v, latency=lat,
                                                              prompt_tokens=tuple(rows))),
                         st.floats(0, 1e6, allow_nan=False), st.sampled_from(["1", "2"]),
                         st.lists(st.integers(0, 10_000), min_size=1, max_size=4))
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                      max_size=3), max_leaves=8)
_FIELDS = ["ts", "latency_ms", "model_name", "model_version", "rows", "batch_size", "error", "status",
           "finish_reason", "prompts", "completions"]


@st.composite
def _damaged(draw) -> bytes:
    """A line the reader must skip: torn, binary, non-UTF-8, a field of the wrong type, or one missing."""
    kind = draw(st.sampled_from(["torn", "binary", "non-utf8", "wrong-type", "missing", "not-object"]))
    line = draw(_valid_lines)
    if kind == "torn":
        return line.encode()[:draw(st.integers(1, len(line) - 1))]
    if kind == "binary":
        return draw(st.binary(min_size=1, max_size=60)).replace(b"\n", b"") or b"\x00"
    if kind == "non-utf8":
        cut = draw(st.integers(1, len(line)))  # at 0 the whole record after the byte is recovered
        return line.encode()[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + line.encode()[cut:]
    if kind == "not-object":
        return json.dumps(draw(st.lists(_json_values, max_size=3))).encode()
    rec = json.loads(line)
    key = draw(st.sampled_from(["ts", "latency_ms"] if kind == "missing" else _FIELDS))
    if kind == "missing":
        del rec[key]
    else:
        bad = {"ts": st.sampled_from([5, "yesterday", "0001-01-01T00:00:00+14:00", None]),
               "latency_ms": st.sampled_from(["fast", -1, None, True, [1]]),
               "rows": st.sampled_from(["x", [1], [{"prompt_tokens": "many"}], [{"completion_tokens": -3}]]),
               "batch_size": st.sampled_from(["x", -1, [2]]),
               "prompts": st.sampled_from(["x", [1], [None]]), "completions": st.sampled_from([{"a": 1}, [2.5]])}
        rec[key] = draw(bad.get(key, st.sampled_from([[1], {"a": "b"}, 1.5, True])))
    return json.dumps(rec).encode()


@pytest.mark.tried("monitoring", "records files with torn lines, binary garbage, non-UTF-8 bytes, wrong field types "
                   "and missing fields mixed among good records (hypothesis)",
                   "damaged lines are skipped and counted, every good record is read, the window and service "
                   "metrics are still computed")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(_valid_lines.map(lambda line: (True, line.encode())),
                                _damaged().map(lambda raw: (False, raw))), min_size=1, max_size=30))
def test_damaged_lines_are_skipped_and_counted_never_fatal(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"".join(raw + b"\n" for _, raw in lines))
    read = load_records(path)
    good = sum(ok for ok, _ in lines)
    damaged = [raw for ok, raw in lines if not ok and raw.strip()]
    assert len(read.records) == good
    assert len(read.skipped) == len(damaged)
    if any(r["model_version"] == "1" for r in read.records):
        window = select_window(read.records, name="m", version="1", until=NOW, mismatch="separate")
        metrics = service.service_metrics(window.records)
        assert metrics["request_count"] == len(window.records)
        assert all(isinstance(v, float) for v in metrics.values())


def test_records_path_needs_a_file_or_the_env(tmp_path, monkeypatch):
    monkeypatch.delenv("LIFECYCLE_INFERENCE_LOG", raising=False)
    with pytest.raises(ConfigError, match="LIFECYCLE_INFERENCE_LOG"):
        records_path(None)
    with pytest.raises(DataError, match="not found"):
        records_path(tmp_path / "none.jsonl")
    f = _write(tmp_path / "r.jsonl", [_rec(NOW)])
    monkeypatch.setenv("LIFECYCLE_INFERENCE_LOG", str(f))
    assert records_path(None) == f


def test_window_splits_time_and_never_mixes_versions():
    recs = [dict(r, _ts=datetime.fromisoformat(r["ts"])) for r in [
        _rec(NOW - timedelta(days=3)), _rec(NOW - timedelta(hours=1)), _rec(NOW - timedelta(minutes=5)),
        _rec(NOW - timedelta(minutes=4), version="2"), _rec(NOW - timedelta(days=2), version="2"),
    ]]
    since = NOW - timedelta(hours=24)
    with pytest.raises(DataError, match=r"other model versions than m v1: m v2 \(1\).*--version-mismatch separate"):
        select_window(recs, name="m", version="1", since=since, until=NOW)
    w = select_window(recs, name="m", version="1", since=since, until=NOW, mismatch="separate")
    assert len(w.records) == 2 and len(w.baseline) == 1 and w.others == {"m v2": 1}
    # Records written by a model served without a name carry its run id as version.
    anon = [dict(_rec(NOW, name="run-abc", version="abc"), _ts=NOW)]
    assert len(select_window(anon, name="m", version="1", aliases=["abc"], until=NOW).records) == 1
    with pytest.raises(DataError, match=r"no inference records of m v1 since .*widen the window"):
        select_window(recs, name="m", version="1", since=NOW - timedelta(minutes=1), until=NOW)
    with pytest.raises(DataError, match="the records file holds none"):
        select_window([], name="m", version="1", until=NOW)


def test_service_metrics_of_a_known_window():
    recs = [_rec(NOW, latency=float(i), prompt_tokens=(i, i)) for i in range(1, 101)]
    recs += [_rec(NOW, error="prompt too long", latency=0.1)] * 25
    recs[0] = _rec(NOW, latency=1.0, prompt_tokens=(1, 1), finish="length")
    m = service.service_metrics(recs)
    assert m["request_count"] == 125 and m["row_count"] == 200
    assert m["error_rate"] == pytest.approx(0.2)
    assert m["latency_p50_ms"] == pytest.approx(50.5)  # refused requests do not count as fast ones
    assert m["latency_p99_ms"] == pytest.approx(99.01)
    assert m["prompt_tokens_total"] == 2 * sum(range(1, 101))
    rates = (m["finish_stop_rate"], m["finish_length_rate"], m["finish_error_rate"])
    assert rates == pytest.approx((0.792, 0.008, 0.2))


# ---------------------------------------------------------------- reference and tokens

def test_segments_and_fallback_tokens_of_a_byte_level_tokenizer():
    from lifecycle.data.sources import pydoc_documents
    from lifecycle.data.tokenizer import train_tokenizer

    assert split_segments(["a\n\nb\n  \nc", "\n\n"]) == ["a", "b", "c"]
    tok = train_tokenizer([[d for _, d in zip(range(80), pydoc_documents())]], vocab_size=300)
    fallback = fallback_token_ids(tok)
    english = tok(["the value of the function is returned"])["input_ids"]
    foreign = tok(["東京都の天気は晴れです"])["input_ids"]
    assert unknown_rate(english, fallback) == 0.0
    assert unknown_rate(foreign, fallback) > 0.5  # CJK never merged in a vocabulary of Python docs
    assert math.isnan(unknown_rate([], fallback))


# ---------------------------------------------------------------- verdict and config

def test_verdict_levels_unavailable_and_unknown():
    th = {"monitor/error_rate": {"warn": 0.05, "retrain": 0.2}, "monitor/input_drift_psi": {"warn": 0.1},
          "monitor/token_js": {"retrain": 0.3}, "monitor/made_up": {"warn": 1}}
    v = decide({"monitor/error_rate": 0.01, "monitor/input_drift_psi": 0.05, "monitor/token_js": float("nan")}, th)
    assert (v.verdict, v.exit_code, v.unavailable, v.unknown) == ("ok", 0, ["monitor/token_js"], ["monitor/made_up"])
    v = decide({"monitor/error_rate": 0.05, "monitor/input_drift_psi": 0.5, "monitor/token_js": 0.0}, th)
    assert (v.verdict, v.exit_code) == ("warn", 10)
    v = decide({"monitor/error_rate": 0.3, "monitor/input_drift_psi": 0.5, "monitor/token_js": 0.0}, th)
    assert (v.verdict, v.exit_code) == ("retrain", 11)
    assert [f.metric for f in v.findings] == ["monitor/error_rate", "monitor/input_drift_psi"]  # worst first
    assert str(v.findings[0]) == "monitor/error_rate=0.3 >= retrain 0.2"


@pytest.mark.parametrize("overrides, message", [
    (["version_mismatch=mix"], "refuse or separate"),
    (["psi_bins=1"], "psi_bins"),
    (["split=dev"], "split"),
    (["bins=3"], "unknown config key bins"),
])
def test_bad_monitor_config_is_refused(overrides, message):
    from lifecycle.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(MonitorConfig, None, overrides)
