"""The guard for registry-UI promotions: a webhook receiver that holds alias moves to the policy.

MLflow (3.3+, ``mlflow server`` with a SQL backend) posts ``model_version_alias.created`` /
``.deleted`` events. The payload names neither the version the alias left nor who moved it, so
the guard treats each event as a hint and *reconciles*: under the model's lock it compares the
alias with what the ledger says it should be. Our own promote/rollback record their move in the
ledger before making it, so they reconcile to "nothing to do". Anything else is a move made
outside lifecycle (the UI, a raw API call): a version that passes the policy is recorded as
``ui_promote``; one that fails is moved back to the ledger's version (or the alias deleted if the
ledger has none) and recorded as ``guard_revert``. A deleted alias that the ledger says should
exist is restored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lifecycle.errors import ConfigError
from lifecycle.policies import Policy, blocking_failures, check_gates, load_policy
from lifecycle.registry import TARGETS, facts, ledger as L
from lifecycle.registry.client import actor, call, get_client, parallel
from lifecycle.registry.lock import RegistryLock, is_lock_model
from lifecycle.registry.promote import Outcome, lineage, move_alias, read_snapshot
from lifecycle.registry.settle import settle

log = logging.getLogger(__name__)

EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
#: Deliveries older than this are refused (replay protection; MLflow stamps each delivery).
MAX_SKEW_S = 300


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """MLflow's webhook signature: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify_signature(secret: str, delivery_id: str, timestamp: str, body: bytes, header: str,
                     *, now: float | None = None) -> str | None:
    """None when the delivery is authentic and fresh, else why it is not."""
    if not (delivery_id and timestamp and header):
        return "missing X-MLflow-Delivery-Id / X-MLflow-Timestamp / X-MLflow-Signature"
    try:
        age = abs((now if now is not None else time.time()) - int(timestamp))
    except ValueError:
        return "bad timestamp"
    if age > MAX_SKEW_S:
        return f"timestamp {age:.0f} s away from now (replay?)"
    expected = sign(secret, delivery_id, timestamp, body.decode("utf-8", errors="replace"))
    if not hmac.compare_digest(expected.encode(), header.strip().encode()):
        return "signature mismatch"
    return None


def reconcile(client: Any, policy: Policy, name: str, alias: str, *, by: str = "guard") -> Outcome | None:
    """Bring alias ``alias`` of ``name`` back in line with the ledger and the policy.

    Under the model's lock, half-done moves (a promote or rollback killed before it confirmed its
    move) are first settled from what the registry shows (:func:`lifecycle.registry.settle.settle`);
    then an alias that still disagrees with the ledger is held to the policy. ``by`` names who
    acts in the events' actor (``guard`` or ``repair``). Returns the recorded outcome, or None
    when the alias already agreed with the ledger and nothing was pending.
    """
    if alias not in TARGETS or is_lock_model(name):
        return None
    led = L.Ledger(client)
    with RegistryLock(client, name, purpose=f"{by} {alias}") as lock:
        events, model = parallel(client, lambda: led.events(name), lambda: facts.get_model(client, name))
        settled = settle(client, led, lock, name, model, events, alias, by=by)
        stack = L.holder_stack(events, alias)
        truth = stack[-1] if stack else None
        current = facts.alias_version(model, alias)
        if current == truth:
            return Outcome(event=settled, moved=False, message=settled.reason) if settled else None
        notes = f"{settled.reason}\n" if settled else ""
        seq = L.next_seq_of(events, led.damaged.get(name, []))
        base = dict(model=name, target=alias, seq=seq, actor=f"{by}:{actor()}", policy_path=policy.path,
                    policy_digest=policy.digest)
        if current is None:
            event = L.Event(action=L.GUARD_REVERT, from_version=None, to_version=truth, effective=True,
                            reason=f"@{alias} was deleted outside lifecycle; restored to v{truth} (use rollback)",
                            **base)
            move_alias(client, led, lock, event)
            return Outcome(event=event, moved=True, message=notes + event.reason)
        candidate = read_snapshot(client, led, name, current, policy, alias).candidate
        results = check_gates(policy.target(alias), candidate)
        failures = blocking_failures(results)
        runs, digests = lineage(dict(candidate.tags))
        gates = [r.to_dict() for r in results]
        if failures:
            why = "; ".join(f"{r.gate}: {r.reason}" for r in failures)
            event = L.Event(action=L.GUARD_REVERT, from_version=current, to_version=truth, effective=True,
                            gates=gates, eval_run_ids=runs, data_digests=digests,
                            reason=f"@{alias} moved to v{current} outside lifecycle and refused by the policy "
                                   f"({why}); reverted to {'v' + truth if truth else 'no alias'}", **base)
            move_alias(client, led, lock, event)
            return Outcome(event=event, gates=results, moved=True, message=notes + event.reason)
        event = L.Event(action=L.UI_PROMOTE, from_version=truth, to_version=current, effective=True, gates=gates,
                        eval_run_ids=runs, data_digests=digests,
                        reason=f"@{alias} moved to v{current} outside lifecycle; the policy passed: recorded", **base)
        lock.verify()
        # Mirror the stage before recording: whoever sees the ledger event (a person, a test, the
        # report) then also sees `models:/NAME/Production` agree with the alias.
        facts.mirror_stage(client, name, current, alias, truth)
        led.append(event)
        return Outcome(event=event, gates=results, moved=False, message=notes + event.reason)


class Guard:
    """The receiver: verifies deliveries and reconciles them one at a time on a worker thread."""

    def __init__(self, policy: Policy, secret: str, client: Any = None) -> None:
        if not secret:
            raise ConfigError("the guard needs a webhook secret: --secret or env LIFECYCLE_GUARD_SECRET")
        self.policy = policy
        self.secret = secret
        self.client = client or get_client()
        self.jobs: "queue.Queue[tuple[str, str] | None]" = queue.Queue()
        self.outcomes: list[Outcome] = []
        self.worker = threading.Thread(target=self._work, name="lifecycle-guard", daemon=True)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            name, alias = job
            try:
                outcome = reconcile(self.client, self.policy, name, alias)
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop the guard
                log.error("guard: reconciling %s@%s failed: %s", name, alias, exc)
                continue
            if outcome is not None:
                self.outcomes.append(outcome)
                log.warning("guard: %s (ledger event #%d)", outcome.message, outcome.event.seq)

    def handle(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        """Check one delivery; queue its reconciliation. Returns (HTTP status, JSON reply)."""
        problem = verify_signature(self.secret, headers.get("X-MLflow-Delivery-Id", ""),
                                   headers.get("X-MLflow-Timestamp", ""), body, headers.get("X-MLflow-Signature", ""))
        if problem:
            log.warning("guard: refused a delivery: %s", problem)
            return 401, {"error": problem}
        try:
            payload = json.loads(body)
            data = payload.get("data") or {}
            entity, name, alias = payload.get("entity"), data.get("name"), data.get("alias")
        except (ValueError, AttributeError):
            return 400, {"error": "body is not a webhook JSON payload"}
        if entity != "model_version_alias" or not name or not alias:
            return 200, {"status": "ignored"}
        if alias not in TARGETS:
            return 200, {"status": "ignored", "alias": alias}
        self.jobs.put((str(name), str(alias)))
        return 202, {"status": "queued", "name": name, "alias": alias}


def make_server(guard: Guard, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server that feeds ``guard``; POST any path for deliveries, GET /health."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path.rstrip("/") in ("", "/health"):
                self._reply(200, {"status": "ok", "policy": guard.policy.path, "digest": guard.policy.digest})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > 1_000_000:
                self._reply(413, {"error": "payload too large"})
                return
            body = self.rfile.read(length)
            code, reply = guard.handle(self.headers, body)
            self._reply(code, reply)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("guard http: " + fmt, *args)

    return ThreadingHTTPServer((host, port), Handler)


def serve(*, policy_path: str | None, host: str, port: int, secret: str | None) -> None:
    """Run the guard until interrupted."""
    policy = load_policy(policy_path)
    guard = Guard(policy, secret or "")
    guard.worker.start()
    server = make_server(guard, host, port)
    print(f"lifecycle guard listening on http://{host}:{server.server_address[1]}/webhook "
          f"(policy {policy.path}, digest {policy.digest})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        guard.jobs.put(None)


def install(url: str, *, secret: str | None, name: str = "lifecycle-guard", client: Any = None) -> Any:
    """Register the guard's webhook with the tracking server (update it if ``name`` exists)."""
    if not secret:
        raise ConfigError("the guard's webhook needs a secret: --secret or env LIFECYCLE_GUARD_SECRET")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be an http(s) URL, got {url!r}")
    client = client or get_client()
    existing = [h for h in call("list webhooks", client.list_webhooks, max_results=1000) if h.name == name]
    if existing:
        return call("update webhook", client.update_webhook, existing[0].webhook_id, url=url, events=list(EVENTS),
                    secret=secret, status="ACTIVE")
    return call("create webhook", client.create_webhook, name=name, url=url, events=list(EVENTS), secret=secret,
                description="lifecycle guard: holds registry-UI alias moves to the promotion policy")
