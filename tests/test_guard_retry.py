"""A guard whose tracking server goes away: the reconcile of an acknowledged delivery is retried
until the server is back, and when the retry limit is reached a ``guard_failed`` event is
recorded (as soon as the server can take it) instead of the move being forgotten.

Real processes: the session's `mlflow server` delivers webhooks straight to a real
`lifecycle guard serve`, whose own tracking URI goes through a TCP forwarder that the test
switches off and on (the tracking server "down" is a refused connection, as it would be).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lifecycle.registry import ledger as L
from tests import servers
from tests.cli import cli
from tests.registry_support import make_version
from tests.test_guard import ROOT, ui_set_alias, wait_for
from tests.test_registry import aliases

pytestmark = pytest.mark.e2e
SECRET = "retry-test-secret-91c2"


class Forwarder:
    """Loopback TCP forwarding to ``upstream_port`` on a fixed port, switched with :meth:`up` / :meth:`down`."""

    def __init__(self, upstream_port: int) -> None:
        self.port = servers.free_port()
        self.upstream_port = upstream_port
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        if self._listener is not None:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._listener is not None:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._open:
                _close(sock)
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
            except OSError:
                return
            with self._lock:
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture(scope="module")
def flaky_guard(mlflow_server, tmp_path_factory):
    """(forwarder, guard log path): the guard reaches the tracking server only through the forwarder."""
    from mlflow.tracking import MlflowClient

    work = tmp_path_factory.mktemp("flaky-guard")
    forwarder = Forwarder(int(mlflow_server.url.rsplit(":", 1)[1]))
    port = servers.free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{forwarder.port}",
           "LIFECYCLE_GUARD_SECRET": SECRET, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "LIFECYCLE_LOCK_WAIT_S": "20"}
    log_path = work / "guard.log"
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the guard
    proc = subprocess.Popen([sys.executable, "-m", "lifecycle", "-v", "guard", "serve", "--port", str(port),
                             "--policy", str(ROOT / "registry_policies" / "default.yaml"), "--max-attempts", "4",
                             "--retry-delay", "0.5", "--retry-max-delay", "1.5"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    hook = f"flaky-guard-{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        try:
            servers.wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=proc)
            assert cli("guard", "install", "--url", f"http://127.0.0.1:{port}/webhook", "--secret", SECRET,
                       "--name", hook) == 0
            yield forwarder, log_path
        finally:
            client = MlflowClient(mlflow_server.url)
            for h in client.list_webhooks():
                if h.name == hook:
                    client.delete_webhook(h.webhook_id)
            forwarder.down()
            servers.stop_process(proc)
            log.close()


def _waited(log_path: Path, predicate, timeout: float, what: str):
    """:func:`wait_for`, with the guard's log in the failure message (the log says why it waited)."""
    try:
        return wait_for(predicate, timeout, what)
    except AssertionError as exc:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise AssertionError(f"{exc}; the guard's log ends with:\n{tail}") from None


def _log_count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text)


def _events(client, name: str, action: str) -> list[L.Event]:
    return [e for e in L.Ledger(client).events(name) if e.action == action]


@pytest.mark.tried("guard", "the tracking server unreachable when an acknowledged UI move is reconciled, back "
                   "seconds later (real mlflow server, connection refused through a forwarder)",
                   "the reconcile is retried with backoff and reverts the move once the server is back")
def test_failed_reconcile_is_retried_until_the_server_is_back(mlflow_server, flaky_guard, unique_name, monkeypatch):
    from mlflow.tracking import MlflowClient

    forwarder, log_path = flaky_guard
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient()
    v1 = make_version(client, unique_name)
    unapproved = make_version(client, unique_name, {"approved_by": ""})
    assert cli("promote", unique_name, v1, "--to", "production") == 0

    forwarder.down()
    retries = _log_count(log_path, "retrying in")
    ui_set_alias(mlflow_server.url, unique_name, "production", unapproved)
    _waited(log_path, lambda: _log_count(log_path, "retrying in") > retries, 30, "a failed reconcile and its retry")
    forwarder.up()
    _waited(log_path, lambda: _events(client, unique_name, L.GUARD_REVERT), 30, "the guard's revert after the retry")
    _waited(log_path, lambda: aliases(client, unique_name).get("production") == v1, 15, "production back on v1")
    assert not _events(client, unique_name, "guard_failed")
    assert SECRET not in log_path.read_text(errors="replace")


@pytest.mark.tried("guard", "the tracking server unreachable for longer than the guard's retry limit",
                   "a guard_failed ledger event is recorded as soon as the server is back (the move stands, "
                   "unchecked, and says so); the secret appears in no log line or event")
def test_retry_limit_records_guard_failed(mlflow_server, flaky_guard, unique_name, monkeypatch):
    from mlflow.tracking import MlflowClient

    forwarder, log_path = flaky_guard
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient()
    v1 = make_version(client, unique_name)
    unapproved = make_version(client, unique_name, {"approved_by": ""})
    forwarder.up()
    assert cli("promote", unique_name, v1, "--to", "production") == 0

    forwarder.down()
    missed = _log_count(log_path, "could not record guard_failed")
    ui_set_alias(mlflow_server.url, unique_name, "production", unapproved)
    # 4 attempts (0.5 + 1 + 1.5 s apart), then the record itself fails while the server is away.
    _waited(log_path, lambda: _log_count(log_path, "could not record guard_failed") > missed, 60, "the guard giving up")
    forwarder.up()
    failed = _waited(log_path, lambda: _events(client, unique_name, "guard_failed"), 30, "the guard_failed event")
    event = failed[0]
    assert event.target == "production" and event.actor.startswith("guard:") and not event.effective
    assert "could not check it" in event.reason and "4 attempts" in event.reason
    assert aliases(client, unique_name)["production"] == unapproved  # the move stands, recorded as unchecked
    assert [e.action for e in L.Ledger(client).events(unique_name)] == ["promote", "guard_failed"]
    _waited(log_path, lambda: "gave up on" in log_path.read_text(errors="replace"), 10, "the guard saying it gave up")
    assert SECRET not in log_path.read_text(errors="replace")
    assert all(SECRET not in e.to_json() for e in L.Ledger(client).events(unique_name))
