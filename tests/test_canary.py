"""Canary and shadow rollouts without a server: agreement, the shadow queue, the statistics and verdict
(hypothesis), the policy's canary section and its production gate, and `lifecycle serve` refusing bad canary
input before anything is written. Routing (shares, keys, the header): tests/test_canary_routing.py."""

from __future__ import annotations

import math
import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle.errors import ConfigError, DataError
from lifecycle.monitoring.canary import HOLDS, NOT_ENOUGH, WORSE, arm_figures, compare, split_arms
from lifecycle.policies import Candidate, check_gates
from lifecycle.policies.loader import parse_policy
from lifecycle.policies.schema import CanaryPolicy, TargetPolicy
from lifecycle.serving.router import ShadowQueue, agreement, token_overlap
from tests.cli import cli_output

# ---------------------------------------------------------------- shadow agreement and queue


@given(a=st.text(max_size=40), b=st.text(max_size=40))
def test_token_overlap_is_a_symmetric_score(a, b):
    x = token_overlap(a, b)
    assert 0.0 <= x <= 1.0
    assert x == pytest.approx(token_overlap(b, a))
    assert token_overlap(a, a) == 1.0
    if Counter(a.split()) != Counter(b.split()):
        assert x < 1.0


def test_agreement_is_the_mean_over_rows():
    got = agreement(["a b c", "x y"], ["a b c", "x z"])
    assert got["exact_match"] == 0.5 and got["rows"] == 2
    assert got["token_overlap"] == pytest.approx((1.0 + 0.5) / 2)


def test_shadow_queue_drops_and_counts_when_full_and_never_blocks():
    release = threading.Event()
    ran: list[int] = []
    dropped: list[int] = []

    def work(item: int) -> None:
        release.wait(10)
        ran.append(item)

    q = ShadowQueue(work, size=2, on_drop=dropped.append)
    accepted = [q.offer(i) for i in range(10)]  # one running, two waiting, the rest dropped at once
    release.set()
    assert q.join(10)
    assert accepted.count(True) == len(ran) and 2 <= len(ran) <= 3
    assert q.stats.dropped == len(dropped) == 10 - len(ran)
    assert q.stats.offered == 10


# ---------------------------------------------------------------- statistics and verdict


def rec(*, version="1", role="production", error=False, latency=10.0, tokens=8, finish="length", name="m",
        agreement_=None, status=None):
    r = {"model_name": name, "model_version": version, "role": role, "latency_ms": latency,
         "status": status or ("error" if error else "ok"), "error": "boom" if error else None,
         "finish_reason": None if error else finish, "rows": [] if error else [{"completion_tokens": tokens}]}
    if agreement_ is not None:
        r["agreement"] = agreement_
    return r


_arm = st.lists(st.tuples(st.booleans(), st.floats(1, 1000), st.integers(0, 64), st.sampled_from(["stop", "length"])),
                min_size=0, max_size=60)
FAST = CanaryPolicy(min_requests=5, bootstrap_resamples=200)


def _records(spec, version, role):
    return [rec(version=version, role=role, error=e, latency=lat, tokens=t, finish=f) for e, lat, t, f in spec]


@settings(max_examples=40, deadline=None)
@given(prod=_arm, chal=_arm)
def test_verdict_is_deterministic_and_one_of_the_three_codes(prod, chal):
    p, c = _records(prod, "1", "production"), _records(chal, "2", "canary")
    first = compare(p, c, FAST)
    assert first.code in (HOLDS, NOT_ENOUGH, WORSE)
    assert compare(p, c, FAST).code == first.code  # fixed seed: same records, same verdict
    if min(len(p), len(c)) < FAST.min_requests:
        assert first.code == NOT_ENOUGH
    for comp in first.comparisons:
        if not math.isnan(comp.low):
            assert comp.low <= comp.high


@settings(max_examples=40, deadline=None)
@given(arm=_arm)
def test_an_arm_compared_with_itself_is_never_worse(arm):
    p, c = _records(arm, "1", "production"), _records(arm, "2", "canary")
    assert compare(p, c, FAST).code != WORSE


@settings(max_examples=30, deadline=None)
@given(n=st.integers(20, 200), errors=st.integers(0, 200))
def test_figures_match_their_definitions(n, errors):
    errors = min(errors, n)
    records = [rec(error=i < errors, latency=float(i + 1)) for i in range(n)]
    f = arm_figures(records)
    assert f.requests == n and f.error_rate == pytest.approx(errors / n)
    ok = [float(i + 1) for i in range(errors, n)]
    if ok:
        import numpy as np

        assert f.latency_p50_ms == pytest.approx(float(np.percentile(ok, 50)))
        assert f.latency_p95_ms == pytest.approx(float(np.percentile(ok, 95)))


@settings(max_examples=25, deadline=None)
@given(extra=st.integers(0, 40))
def test_more_challenger_errors_never_improve_the_verdict(extra):
    prod = [rec(latency=10.0 + i % 5) for i in range(100)]
    base = [rec(version="2", role="canary", latency=10.0 + i % 5) for i in range(100)]
    worse = [rec(version="2", role="canary", error=i < extra, latency=10.0 + i % 5) for i in range(100)]
    rank = {HOLDS: 0, NOT_ENOUGH: 1, WORSE: 2}
    assert rank[compare(prod, worse, FAST).code] >= rank[compare(prod, base, FAST).code]


def test_clear_cases_decide():
    prod = [rec(latency=10.0 + i % 7) for i in range(150)]
    same = [rec(version="2", role="canary", latency=10.0 + i % 7) for i in range(150)]
    broken = [rec(version="2", role="canary", error=i % 2 == 0, latency=10.0) for i in range(150)]
    slow = [rec(version="2", role="canary", latency=60.0 + i % 7) for i in range(150)]
    policy = CanaryPolicy(min_requests=100)
    assert compare(prod, same, policy).code == HOLDS
    v = compare(prod, broken, policy)
    assert v.code == WORSE and "error_rate" in v.reason
    v = compare(prod, slow, policy)
    assert v.code == WORSE and "latency_p50" in v.reason
    assert compare(prod[:50], same[:50], policy).code == NOT_ENOUGH


def test_shadow_agreement_under_the_floor_is_worse():
    prod = [rec() for _ in range(120)]
    agree = [rec(version="2", role="shadow", agreement_={"exact_match": 1.0, "token_overlap": 1.0}) for _ in range(120)]
    disagree = [rec(version="2", role="shadow", agreement_={"exact_match": 0.0, "token_overlap": 0.1})
                for _ in range(120)]
    policy = CanaryPolicy(min_requests=100, min_shadow_exact_match=0.9, min_shadow_token_overlap=0.8)
    assert compare(prod, agree, policy).code == HOLDS
    v = compare(prod, disagree, policy)
    assert v.code == WORSE and "shadow_exact_match" in v.reason


def test_split_arms_refuses_a_third_version_and_counts_drops():
    records = [rec(), rec(version="2", role="canary"), rec(version="2", role="shadow", status="dropped")]
    arms = split_arms(records, name="m", production="1", challenger="2")
    assert (len(arms.production), len(arms.challenger), arms.shadow_dropped) == (1, 1, 1)
    with pytest.raises(DataError, match="m v3"):
        split_arms([*records, rec(version="3")], name="m", production="1", challenger="2")
    # A record of a plain server (or an older file) has no role: it is production's.
    old = {k: v for k, v in rec().items() if k != "role"}
    arms = split_arms([old, *records], name="m", production="1", challenger="2")
    assert len(arms.production) == 2 and arms.roles["production"] == 2


def dropped_copies(path, *, name: str, version: str, n: int) -> None:
    """``n`` shadow copies dropped as a router records them: its own ``_record_drop`` into a real recorder."""
    from types import SimpleNamespace

    from lifecycle.serving.records import InferenceRecorder
    from lifecycle.serving.router_model import Arm, RouterModel, _ShadowJob

    recorder = InferenceRecorder(path, model_name=name, model_version=version)
    arm = Arm(version, SimpleNamespace(recorder=recorder))  # the drop only reaches the arm's recorder
    for i in range(n):
        RouterModel()._record_drop(_ShadowJob(arm, ["p"], {}, f"r{i}", ["a"]))
    recorder.close()


def test_dropped_shadow_copies_are_counted_apart_never_as_errors(tmp_path):
    import json
    from datetime import datetime, timezone

    from lifecycle.monitoring.records import load_records
    from lifecycle.monitoring.service import service_metrics

    path = tmp_path / "records.jsonl"
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    ran = [dict(rec(version="2", role="shadow", latency=10.0 + i % 7,
                    agreement_={"exact_match": 1.0, "token_overlap": 1.0}), ts=now) for i in range(150)]
    path.write_text("".join(json.dumps(r) + "\n" for r in ran), encoding="utf-8")
    dropped_copies(path, name="m", version="2", n=300)
    shadow = [r for r in load_records(path).records if r["model_version"] == "2"]
    assert len(shadow) == 450 and sum(r["status"] == "dropped" for r in shadow) == 300

    m, alone = service_metrics(shadow), service_metrics(shadow[:150])
    assert (m["shadow_dropped"], alone["shadow_dropped"]) == (300, 0)
    assert m["error_rate"] == 0.0 and m["finish_error_rate"] == 0.0 and m["request_count"] == 150
    assert {k: v for k, v in m.items() if k != "shadow_dropped"} == {k: v for k, v in alone.items()
                                                                       if k != "shadow_dropped"}
    prod = [rec(latency=10.0 + i % 7) for i in range(150)]
    policy = CanaryPolicy(min_requests=100)
    verdict = compare(prod, shadow, policy)  # the drops left among the records: still no errors
    assert verdict.code == HOLDS and verdict.shadow_dropped == 300 and verdict.challenger.requests == 150
    assert verdict.challenger.error_rate == 0.0
    split = split_arms([*prod, *shadow], name="m", production="1", challenger="2")
    again = compare(split.production, split.challenger, policy, shadow_dropped=split.shadow_dropped)
    assert (again.code, again.shadow_dropped, again.challenger) == (HOLDS, 300, verdict.challenger)
    # Too few copies ran: not enough evidence (never worse), and the reason says why.
    few = compare(prod, shadow[:40] + shadow[150:], policy)
    assert few.code == NOT_ENOUGH and "300 shadow copies were dropped" in few.reason


# ---------------------------------------------------------------- policy


CANARY_YAML = """
production:
  thresholds: []
canary:
  min_requests: 50
  max_error_rate_delta: 0.02
  share_steps: [0.1, 0.5, 1.0]
  mode: enabled
"""


def test_policy_canary_section_parses_and_gates_production():
    policy = parse_policy(CANARY_YAML, "p.yaml")
    assert policy.canary == CanaryPolicy(min_requests=50, max_error_rate_delta=0.02, mode="enabled")
    assert policy.production.canary == policy.canary and policy.staging.canary is None
    base = dict(version="2", tags={}, baseline_version="1", baseline_tags={})
    [r] = check_gates(policy.production, Candidate(**base))
    assert (r.kind, r.status, r.blocking) == ("canary", "fail", True) and "no canary verdict" in r.reason
    ok = Candidate(**base, canary_verdict={"code": 0, "seq": 7, "production": "1"})
    assert check_gates(policy.production, ok)[0].status == "pass"
    stale = Candidate(**base, canary_verdict={"code": 0, "seq": 7, "production": "0"})
    assert "production is v1 now" in check_gates(policy.production, stale)[0].reason
    worse = Candidate(**base, canary_verdict={"code": 11, "seq": 8, "production": "1"})
    assert check_gates(policy.production, worse)[0].status == "fail"
    first = Candidate(version="1", tags={})
    assert check_gates(policy.production, first)[0].status == "pass"
    assert check_gates(TargetPolicy(canary=CanaryPolicy(mode="disabled")), Candidate(**base))[0].status == "skipped"


@pytest.mark.parametrize("body, fragment", [
    ("canary: {share_steps: [0.5, 0.1]}", "share_steps: must be increasing"),
    ("canary: {share_steps: [0, 1]}", "share_steps"),
    ("canary: {min_requests: 0}", "min_requests: must be >= 1"),
    ("canary: {confidence: 1.5}", "confidence"),
    ("canary: {max_error_rate_delta: -1}", "max_error_rate_delta: must be >= 0"),
    ("canary: {min_shadow_exact_match: 2}", "min_shadow_exact_match"),
    ("canary: {mode: on}", "is not one of"),
    ("canary: {min_requets: 5}", "unknown key 'min_requets'"),
])
def test_bad_canary_sections_name_the_line_and_field(body, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        parse_policy(body, "p.yaml")
    assert str(err.value).startswith("p.yaml:1:")


def test_shipped_policies_have_a_canary_section():
    from pathlib import Path

    from lifecycle.policies import load_policy

    for path in sorted(Path(__file__).resolve().parents[1].glob("registry_policies/*.yaml")):
        assert load_policy(path).canary is not None, path


# ---------------------------------------------------------------- `lifecycle serve` refuses bad canary input


@pytest.mark.tried("canary", "`lifecycle serve --canary` with a share outside (0, 1), both --canary and --shadow, a "
                   "share without --canary, a missing challenger alias, the same version on both arms",
                   "one-line error, exit 2 or 5; no ledger event, no server")
def test_serve_refuses_bad_canary_input_and_writes_nothing(unique_name, tmp_path, monkeypatch):
    import os

    import mlflow
    from mlflow import MlflowClient

    def no_exec(*args):  # a case that wrongly got through must fail here, not replace the test process
        raise AssertionError(f"lifecycle serve started a server: {args[1]}")

    monkeypatch.setattr(os, "execve", no_exec)

    from lifecycle.registry.ledger import Ledger
    from tests import servers

    client = MlflowClient()
    client.create_registered_model(unique_name)
    exp = mlflow.create_experiment(f"canary-bad-{unique_name}", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_text("x", "m/x.txt")
    v1 = client.create_model_version(unique_name, f"runs:/{run.info.run_id}/m", run.info.run_id).version
    client.set_registered_model_alias(unique_name, "production", v1)
    client.set_registered_model_alias(unique_name, "staging", v1)
    port = str(servers.free_port())
    cases = [
        *[(["--canary", "staging", f"--canary-share={share}"], 2, f"between 0 and 1 (exclusive), written like 0.1; "
           f"got {share!r}") for share in ("0", "1", "1.5", "-0.1", "nan", "50%", " 0.5", "", "inf")],
        # An accepted share goes on to the registry: here to the missing alias (exit 5), not to a server.
        (["--canary", "nosuch", "--canary-share", "0.0001"], 5, "no @nosuch alias"),
        (["--canary", "production"], 2, "--canary production: that is the production alias itself"),
        (["--shadow", "production"], 2, "--shadow production: that is the production alias itself"),
        (["--canary", ""], 2, "--canary needs the challenger's alias"),
        (["--shadow", " "], 2, "--shadow needs the challenger's alias"),
        (["--canary", "staging", "--shadow", "staging"], 2, "not both"),
        (["--canary", "nosuch", "--shadow", "staging"], 2, "not both"),
        (["--canary", "staging", "--refresh-s", "nan"], 2, "--refresh-s must be a number of seconds > 0"),
        (["--canary", "staging", "--refresh-s", "inf"], 2, "--refresh-s must be a number of seconds > 0"),
        (["--shadow", "staging", "--shadow-queue", "0"], 2, "--shadow-queue must be >= 1"),
        (["--canary-share", "0.2"], 2, "needs --canary"),
        (["--canary", "nosuch", "--canary-share", "0.2"], 5, "no @nosuch alias"),
        (["--canary", "staging", "--canary-share", "0.2"], 2, "both name"),
        (["--shadow", "staging", "--version", "1"], 2, "drop --version"),
    ]
    for args, code, fragment in cases:
        got, out = cli_output("serve", unique_name, "--port", port, *args)
        assert got == code, (args, out)
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], (args, out)
    assert Ledger(client).events(unique_name) == []
    assert "lifecycle.canary.share" not in (client.get_registered_model(unique_name).tags or {})


@pytest.mark.tried("canary", "`lifecycle canary` with a missing challenger alias, a missing records file, a bad "
                   "--since, a bad policy, an unknown model", "one-line error and its exit code; no ledger event")
def test_canary_command_refuses_bad_input_and_writes_nothing(unique_name, tmp_path):
    from mlflow import MlflowClient

    from lifecycle.registry.ledger import Ledger
    from tests.cli import cli

    client = MlflowClient()
    client.create_registered_model(unique_name)
    records = tmp_path / "records.jsonl"
    records.write_text("", encoding="utf-8")
    bad_policy = tmp_path / "p.yaml"
    bad_policy.write_text("canary: {share_steps: [2]}\n", encoding="utf-8")
    assert cli("canary", unique_name, "--records", str(records), "--challenger", "staging") == 5  # no @production
    cases = [
        (["--records", str(records)], 2, "no canary in progress"),  # no canary_start in the ledger
        (["--records", str(records), "--challenger", "staging"], 5, "no @production alias"),
        (["--records", str(records), "--challenger", "production"], 2, "@production is the production alias itself"),
        (["--records", str(records), "--challenger", " "], 2, "the challenger alias is empty"),
        (["--records", str(tmp_path / "nope.jsonl")], 4, "not found"),
        (["--records", str(records), "--since", "yesterday"], 2, "--since 'yesterday'"),
        (["--records", str(records), "--policy", str(bad_policy)], 2, "share_steps"),
    ]
    for args, code, fragment in cases:
        got, out = cli_output("canary", unique_name, *args)
        lines = [line for line in out.splitlines() if line.strip()]
        assert got == code and len(lines) == 1 and fragment in lines[0], (args, out)
    got, out = cli_output("canary", f"{unique_name}-missing", "--records", str(records))
    assert got == 5 and "no registered model" in out
    assert Ledger(client).events(unique_name) == []


def _registered_pair(client, name: str, tmp_path) -> tuple[str, str]:
    """Two versions of ``name`` (tiny text artifacts: the canary command reads records, not weights)."""
    import mlflow

    exp = mlflow.create_experiment(f"canary-act-{name}", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_text("x", "m/x.txt")
    client.create_registered_model(name)
    versions = [client.create_model_version(name, f"runs:/{run.info.run_id}/m", run.info.run_id).version
                for _ in range(2)]
    client.set_registered_model_alias(name, "production", versions[0])
    client.set_registered_model_alias(name, "staging", versions[1])
    return str(versions[0]), str(versions[1])


def test_canary_act_follows_the_policy_mode(unique_name, tmp_path):
    import json
    from datetime import datetime, timezone

    from mlflow import MlflowClient

    from lifecycle.registry import canary as registry_canary
    from lifecycle.registry.ledger import Ledger

    client = MlflowClient()
    v1, v2 = _registered_pair(client, unique_name, tmp_path)
    registry_canary.start(unique_name, registry_canary.arms(unique_name, "staging"), mode="canary", share=0.5)
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    lines = [dict(rec(name=unique_name, version=v1), ts=now) for _ in range(60)]
    lines += [dict(rec(name=unique_name, version=v2, role="canary", error=i % 2 == 0), ts=now) for i in range(60)]
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    policy = tmp_path / "policy.yaml"
    for mode in ("dry_run", "enabled"):
        policy.write_text(f"canary: {{min_requests: 50, mode: {mode}}}\n", encoding="utf-8")
        code, out = cli_output("canary", unique_name, "--records", str(records), "--policy", str(policy), "--act")
        assert code == 11 and "error_rate" in out, out
        if mode == "dry_run":
            assert "would take v" in out and "nothing changed" in out
            assert client.get_registered_model(unique_name).aliases.get("staging") is not None
    assert "staging" not in (client.get_registered_model(unique_name).aliases or {})
    actions = [e.action for e in Ledger(client).events(unique_name)]
    assert actions == ["canary_start", "canary_verdict", "canary_verdict", "canary_rollback"]
    # The challenger is gone: no canary in progress (exit 2); named, it is missing (exit 5); nothing recorded.
    code, out = cli_output("canary", unique_name, "--records", str(records), "--policy", str(policy))
    assert code == 2 and "no canary in progress: @staging" in out and "no longer exists" in out, out
    code, out = cli_output("canary", unique_name, "--records", str(records), "--policy", str(policy),
                           "--challenger", "staging")
    assert code == 5 and "no @staging alias" in out
    assert len(Ledger(client).events(unique_name)) == 4
