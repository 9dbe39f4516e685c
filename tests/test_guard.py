"""The UI guard end to end: a real `mlflow server`, the guard as a real process, an alias moved
through the REST endpoint the registry UI uses, and the guard reverting it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lifecycle.registry import ledger as L
from lifecycle.registry.guard import sign
from tests import servers
from tests.registry_support import make_version
from tests.test_registry import aliases, cli

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
SECRET = "guard-test-secret"


def ui_set_alias(url: str, name: str, alias: str, version: str) -> None:
    """Set an alias exactly as the registry UI does."""
    req = urllib.request.Request(f"{url}/ajax-api/2.0/mlflow/registered-models/alias", method="POST",
                                 data=json.dumps({"name": name, "alias": alias, "version": version}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def guard(mlflow_server, monkeypatch, tmp_path):
    """The guard serving on a free loopback port, its webhook installed on the server."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    port = servers.free_port()
    env = {**os.environ, "LIFECYCLE_GUARD_SECRET": SECRET}
    log = open(tmp_path / "guard.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "lifecycle", "-v", "guard", "serve", "--port", str(port),
                             "--policy", str(ROOT / "registry_policies" / "default.yaml")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    hook_name = f"guard-{port}"
    try:
        servers.wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=proc)
        assert cli("guard", "install", "--url", f"http://127.0.0.1:{port}/webhook", "--secret", SECRET,
                   "--name", hook_name) == 0
        yield f"http://127.0.0.1:{port}", tmp_path / "guard.log"
    finally:
        client = MlflowClient()
        for hook in client.list_webhooks():
            if hook.name == hook_name:
                client.delete_webhook(hook.webhook_id)
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_guard_reverts_unchecked_ui_promotion(mlflow_server, guard, unique_name):
    from mlflow.tracking import MlflowClient

    guard_url, log_path = guard
    client = MlflowClient()
    name = unique_name
    v1 = make_version(client, name)
    unapproved = make_version(client, name, {"approved_by": ""})
    good = make_version(client, name, {"eval/loss": "2.9"})
    assert cli("promote", name, v1, "--to", "production") == 0

    # A UI promotion of a version that fails the policy is moved back within seconds.
    ui_set_alias(mlflow_server.url, name, "production", unapproved)
    wait_for(lambda: [e for e in L.Ledger(client).events(name) if e.action == L.GUARD_REVERT], 30, "the guard's revert")
    wait_for(lambda: aliases(client, name).get("production") == v1, 15, "production back on v1")
    revert = [e for e in L.Ledger(client).events(name) if e.action == L.GUARD_REVERT][0]
    assert revert.from_version == unapproved and revert.to_version == v1 and "approved_by" in revert.reason

    # A UI promotion that passes is recorded as such and kept; the stage is mirrored.
    ui_set_alias(mlflow_server.url, name, "production", good)
    wait_for(lambda: [e for e in L.Ledger(client).events(name) if e.action == L.UI_PROMOTE], 30,
             "the UI promotion record")
    assert aliases(client, name)["production"] == good
    assert client.get_model_version(name, good).current_stage == "Production"

    # Our own promote/rollback are not second-guessed: their webhooks reconcile to nothing.
    assert cli("rollback", name, "--reason", "drill", "--expect-current", good) == 0
    time.sleep(3)
    actions = [e.action for e in L.Ledger(client).events(name)]
    assert actions == ["promote", "guard_revert", "ui_promote", "rollback"], actions
    assert aliases(client, name)["production"] == v1
    assert "refused a delivery" not in log_path.read_text(errors="replace")


def test_guard_refuses_unsigned_or_forged_deliveries(guard, unique_name):
    guard_url, _ = guard
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": unique_name, "alias": "production", "version": "1"}})
    ts = str(int(time.time()))
    for headers in ({}, {"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": ts,
                         "X-MLflow-Signature": sign("wrong-secret", "d", ts, body)}):
        req = urllib.request.Request(f"{guard_url}/webhook", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
    good = {"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": ts, "X-MLflow-Signature": sign(SECRET, "d", ts, body)}
    req = urllib.request.Request(f"{guard_url}/webhook", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json", **good})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202
