"""The registry lock when the server goes away mid-request: a lock this process made but could not
confirm (a create whose answer was lost) or could not release is broken by this process's next
acquire at once, instead of blocking it (a long-running guard, say) for a whole lease.

Real parts: the session's `mlflow server`, reached through a real HTTP proxy that the test turns
into a server that went away (connections closed without an answer).
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from lifecycle.errors import LifecycleError
from lifecycle.registry.lock import RegistryLock, lock_name

pytestmark = pytest.mark.e2e


class _Proxy(BaseHTTPRequestHandler):
    """Forwards to the upstream server; ``mode`` says what to break ("ok", "lose-create", "away")."""

    upstream: tuple[str, int]
    mode = "ok"

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if type(self).mode == "away":
            self.close_connection = True
            return  # the connection closes without an answer
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        if type(self).mode == "lose-create" and self.path.endswith("/registered-models/create"):
            type(self).mode = "away"  # the create happened; its answer, and the server, are gone
            self.close_connection = True
            return
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def proxied(mlflow_server, monkeypatch):
    """(a client through the proxy, a direct client, the proxy handler class)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    up = urlsplit(mlflow_server.url)
    handler = type("Proxy", (_Proxy,), {"upstream": (up.hostname, up.port), "mode": "ok"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield MlflowClient(tracking_uri=url, registry_uri=url), MlflowClient(mlflow_server.url), handler
    finally:
        server.shutdown()
        server.server_close()


def _lock_exists(client, name: str) -> bool:
    return lock_name(name) in {m.name for m in client.search_registered_models(max_results=1000)}


@pytest.mark.tried("registry lock", "the server goes away right after creating the lock, its answer lost "
                   "(real mlflow server behind a proxy that closes the connection)",
                   "the lock is left on the server; this process's next acquire breaks it at once, not "
                   "after the 60 s lease")
def test_a_create_whose_answer_was_lost_does_not_block_this_process(proxied, unique_name):
    client, direct, handler = proxied
    handler.mode = "lose-create"
    with pytest.raises(LifecycleError):
        RegistryLock(client, unique_name, lease_s=60, wait_s=5).acquire()
    assert _lock_exists(direct, unique_name)  # it reached the server

    handler.mode = "ok"
    started = time.monotonic()
    with RegistryLock(client, unique_name, lease_s=60, wait_s=5) as lock:
        assert lock.held
    assert time.monotonic() - started < 5
    assert not _lock_exists(direct, unique_name)


@pytest.mark.tried("registry lock", "the server goes away while the holder releases its lock",
                   "the release fails quietly; this process's next acquire breaks the lock at once")
def test_a_failed_release_does_not_block_this_process(proxied, unique_name):
    client, direct, handler = proxied
    lock = RegistryLock(client, unique_name, lease_s=60, wait_s=5).acquire()
    handler.mode = "away"
    lock.release()  # fails against the missing server, raises nothing
    assert _lock_exists(direct, unique_name)
    handler.mode = "ok"
    with RegistryLock(client, unique_name, lease_s=60, wait_s=5) as again:
        assert again.held
    assert not _lock_exists(direct, unique_name)
