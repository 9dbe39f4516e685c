"""Half-done moves, `lifecycle repair`, guard failures in status, and locks that must not block forever.

The plan logic is tested as pure functions; the rest against MLflow's sqlite store through the CLI.
The SIGKILL fault injection against a real server is in test_registry_faults.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from lifecycle.registry import ledger as L
from lifecycle.registry import lock as lock_mod
from lifecycle.registry.lock import lock_name
from lifecycle.registry.rollback import plan_rollback
from lifecycle.registry.settle import happened
from tests.cli import cli
from tests.registry_support import make_version
from tests.test_registry import aliases, ev


def pending(event: L.Event) -> L.Event:
    event.state = L.PENDING
    return event


# ---- pure logic ---------------------------------------------------------------------------------

@pytest.mark.tried("registry", "a promote killed after writing its ledger event but before moving the alias, then "
                   "`lifecycle rollback`", "the pending event does not count: the rollback never moves production "
                   "forward to the version that never held it")
def test_pending_moves_do_not_count():
    events = [ev(1, L.PROMOTE, "1"), ev(2, L.PROMOTE, "2", "1"), pending(ev(3, L.PROMOTE, "3", "2"))]
    assert L.holder_stack(events) == ["1", "2"] and not L.passed_production(events, "3")
    # Killed before the alias moved: production is still v2; back to v1, never forward to v3.
    assert plan_rollback(events, "2", to=None, expect_current=None, force=False)[:2] == (L.ROLLBACK, "1")
    # Killed after: production is v3; back to v2, which held it before.
    assert plan_rollback(events, "3", to=None, expect_current=None, force=False)[:2] == (L.ROLLBACK, "2")
    # A first-ever promotion that never completed leaves nothing to roll back to.
    assert plan_rollback([pending(ev(1, L.PROMOTE, "1"))], "1", to=None, expect_current=None,
                         force=False)[0] == L.ROLLBACK_REFUSED
    failed = ev(3, L.PROMOTE, "3", "2")
    failed.state = L.FAILED
    assert L.holder_stack(events[:2] + [failed]) == ["1", "2"]
    assert [e.seq for e in L.unsettled(events)] == [3]


def test_happened_reads_the_registry_or_the_next_move():
    half = pending(ev(3, L.PROMOTE, "3", "2"))
    assert happened(half, [half], "3") and not happened(half, [half], "2")
    # A later move started from what the registry said under the lock.
    assert happened(half, [half, ev(4, L.ROLLBACK, "2", "3")], "2")
    assert not happened(half, [half, ev(4, L.PROMOTE, "4", "2")], "4")
    # Another alias's moves say nothing about this one.
    assert not happened(half, [half, ev(4, L.PROMOTE, "9", "3", target="staging")], "2")


# ---- against MLflow's sqlite store ---------------------------------------------------------------

@pytest.fixture
def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _write(client, event: L.Event, state: str | None = None) -> L.Event:
    led = L.Ledger(client)
    event.seq = event.seq or led.next_seq(event.model)
    if state:
        event.state = state
    return led.write(event)


def test_status_and_repair_of_a_half_done_promotion(client, unique_name, capsys):
    name = unique_name
    v1, v2 = make_version(client, name), make_version(client, name, {"eval/loss": "2.9"})
    assert cli("promote", name, v1, "--to", "production") == 0
    # What a promote killed before moving the alias leaves: a pending event, nothing moved.
    _write(client, L.Event(model=name, action=L.PROMOTE, target="production", from_version=v1, to_version=v2,
                           effective=True, reason="killed"), L.PENDING)
    capsys.readouterr()
    assert cli("status", name) == 0
    out = capsys.readouterr().out
    assert (f"HALF-DONE: event #2 (promote @production -> v{v2}) was never confirmed; "
            f"run `lifecycle repair {name}`") in out
    assert "[HALF-DONE: never confirmed]" in out
    assert cli("history", name) == 0 and "#2   ?" in capsys.readouterr().out
    assert cli("repair", name) == 0
    out = capsys.readouterr().out
    assert "#2 promote -> v2 never happened (marked failed)" in out
    events = L.Ledger(client).events(name)
    assert [(e.seq, e.action, e.state) for e in events] == [(1, "promote", "done"), (2, "promote", "failed"),
                                                           (3, "repair", "done")]
    assert aliases(client, name) == {"production": v1}
    assert cli("repair", name) == 0 and "nothing to repair" in capsys.readouterr().out
    assert len(L.Ledger(client).events(name)) == 3


@pytest.mark.tried("registry", "a first-ever promotion whose abort (by an older version) left the alias set while "
                   "the ledger says aborted", "status shows the disagreement; repair holds the alias to the policy and "
                   "records it, after which registry and ledger agree")
def test_repair_of_an_old_abort_that_left_the_alias(client, unique_name, capsys):
    name = unique_name
    v1 = make_version(client, name)
    # The older writer: promote #1 then an effective abort back to "no alias", but the alias stayed.
    _write(client, L.Event(model=name, action=L.PROMOTE, target="staging", seq=1, to_version=v1, effective=True))
    _write(client, L.Event(model=name, action=L.ABORT, target="staging", seq=2, from_version=v1, to_version=None,
                           effective=True, reverts=1))
    client.set_registered_model_alias(name, "staging", v1)
    capsys.readouterr()
    assert cli("status", name) == 0
    assert "DISAGREE: @staging is v1 but the ledger says unset" in capsys.readouterr().out
    assert cli("repair", name) == 0
    events = L.Ledger(client).events(name)
    assert events[-1].action == L.UI_PROMOTE and events[-1].actor.startswith("repair:")
    assert L.holder_stack(events, "staging")[-1] == v1
    capsys.readouterr()
    assert cli("status", name) == 0 and "WARNING" not in capsys.readouterr().out


def test_guard_failed_is_shown_until_repaired(client, unique_name, capsys):
    name = unique_name
    v1 = make_version(client, name)
    assert cli("promote", name, v1, "--to", "production") == 0
    # What the guard writes after giving up (its receiver numbers it with next_seq under the lock).
    led = L.Ledger(client)
    led.append(L.Event(action="guard_failed", model=name, target="production", seq=led.next_seq(name),
                       reason="reconcile failed 5 times: cannot reach the tracking server", actor="guard:ops"))
    for _ in range(6):
        assert cli("promote", name, v1, "--to", "staging", "--dry-run") == 0
    capsys.readouterr()
    assert cli("status", name) == 0
    out = capsys.readouterr().out
    assert "GUARD FAILED: event #2: the guard gave up on @production: reconcile failed 5 times" in out
    assert " guard_failed " in out  # shown although older than the last 5 events
    assert cli("repair", name) == 0
    assert "looked again after guard_failed #2" in capsys.readouterr().out
    assert cli("status", name) == 0 and "WARNING" not in capsys.readouterr().out


def _plant_lock(client, name: str, **tags: str) -> None:
    client.create_registered_model(lock_name(name), tags=tags)


@pytest.mark.tried("lock", "a lock model without an owner tag, and one whose holder process was killed",
                   "the ownerless one counts as stale after a grace period and the dead holder's at once: the "
                   "next command breaks it instead of waiting 120 s and exiting 9")
def test_ownerless_and_dead_holder_locks_are_broken(client, unique_name, monkeypatch, capsys):
    name = unique_name
    v1 = make_version(client, name)
    monkeypatch.setenv("LIFECYCLE_LOCK_WAIT_S", "2")
    _plant_lock(client, name)  # no owner tag at all
    started = time.monotonic()
    assert cli("promote", name, v1, "--to", "staging") == 9
    err = capsys.readouterr().err
    assert "no owner tag" in err and f"lifecycle repair {name} --break-lock" in err and time.monotonic() - started < 30
    assert cli("status", name) == 0 and "STALE LOCK" not in capsys.readouterr().out  # young: not stale yet
    monkeypatch.setattr(lock_mod, "OWNERLESS_GRACE_S", 0.0)
    assert cli("status", name) == 0 and "STALE LOCK: no holder recorded, no owner tag" in capsys.readouterr().out
    assert cli("promote", name, v1, "--to", "staging") == 0
    assert aliases(client, name) == {"staging": v1}

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant_lock(client, name, **{"lock.owner": "gone", "lock.expires": f"{time.time() + 3600:.3f}",
                                 "lock.holder": f"{socket.gethostname()}:{dead.stdout.strip()}"})
    started = time.monotonic()
    assert cli("promote", name, v1, "--to", "production") == 0
    assert time.monotonic() - started < 30 and aliases(client, name)["production"] == v1


def test_break_lock_refuses_a_live_holder(client, unique_name, capsys):
    name = unique_name
    make_version(client, name)
    _plant_lock(client, name, **{"lock.owner": "alive", "lock.expires": f"{time.time() + 3600:.3f}",
                                 "lock.holder": f"{socket.gethostname()}:{os.getpid()}"})
    assert cli("repair", name, "--break-lock") == 9
    assert "is not stale" in capsys.readouterr().err
    assert lock_name(name) in {m.name for m in client.search_registered_models()}
    client.delete_registered_model(lock_name(name))
    client.create_registered_model(lock_name(name), tags={"lock.owner": "x", "lock.expires": "1"})
    assert cli("repair", name, "--break-lock") == 0
    out = capsys.readouterr().out
    assert f"broke the registry lock of {name}" in out and "lease expired" in out
    assert lock_name(name) not in {m.name for m in client.search_registered_models()}


def test_status_tells_a_move_in_progress_from_a_half_done_one(client, unique_name, capsys):
    from lifecycle.registry.lock import RegistryLock
    from lifecycle.registry.status import status

    name = unique_name
    v1 = make_version(client, name)
    _write(client, L.Event(model=name, action=L.PROMOTE, target="staging", to_version=v1, effective=True), L.PENDING)
    with RegistryLock(client, name, purpose="a promote in flight"):
        problems = status(name, client=client)["problems"]
        assert len(problems) == 1 and problems[0].startswith("IN PROGRESS: event #1 (promote @staging -> v1)")
    problems = status(name, client=client)["problems"]
    assert len(problems) == 1 and problems[0].startswith("HALF-DONE: event #1"), problems


def test_repair_settles_a_half_done_canary_rollback_of_a_custom_alias(client, unique_name, capsys):
    """`lifecycle canary --act` deletes the challenger's alias, whatever its name: a rollback killed half-way on
    @candidate used to stay HALF-DONE forever, since repair only looked at staging and production."""
    from lifecycle.registry.status import status

    name = unique_name
    v1, v2 = make_version(client, name), make_version(client, name)
    assert cli("promote", name, v1, "--to", "production") == 0
    client.set_registered_model_alias(name, "candidate", v2)

    def half_done_rollback() -> L.Event:  # what `canary --act` leaves when killed between its ledger write and its end
        return _write(client, L.Event(model=name, action=L.CANARY_ROLLBACK, target="candidate", from_version=v2,
                                      to_version=None, effective=True, challenger_alias="candidate",
                                      reason="canary verdict 11"), L.PENDING)

    # Killed before the alias was deleted: the rollback never happened, the alias stays.
    first = half_done_rollback()
    assert any(p.startswith(f"HALF-DONE: event #{first.seq} (canary_rollback @candidate")
               for p in status(name, client=client)["problems"])
    capsys.readouterr()
    assert cli("repair", name) == 0
    out = capsys.readouterr().out
    assert f"settled @candidate: #{first.seq} canary_rollback -> no alias never happened (marked failed)" in out, out
    assert aliases(client, name) == {"production": v1, "candidate": v2}
    assert status(name, client=client)["problems"] == []

    # Killed after the delete, before confirming it: the registry shows the rollback, so it is done.
    second = half_done_rollback()
    client.delete_registered_model_alias(name, "candidate")
    assert cli("repair", name) == 0
    assert f"#{second.seq} canary_rollback -> no alias done (the registry shows the move)" in capsys.readouterr().out
    states = {e.seq: e.state for e in L.Ledger(client).events(name)}
    assert (states[first.seq], states[second.seq]) == (L.FAILED, L.DONE)
    assert aliases(client, name) == {"production": v1} and status(name, client=client)["problems"] == []
    assert cli("repair", name) == 0 and "nothing to repair" in capsys.readouterr().out
