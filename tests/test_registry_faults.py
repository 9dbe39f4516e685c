"""Kill -9 at every write of a promote and a rollback against a real `mlflow server`, then repair.

Each kill point is its own process, forked after `import mlflow` (a real process, killed with
SIGKILL by the product's own test hook ``LIFECYCLE_FAULT_KILL_AT=N``, right before its N-th
write). After each kill: `lifecycle status` names the state, `lifecycle repair` restores agreement
and records its own event, and a later rollback never moves production to a version that never
held it.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

from lifecycle.registry import client as registry_client
from lifecycle.registry import ledger as L
from lifecycle.registry.status import status
from tests.cli import cli
from tests.registry_support import make_source
from tests.test_registry import aliases

pytestmark = pytest.mark.e2e


def _child(argv: list[str], kill_at: int, log_path: str) -> None:
    from mlflow.utils import request_utils

    # The parent's pooled HTTP connections must not be shared across processes.
    request_utils._cached_get_request_session.cache_clear()
    registry_client._WRITES = itertools.count(1)
    os.environ[registry_client.FAULT_ENV] = str(kill_at)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os._exit(cli(*argv))  # no atexit or finalisers of the parent's state in the forked child


def run_killed(argv: list[str], kill_at: int, workdir: Path) -> tuple[int, str]:
    """Run ``lifecycle ARGV`` in a forked process killed before its ``kill_at``-th write; (exit code, log).

    A process killed by the hook exits with -9 (SIGKILL); one with fewer writes finishes normally.
    """
    import multiprocessing as mp

    log = workdir / f"kill-{argv[0]}-{kill_at}.log"
    proc = mp.get_context("fork").Process(target=_child, args=(argv, kill_at, str(log)))
    proc.start()
    proc.join(120)
    assert proc.exitcode is not None, f"{argv} at write {kill_at} hung"
    return proc.exitcode, log.read_text(errors="replace")


def make_model(client, name: str, source: tuple[str, str], n: int) -> list[str]:
    from tests.registry_support import make_version

    return [make_version(client, name, {"eval/loss": f"{3.0 - i * 0.01:.2f}"}, source=source) for i in range(n)]


def check_after_kill(client, name: str, held: set[str | None], capsys) -> bool:
    """Status names the state; repair restores agreement (its own event); rollback stays on held versions."""
    info = status(name, client=client)
    pending = [e for e in L.Ledger(client).events(name) if e.state == L.PENDING]
    if pending:
        assert any(p.startswith("HALF-DONE") for p in info["problems"]), info["problems"]
        capsys.readouterr()
        assert cli("status", name) == 0
        assert "HALF-DONE: event #" in capsys.readouterr().out
    before = len(L.Ledger(client).events(name))
    assert cli("repair", name) == 0, capsys.readouterr().err
    after = L.Ledger(client).events(name)
    if pending:
        assert len(after) > before and after[-1].action in (L.REPAIR, L.GUARD_REVERT, L.UI_PROMOTE), after[-1]
        assert any(e.action == L.REPAIR and e.actor.startswith("repair:") for e in after)
    info = status(name, client=client)
    assert info["problems"] == [] and not [e for e in after if e.state == L.PENDING], info["problems"]
    state = aliases(client, name)
    for target, stage in (("production", "Production"), ("staging", "Staging")):
        in_stage = [v.version for v in client.search_model_versions(f"name='{name}'") if v.current_stage == stage]
        if target in state and not (target == "staging" and state.get("production") == state[target]):
            assert [str(v) for v in in_stage] == [state[target]], (target, in_stage, state)
        elif target not in state and target == "production":
            assert in_stage == [], (target, in_stage, state)
    # A later rollback (retried by CI, say) never moves production to a version that never held it.
    code = cli("rollback", name, "--reason", "after the crash")
    assert code in (0, 5, 9), capsys.readouterr().err
    assert aliases(client, name).get("production") in held
    capsys.readouterr()
    return bool(pending)


@pytest.mark.tried("registry", "SIGKILL of `lifecycle promote` (to production over an earlier version, and a "
                   "first-ever promotion to staging) and of `lifecycle rollback` before each of their writes, "
                   "against a real mlflow server", "status shows the half-done event, repair settles it and records "
                   "its own event, registry and ledger agree, and no later rollback moves production to a version "
                   "that never held it")
def test_kill_at_every_write_then_repair(mlflow_server, monkeypatch, unique_name, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient()
    source = make_source(client, f"{unique_name}-runs")
    started = time.monotonic()
    points = {}
    half_done: dict[str, list[int]] = {}
    for scenario in ("promote", "first-staging", "rollback"):
        for n in range(1, 30):
            name = f"{unique_name}-{scenario}-{n}"
            if scenario == "promote":
                v1, v2 = make_model(client, name, source, 2)
                assert cli("promote", name, v1, "--to", "production") == 0
                argv = ["promote", name, v2, "--to", "production"]
            elif scenario == "first-staging":
                v1, v2 = make_model(client, name, source, 2)
                argv = ["promote", name, v2, "--to", "staging"]
            else:
                v1, v2 = make_model(client, name, source, 2)
                assert cli("promote", name, v1, "--to", "production") == 0
                assert cli("promote", name, v2, "--to", "production") == 0
                argv = ["rollback", name, "--reason", "drill", "--expect-current", v2]
            # Versions that really held production before the kill (set up above).
            held: set[str | None] = {v1, v2} if scenario == "rollback" else ({v1} if scenario == "promote" else {None})
            code, log = run_killed(argv, n, tmp_path)
            held.add(aliases(client, name).get("production"))
            if code == 0:
                points[scenario] = (n - 1, round(time.monotonic() - started, 1))
                # The whole command ran: nothing to repair, registry and ledger agree.
                assert status(name, client=client)["problems"] == []
                break
            assert code == -9 and f"killed before write {n}" in log, (code, log[-2000:])
            if check_after_kill(client, name, held, capsys):
                half_done.setdefault(scenario, []).append(n)
        else:
            raise AssertionError(f"{scenario} was still being killed after 29 writes")
    # Lock, mark, ledger event, alias, stage mirror, confirmation, finish, release at the least.
    assert all(n >= 7 for n, _ in points.values()), points
    # Kills between the ledger write and the confirmation left half-done events that repair settled.
    assert all(len(half_done.get(s, [])) >= 2 for s in points), half_done
    print(f"kill points per command (writes, s so far): {points}; half-done at {half_done}; "
          f"{time.monotonic() - started:.1f} s")
