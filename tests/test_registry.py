"""The registry against MLflow's own sqlite store: promote, reject, rollback, ledger, bad input.

The REST-server, concurrency, basic-auth and PostgreSQL cases are in test_registry_server.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lifecycle.registry import ledger as L
from lifecycle.registry.guard import sign, verify_signature
from lifecycle.registry.rollback import plan_rollback
from tests.cli import cli
from tests.registry_support import make_version

ROOT = Path(__file__).resolve().parents[1]
STRICT = str(ROOT / "registry_policies" / "strict.yaml")



def aliases(client, name: str) -> dict[str, str]:
    """The model's aliases with string versions (the store returns ints)."""
    return {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}


def ev(seq, action, to, frm=None, target="production", effective=None):
    eff = action in (L.PROMOTE, L.ROLLBACK, L.UI_PROMOTE, L.GUARD_REVERT, L.ABORT) if effective is None else effective
    return L.Event(model="m", action=action, target=target, seq=seq, from_version=frm, to_version=to, effective=eff)


# ---- pure logic ---------------------------------------------------------------------------------

def test_holder_stack_and_rollback_plan():
    events = [ev(1, L.PROMOTE, "1"), ev(2, L.REJECT, "5"), ev(3, L.PROMOTE, "2", "1"), ev(4, L.PROMOTE, "3", "2"),
              ev(5, L.PROMOTE, "9", target="staging")]
    assert L.holder_stack(events) == ["1", "2", "3"]
    assert plan_rollback(events, "3", to=None, expect_current=None, force=False)[:2] == (L.ROLLBACK, "2")
    events.append(ev(6, L.ROLLBACK, "2", "3"))
    assert L.holder_stack(events) == ["1", "2"]
    # A retried rollback neither skips back again nor errors when fenced on the version it left.
    assert plan_rollback(events, "2", to=None, expect_current=None, force=False)[0] == L.ROLLBACK_REFUSED
    assert plan_rollback(events, "2", to=None, expect_current="3", force=False)[0] == L.ROLLBACK_NOOP
    # Going back further is possible when asked for explicitly.
    assert plan_rollback(events, "2", to=None, expect_current="2", force=False)[:2] == (L.ROLLBACK, "1")
    assert plan_rollback(events, "2", to=None, expect_current="7", force=False)[0] == L.ROLLBACK_REFUSED
    # --to a version that never passed the production gates needs --force.
    assert plan_rollback(events, "2", to="5", expect_current=None, force=False)[0] == L.ROLLBACK_REFUSED
    assert plan_rollback(events, "2", to="5", expect_current=None, force=True)[:2] == (L.ROLLBACK, "5")
    assert plan_rollback([ev(1, L.PROMOTE, "1")], "1", to=None, expect_current=None,
                         force=False)[0] == L.ROLLBACK_REFUSED


def test_guard_revert_and_ui_promote_in_stack():
    events = [ev(1, L.PROMOTE, "1"), ev(2, L.UI_PROMOTE, "2", "1"), ev(3, L.GUARD_REVERT, "2", "4")]
    assert L.holder_stack(events) == ["1", "2"]
    assert L.passed_production(events, "2") and not L.passed_production(events, "4")


def test_event_json_roundtrip_and_tag_limit():
    e = L.Event(model="m", action=L.REJECT, target="production", seq=7, gates=[{"gate": "g", "reason": "x" * 9000}])
    tags = e.tags()
    assert len(tags["ledger.event"]) <= 8000 and tags["ledger.seq"] == "0000000007"
    back = L.Event.from_json(tags["ledger.event"], run_id="r")
    assert back.seq == 7 and back.run_id == "r" and back.gates[0]["gate"] == "g"


def test_webhook_signature():
    body = b'{"entity": "model_version_alias"}'
    now = time.time()
    sig = sign("s3cret", "d1", str(int(now)), body.decode())
    assert verify_signature("s3cret", "d1", str(int(now)), body, sig) is None
    assert verify_signature("other", "d1", str(int(now)), body, sig) == "signature mismatch"
    assert verify_signature("s3cret", "d2", str(int(now)), body, sig) == "signature mismatch"
    old = str(int(now) - 3600)
    assert "replay" in verify_signature("s3cret", "d1", old, body, sign("s3cret", "d1", old, body.decode()))
    assert "missing" in verify_signature("s3cret", "", "", body, "")


# ---- against MLflow's sqlite store -----------------------------------------------------------------

@pytest.fixture
def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def test_promote_rollback_history(client, unique_name, capsys):
    name = unique_name
    v1 = make_version(client, name)
    v2 = make_version(client, name, {"eval/loss": "2.9"})
    v3 = make_version(client, name, {"eval/loss": "2.95"})
    assert cli("promote", name, v1, "--to", "staging") == 0
    assert cli("promote", name, v1, "--to", "production") == 0
    assert cli("promote", name, v2, "--to", "production") == 0
    out = capsys.readouterr().out
    assert "PASS eval/perplexity <= 10000" in out and f"{name}@production -> v{v2} (was v{v1})" in out
    assert aliases(client, name) == {"production": v2, "staging": v1}
    assert client.get_model_version(name, v2).current_stage == "Production"
    assert client.get_model_version(name, v1).current_stage == "Archived"

    assert cli("promote", name, v3, "--to", "production") == 0
    assert cli("rollback", name, "--reason", "latency spike") == 0
    assert aliases(client, name)["production"] == v2  # the ledger's "before", not v3-1 by luck
    assert client.get_model_version(name, v2).current_stage == "Production"
    # Retried by accident: refused (exit 9), production untouched.
    assert cli("rollback", name, "--reason", "latency spike") == 9
    # Retried with fencing on the version it left: a recorded no-op.
    assert cli("rollback", name, "--reason", "retry", "--expect-current", v3) == 0
    assert aliases(client, name)["production"] == v2
    # Going back further is explicit.
    assert cli("rollback", name, "--reason", "still bad", "--expect-current", v2) == 0
    assert aliases(client, name)["production"] == v1
    capsys.readouterr()

    assert cli("history", name, "--json") == 0
    events = json.loads(capsys.readouterr().out)
    assert [e["seq"] for e in events] == list(range(1, 9))
    assert [e["action"] for e in events] == ["promote", "promote", "promote", "promote", "rollback",
                                             "rollback_refused", "rollback_noop", "rollback"]
    assert events[4]["reverts"] == 4 and events[4]["from_version"] == v3 and events[4]["to_version"] == v2
    first = events[1]
    assert first["actor"] and first["policy_digest"] and first["eval_run_ids"]["eval_run_id"] == "r0"
    assert first["data_digests"]["eval_data_digest"] == "d" * 64
    assert {g["gate"] for g in first["gates"]} >= {"baseline", "required_tags", "checks"}
    assert cli("status", name) == 0
    out = capsys.readouterr().out
    assert f"@production -> v{v1}" in out and "WARNING" not in out
    # The ledger is searchable in the UI: one run per event in the ledger experiment.
    exp = client.get_experiment_by_name("lifecycle-ledger")
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`ledger.model` = '{name}' and tags.`ledger.action` = 'rollback'")
    assert len(runs) == 2


def test_rejection_changes_nothing_and_is_recorded(client, unique_name, capsys):
    name = unique_name
    v1 = make_version(client, name)
    assert cli("promote", name, v1, "--to", "production") == 0
    bad = make_version(client, name, {"eval/loss": "3.5", "approved_by": ""})
    before = aliases(client, name)
    assert cli("promote", name, bad, "--to", "production") == 3
    captured = capsys.readouterr()
    assert "FAIL baseline" in captured.out and "FAIL required_tags" in captured.out
    assert "refused for production by 2 gate(s)" in captured.err
    assert aliases(client, name) == before
    assert client.get_model_version(name, bad).current_stage == "None"
    events = L.Ledger(client).events(name)
    assert events[-1].action == L.REJECT and not events[-1].effective and events[-1].to_version == bad
    # Dry run: evaluated and recorded, nothing moves, exit 0 even though gates fail.
    assert cli("promote", name, bad, "--to", "production", "--dry-run") == 0
    assert "would be refused" in capsys.readouterr().out
    assert aliases(client, name) == before
    assert L.Ledger(client).events(name)[-1].action == L.DRY_RUN


def test_strict_policy_signature_size_cooldown(client, unique_name, capsys):
    name = unique_name
    nosig = make_version(client, name, {"compare/loss_delta_ci_high": "-0.1"}, signature=False)
    assert cli("promote", name, nosig, "--to", "staging", "--policy", STRICT) == 3
    assert "MLmodel has no signature" in capsys.readouterr().out
    ok = make_version(client, name, {"compare/loss_delta_ci_high": "-0.1"})
    assert cli("promote", name, ok, "--to", "production", "--policy", STRICT) == 0
    assert "model size 2" in capsys.readouterr().out  # listed from the artifacts: no size tag
    better = make_version(client, name, {"eval/loss": "2.5", "compare/loss_delta_ci_high": "-0.1"})
    assert cli("promote", name, better, "--to", "production", "--policy", STRICT) == 3
    assert "FAIL cooldown" in capsys.readouterr().out


def test_bad_input_one_line_errors(client, unique_name, capsys, tmp_path):
    name = unique_name
    v1 = make_version(client, name)
    cases = [
        (("promote", "no-such-model", "1", "--to", "staging"), 5, "no registered model named 'no-such-model'"),
        (("promote", name, "42", "--to", "staging"), 5, f"{name} has no version 42 (versions: 1)"),
        (("promote", name, v1, "--to", "prod"), 2, "unknown target 'prod'"),
        (("promote", name, v1, "--to", "staging", "--policy", str(tmp_path / "x.yaml")), 2, "policy file not found"),
        (("rollback", name, "--reason", "r"), 5, "no earlier production version"),
        (("rollback", name, "--reason", "  "), 2, "needs --reason"),
        (("rollback", name, "--to", "9", "--reason", "r"), 5, "has no version 9"),
        (("history", "nope-model"), 5, "no registered model named"),
    ]
    for args, code, needle in cases:
        assert cli(*args) == code, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert aliases(client, name) == {}
    assert client.get_model_version(name, v1).current_stage == "None"


def test_default_policy_found_outside_the_checkout(tmp_path, monkeypatch):
    """`lifecycle promote` without --policy, run from any folder: the package carries the default."""
    from lifecycle.policies import load_policy

    monkeypatch.chdir(tmp_path)
    packaged = load_policy(None)
    assert Path(packaged.path).parent == ROOT / "lifecycle" / "policies"
    # One file to edit: the package's copy is the project's registry_policies/default.yaml.
    assert packaged.digest == load_policy(ROOT / "registry_policies" / "default.yaml").digest
    packaged_file = (ROOT / "lifecycle" / "policies" / "default.yaml").resolve()
    assert packaged_file == (ROOT / "registry_policies" / "default.yaml").resolve()


def test_lock_fencing_reads_the_owner_once_half_the_lease_is_gone(client, unique_name):
    from lifecycle.errors import ConcurrencyError
    from lifecycle.registry.lock import RegistryLock, lock_name

    lock = RegistryLock(client, unique_name, lease_s=1.0, wait_s=5)
    lock.acquire()
    lock.verify()  # the first half of the lease: nobody can have broken it
    time.sleep(0.6)
    client.delete_registered_model(lock_name(unique_name))  # a contender broke the expired lease
    with pytest.raises(ConcurrencyError, match="lost the registry lock"):
        lock.verify()
    lock.release()  # no longer ours: deletes nothing, raises nothing
    other = RegistryLock(client, unique_name, lease_s=60, wait_s=5).acquire()
    assert other.held
    other.release()
    assert lock_name(unique_name) not in {m.name for m in client.search_registered_models()}
