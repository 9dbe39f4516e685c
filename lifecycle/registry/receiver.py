"""The guard's receiving end: which deliveries to trust, a bounded job queue, and a worker that
reconciles (:func:`lifecycle.registry.guard.reconcile`) with retries.

A delivery is answered as soon as it is checked and queued; the reconcile runs later on one
worker thread. So that an acknowledged delivery is never silently dropped, a reconcile that
fails (the tracking server briefly down, the model's lock held) is retried with exponential
backoff; when :attr:`GuardSettings.max_attempts` is reached the guard records a ``guard_failed``
ledger event (``lifecycle status`` shows it) and logs an error. The queue is bounded: a full queue
answers 503, which MLflow's delivery treats as a failure (and retries with the same delivery id).
The HTTP server around this is :mod:`lifecycle.registry.guard_http`.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lifecycle.errors import ConfigError, LifecycleError
from lifecycle.policies import Policy
from lifecycle.registry import TARGETS
from lifecycle.registry import ledger as L
from lifecycle.registry.client import actor, call, get_client
from lifecycle.registry.guard import reconcile
from lifecycle.registry.lock import RegistryLock, is_lock_model
from lifecycle.registry.promote import Outcome
from lifecycle.registry.signature import SeenDeliveries, verify_signature

log = logging.getLogger("lifecycle.registry.guard")

EVENTS = ("model_version_alias.created", "model_version_alias.deleted")


@dataclass(frozen=True)
class GuardSettings:
    """Limits of the guard's receiver and worker (``lifecycle guard serve`` flags)."""

    queue_size: int = 256            # distinct (model, alias) reconciles waiting; more -> 503
    max_attempts: int = 8            # reconcile tries before recording guard_failed
    retry_delay_s: float = 1.0       # first retry delay; doubles per attempt ...
    retry_max_delay_s: float = 60.0  # ... up to this (also the pace of re-trying the guard_failed record)
    max_body_bytes: int = 1_000_000  # larger deliveries get 413 without being read
    read_timeout_s: float = 10.0     # a request's headers, and then its body, must arrive within this
    keep_alive_s: float = 5.0        # idle keep-alive connections are closed after this
    max_connections: int = 64        # open connections; more get 503
    max_header_bytes: int = 16_384   # request line + headers; more get 400
    replay_capacity: int = 20_000    # delivery ids remembered within the signature window (~4 MiB)

    def __post_init__(self) -> None:
        for name in ("queue_size", "max_attempts", "max_body_bytes", "max_connections", "max_header_bytes",
                     "replay_capacity"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"guard setting {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("retry_delay_s", "retry_max_delay_s", "read_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 86_400:
                raise ConfigError(f"guard setting {name} must be a number of seconds in (0, 86400), got {value!r}")
        if self.retry_max_delay_s < self.retry_delay_s:
            raise ConfigError("guard setting retry_max_delay_s must be at least retry_delay_s")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.retry_delay_s * 2 ** min(attempt - 1, 40), self.retry_max_delay_s)


@dataclass
class Job:
    """One reconcile of ``alias`` of ``name`` (or, once given up, the record of that failure)."""

    name: str
    alias: str
    attempt: int = 1
    first_try: float = 0.0
    error: str = ""
    give_up: bool = False   # record guard_failed instead of reconciling


class Jobs:
    """A bounded queue of due-timed jobs for one worker.

    A (model, alias) already waiting is not queued twice: its reconcile reads the registry when
    it runs, so it covers every move made before then. Retries wait in the same queue, so other
    models' deliveries are reconciled meanwhile.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._heap: list[tuple[float, int, Job]] = []
        self._waiting: collections.Counter[tuple[str, str]] = collections.Counter()
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False

    def offer(self, name: str, alias: str) -> str:
        """Queue a fresh reconcile: ``"queued"``, ``"pending"`` (one is waiting) or ``"full"``."""
        with self._cond:
            if self._waiting[(name, alias)] > 0:
                return "pending"
            if self._closed or len(self._heap) >= self.size:
                return "full"
            self._push(Job(name, alias, first_try=time.time()), 0.0)
            return "queued"

    def later(self, job: Job, delay: float) -> None:
        """Put ``job`` back to run after ``delay`` seconds (retries are never refused)."""
        with self._cond:
            self._push(job, delay)

    def _push(self, job: Job, delay: float) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), job))
        if not job.give_up:
            self._waiting[(job.name, job.alias)] += 1
        self._cond.notify()

    def take(self, timeout: float | None = None) -> Job | None:
        """The next due job; None once closed (or when ``timeout`` passes with nothing due)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    job = heapq.heappop(self._heap)[2]
                    if not job.give_up:
                        self._waiting[(job.name, job.alias)] -= 1
                    return job
                wait = (self._heap[0][0] - now) if self._heap else None
                if deadline is not None:
                    if now >= deadline:
                        return None
                    wait = min(wait, deadline - now) if wait is not None else deadline - now
                self._cond.wait(wait)
            return None

    def close(self) -> int:
        """Stop handing out jobs; the number of jobs left undone."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            return len(self._heap)

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)


def redact(text: str, secret: str) -> str:
    """``text`` with every occurrence of ``secret`` masked (for logs, errors and the ledger)."""
    return text.replace(secret, "***") if secret else text


class Guard:
    """Checks deliveries (:meth:`handle`) and reconciles them one at a time on a worker thread."""

    def __init__(self, policy: Policy, secret: str, client: Any = None,
                 settings: GuardSettings | None = None) -> None:
        if not secret:
            raise ConfigError("the guard needs a webhook secret: --secret or env LIFECYCLE_GUARD_SECRET")
        self.policy = policy
        self.secret = secret
        self.settings = settings or GuardSettings()
        self.client = client or get_client()
        self.jobs = Jobs(self.settings.queue_size)
        self.seen = SeenDeliveries(self.settings.replay_capacity)
        self.outcomes: collections.deque[Outcome] = collections.deque(maxlen=100)
        self._accept = threading.Lock()
        #: (model, alias) whose guard_failed record is waiting to be written: one record, not one per job.
        self._failing: set[tuple[str, str]] = set()
        self.worker = threading.Thread(target=self._work, name="lifecycle-guard", daemon=True)

    # -- deliveries --------------------------------------------------------------------------
    def handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """Check one delivery; queue its reconcile. Returns (HTTP status, JSON reply)."""
        delivery_id = headers.get("X-MLflow-Delivery-Id", "")
        timestamp = headers.get("X-MLflow-Timestamp", "")
        problem = verify_signature(self.secret, delivery_id, timestamp, body, headers.get("X-MLflow-Signature", ""))
        if problem:
            log.warning("guard: refused a delivery: %s", problem)
            return 401, {"error": problem}
        with self._accept:  # seen-check and remember as one step: two copies at once cannot both pass
            if self.seen.seen(delivery_id):
                log.warning("guard: refused a replayed delivery (id %r already received)", delivery_id[:100])
                return 409, {"error": f"delivery {delivery_id[:100]!r} was already received; replay refused"}
            code, reply = self._route(body)
            # Remember only what was accepted: MLflow retries a 503 with the same delivery id.
            if code < 300 and not self.seen.remember(delivery_id, timestamp):
                return 503, {"error": "too many deliveries within the signature window; try again later"}
            if code == 503:
                log.error("guard: job queue full (%d waiting): delivery refused with 503", len(self.jobs))
            return code, reply

    def _route(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            payload = json.loads(body)
            data = payload.get("data") or {}
            entity, name, alias = payload.get("entity"), data.get("name"), data.get("alias")
        except (ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested too deep
            return 400, {"error": "body is not a webhook JSON payload"}
        if entity != "model_version_alias" or not isinstance(name, str) or not isinstance(alias, str) \
                or not name or not alias:
            return 200, {"status": "ignored"}
        if alias not in TARGETS or is_lock_model(name):
            return 200, {"status": "ignored", "alias": alias}
        if not self.alive():
            return 503, {"error": "the guard's worker has stopped; restart the guard"}
        if self.seen.full():
            return 503, {"error": "too many deliveries within the signature window; try again later"}
        state = self.jobs.offer(name, alias)
        if state == "full":
            return 503, {"error": "the guard's job queue is full; try again later"}
        return 202, {"status": state, "name": name, "alias": alias}

    # -- the worker --------------------------------------------------------------------------
    def start(self) -> None:
        """Start reconciling queued deliveries."""
        self.worker.start()

    def stop(self, timeout: float = 5.0) -> int:
        """Stop the worker; returns how many jobs were left undone (logged as an error)."""
        left = self.jobs.close()
        if self.worker.is_alive():
            self.worker.join(timeout)
        if left:
            log.error("guard: stopped with %d reconcile(s) not done; check `lifecycle status` of the models "
                      "moved in the last minutes", left)
        return left

    def alive(self) -> bool:
        """False once a started worker has died (the guard then acknowledges nothing it would act on)."""
        return self.worker.ident is None or self.worker.is_alive()

    def _work(self) -> None:
        while (job := self.jobs.take()) is not None:
            try:
                if job.give_up:
                    self._record_failure(job)
                else:
                    self._reconcile(job)
            except Exception:  # noqa: BLE001 - a bug in one job must not stop the guard
                log.exception("guard: unexpected error on %s@%s", job.name, job.alias)

    def _reconcile(self, job: Job) -> None:
        try:
            outcome = reconcile(self.client, self.policy, job.name, job.alias)
        except Exception as exc:  # noqa: BLE001 - retried, then recorded: the guard never stops
            job.error = redact(_one_line(exc), self.secret)
            if job.attempt >= self.settings.max_attempts:
                log.error("guard: reconciling %s@%s failed %d times (%s); recording guard_failed",
                          job.name, job.alias, job.attempt, job.error)
                if (job.name, job.alias) not in self._failing:
                    job.give_up = True
                    self._failing.add((job.name, job.alias))
                    self._record_failure(job)
                return
            delay = self.settings.delay(job.attempt)
            log.warning("guard: reconciling %s@%s failed (attempt %d of %d: %s); retrying in %.1f s",
                        job.name, job.alias, job.attempt, self.settings.max_attempts, job.error, delay)
            job.attempt += 1
            self.jobs.later(job, delay)
            return
        if outcome is not None:
            self.outcomes.append(outcome)
            log.warning("guard: %s (ledger event #%d)", outcome.message, outcome.event.seq)

    def _record_failure(self, job: Job) -> None:
        """Write the ``guard_failed`` event; if the server is still unreachable, try again later."""
        waited = time.time() - job.first_try
        reason = (f"@{job.alias} may have been moved outside lifecycle, but the guard could not check it: "
                  f"{job.attempt} attempts over {waited:.0f} s failed (last: {job.error[:300]}). The move stands "
                  f"unchecked: see `lifecycle status {job.name}`, then promote or roll back")
        led = L.Ledger(self.client)
        try:
            with RegistryLock(self.client, job.name, purpose=f"guard {job.alias} failed") as lock:
                seq = led.next_seq(job.name)
                event = L.Event(model=job.name, action=L.GUARD_FAILED, target=job.alias, seq=seq,
                                actor=f"guard:{actor()}", reason=redact(reason, self.secret),
                                policy_path=self.policy.path, policy_digest=self.policy.digest)
                lock.verify()
                led.append(event)
        except Exception as exc:  # noqa: BLE001 - the record must not be lost: keep trying
            delay = self.settings.retry_max_delay_s
            log.error("guard: could not record guard_failed for %s@%s (%s); trying again in %.0f s",
                      job.name, job.alias, redact(_one_line(exc), self.secret), delay)
            self.jobs.later(job, delay)
            return
        self._failing.discard((job.name, job.alias))
        log.error("guard: gave up on %s@%s: recorded guard_failed (ledger event #%d)", job.name, job.alias, seq)


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, LifecycleError) else text


def install(url: str, *, secret: str | None, name: str = "lifecycle-guard", client: Any = None) -> Any:
    """Register the guard's webhook with the tracking server (update it if ``name`` exists)."""
    if not secret:
        raise ConfigError("the guard's webhook needs a secret: --secret or env LIFECYCLE_GUARD_SECRET")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be an http(s) URL, got {redact(url, secret)!r}")
    client = client or get_client()
    try:
        existing = [h for h in call("list webhooks", client.list_webhooks, max_results=1000) if h.name == name]
        if existing:
            return call("update webhook", client.update_webhook, existing[0].webhook_id, url=url,
                        events=list(EVENTS), secret=secret, status="ACTIVE")
        return call("create webhook", client.create_webhook, name=name, url=url, events=list(EVENTS),
                    secret=secret, description="lifecycle guard: holds registry-UI alias moves to the promotion policy")
    except LifecycleError as exc:
        # A server may echo the request it refused; the secret must not reach the terminal.
        if secret in str(exc):
            raise type(exc)(redact(str(exc), secret)) from None
        raise
