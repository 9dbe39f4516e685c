"""The team setup of the README, end to end: one shared `mlflow server` on PostgreSQL with an
artifact root and basic-auth, the guard's webhook registered, the whole pipeline run against it
by a user with credentials, and a registry-UI alias move by a colleague that the guard reverts.

Every step is the command the README gives, run as its own process.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import servers

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
SECRET = "team-guard-secret"
#: The pipeline as small as it gets (the tiny preset, a few steps): the point is the wiring.
FAST = ["--preset", "tiny", "--max-steps", "6", "--set", "prepare.source.max_documents=120",
        "--set", "prepare.tokenizer.vocab_size=512", "--set", "prepare.pack.block_size=64",
        "--set", "train.eval_every=3", "--set", "train.batch_size=8", "--set", "train.progress=false",
        "--set", "evaluate.generation.num_prompts=2", "--set", "evaluate.generation.max_new_tokens=4",
        "--set", "evaluate.latency.requests=2"]


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """`mlflow server` on a fresh PostgreSQL database, an artifact root, and basic-auth."""
    servers.require_postgres()
    import flask_wtf  # noqa: F401 - basic-auth needs it; the test extra installs it, so never skip
    uri = servers.create_postgres_database()
    work = tmp_path_factory.mktemp("team-server")
    server = servers.start_mlflow_server(uri, work, app_name="basic-auth", extra_env=servers.basic_auth_env(work))
    yield server
    server.stop()
    servers.drop_postgres_database(uri)


def _api(url: str, path: str, body: dict, user: tuple[str, str], method: str = "POST") -> dict:
    """One authenticated JSON request, as a browser session or a script would make it."""
    token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"{}")


def _lifecycle(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "lifecycle", *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, (f"lifecycle {' '.join(args)} exited {res.returncode}:\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_team_setup_pipeline_guard_and_ui_move(team_server, tmp_path, unique_name, monkeypatch):
    url = team_server.url
    # The user's shell: the shared server, credentials, the guard's secret. Run from a folder
    # outside the checkout, as a team member would (the default policy comes from the package).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "_MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=servers.ADMIN[0],
               MLFLOW_TRACKING_PASSWORD=servers.ADMIN[1], LIFECYCLE_GUARD_SECRET=SECRET)
    home = tmp_path / "home"
    home.mkdir()

    guard, guard_url = servers.start_guard(url, tmp_path / "guard", SECRET, env=env)
    hook = f"team-guard-{unique_name}"
    try:
        _lifecycle(["guard", "install", "--url", f"{guard_url}/webhook", "--name", hook], env, home)
        out = _lifecycle(["pipeline", "--model-name", unique_name, "--workdir", str(tmp_path / "work"), *FAST],
                         env, home).stdout
        assert f"Registered: models:/{unique_name}/1" in out, out
        assert "promote_staging: promoted" in out and "promote_production: refused" in out, out
        assert not (home / "mlruns").exists() and not (home / "mlflow.db").exists()

        from mlflow.tracking import MlflowClient

        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(key, env[key])
        client = MlflowClient(url)
        assert str(client.get_model_version_by_alias(unique_name, "staging").version) == "1"
        history = json.loads(_lifecycle(["history", unique_name, "--json"], env, home).stdout)
        assert [(e["action"], e["target"]) for e in history] == [("promote", "staging"), ("reject", "production")]
        assert all(e["actor"] == servers.ADMIN[0] for e in history)
        failed = {g["gate"] for g in history[1]["gates"] if g["status"] == "fail" and g["mode"] == "enabled"}
        assert failed == {"required_tags"}

        # A colleague with edit rights on the model moves @production in the registry UI
        # (the UI's own endpoint) to the version the policy refused; the guard moves it back.
        alice = ("alice", "alice-pass-1234")
        _api(url, "/api/2.0/mlflow/users/create", {"username": alice[0], "password": alice[1]}, servers.ADMIN)
        _api(url, "/api/3.0/mlflow/users/permissions/grant",
             {"username": alice[0], "resource_type": "registered_model", "resource_id": unique_name,
              "permission": "EDIT"}, servers.ADMIN)
        _api(url, "/ajax-api/2.0/mlflow/registered-models/alias",
             {"name": unique_name, "alias": "production", "version": "1"}, alice)

        def reverted():
            events = json.loads(_lifecycle(["history", unique_name, "--json"], env, home, timeout=120).stdout)
            return [e for e in events if e["action"] == "guard_revert"] and events

        events = _wait_for(reverted, 90, "the guard's revert")
        revert = [e for e in events if e["action"] == "guard_revert"][0]
        assert revert["from_version"] == "1" and revert["to_version"] is None and "approved_by" in revert["reason"]
        assert revert["actor"].startswith("guard:")
        _wait_for(lambda: "production" not in (client.get_registered_model(unique_name).aliases or {}), 30,
                  "@production removed")
        assert str(client.get_model_version_by_alias(unique_name, "staging").version) == "1"
        status = json.loads(_lifecycle(["status", unique_name, "--json"], env, home).stdout)
        assert status["consistent"] and status["aliases"] == {"staging": "1"}
        assert "refused a delivery" not in (tmp_path / "guard" / "guard.log").read_text(errors="replace")
    finally:
        servers.stop_process(guard)
