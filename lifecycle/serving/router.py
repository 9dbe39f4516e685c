"""Canary and shadow routing: which arm answers a request, and the shadow copy's bounded queue.

Pure logic and plain threading (no MLflow, no torch), used by the routing pyfunc model
(:mod:`lifecycle.serving.router_model`):

* :func:`route_fraction` maps a routing key to a fixed point of [0, 1) (SHA-256, so every worker
  process and every restart agrees); a request goes to the canary when that point is below the
  share. Raising the share (0.1 -> 0.5 -> 1.0) therefore only adds keys to the canary: a key that
  reached the challenger keeps reaching it. Without a key the point is drawn at random.
* :func:`agreement` scores a shadow's answer against production's for the same prompts: exact
  match and token overlap (F1 of the whitespace tokens as multisets), the mean over rows.
* :class:`ShadowQueue` runs shadow copies on one background thread; when it is full a copy is
  dropped and counted, so the shadow never holds up a production answer.
* :class:`RoutingKeyHeader` reads the ``X-Routing-Key`` header into a context variable: MLflow's
  scoring server hands ``predict`` the body only, never the request's headers.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import queue
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

log = logging.getLogger(__name__)

#: The request param that carries a routing key (declared in the router's signature).
ROUTING_PARAM = "routing_key"
#: The HTTP header that carries a routing key (lower case, as ASGI spells headers).
ROUTING_HEADER = b"x-routing-key"
#: Roles recorded in inference records.
PRODUCTION, CANARY, SHADOW = "production", "canary", "shadow"
ROLES = (PRODUCTION, CANARY, SHADOW)
#: Registered-model tag holding the canary's current share: ``lifecycle serve --canary`` sets it,
#: ``lifecycle canary --act`` steps it, the router reads it (so the registry module shares this name).
SHARE_TAG = "lifecycle.canary.share"
#: Longest routing key accepted (a key is hashed, never stored; this only bounds the work).
MAX_KEY_CHARS = 256
#: A share as text: an unsigned ASCII decimal, optionally with an exponent (``0.1``, ``.5``, ``1e-3``).
_DECIMAL = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_PERCENT = re.compile(r"[0-9]+(?:\.[0-9]*)?%", re.ASCII)

#: The routing key of the request being served (set by :class:`RoutingKeyHeader`).
header_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("lifecycle_routing_key", default=None)


class RoutingKeyError(ValueError):
    """A routing key that is not a non-empty string of at most :data:`MAX_KEY_CHARS` characters."""


def check_share(share: Any, *, what: str = "--canary-share") -> float:
    """``share`` as a float strictly between 0 and 1, else ValueError (one line, naming ``what``).

    Text must be a plain decimal as written on a command line (``0.1``, ``.25``, ``1e-3``): no sign,
    no surrounding blanks, no ``%``, no ``nan``/``inf`` and no non-ASCII digits, so what the router
    uses is what the user wrote. A number (not a bool) is taken as it is.
    """
    if isinstance(share, str):
        value = float(share) if _DECIMAL.fullmatch(share) else None
    elif isinstance(share, (int, float)) and not isinstance(share, bool):
        value = float(share)
    else:
        value = None
    if value is None or not 0.0 < value < 1.0:
        hint = f" ({share.strip()} is {float(share.strip()[:-1]) / 100:g})" if (
            isinstance(share, str) and _PERCENT.fullmatch(share.strip())) else ""
        raise ValueError(f"{what} must be a number between 0 and 1 (exclusive), written like 0.1; "
                         f"got {share!r}{hint}")
    return value


def tag_share(raw: str | None) -> float | None:
    """The share a :data:`SHARE_TAG` value holds (0..1, as we write it), or None when absent or not a share.

    The tag can be edited by hand in the registry UI: ``nan``, ``5`` or ``50%`` are no share, and
    every reader (the router, ``lifecycle canary --act``) treats them alike, as no tag.
    """
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if 0.0 <= value <= 1.0 else None


def check_key(key: Any, *, what: str = ROUTING_PARAM) -> str | None:
    """The routing key as given (None when absent or empty), or RoutingKeyError (naming ``what``) for a bad one."""
    if key is None or (isinstance(key, float) and key != key):  # MLflow fills absent params with None
        return None
    if not isinstance(key, str):
        raise RoutingKeyError(f"{what} must be a string, got {type(key).__name__}")
    if len(key) > MAX_KEY_CHARS:
        raise RoutingKeyError(f"{what} may have at most {MAX_KEY_CHARS} characters, got {len(key)}")
    return key or None


def request_key(param: Any, header: str | None) -> str | None:
    """A request's routing key: the ``routing_key`` param when given (non-empty), else the header's.

    None (a random split) when neither carries one; RoutingKeyError, naming the one at fault, for
    a key that is not a string or is longer than :data:`MAX_KEY_CHARS` (HTTP 400, never a 500).
    """
    return check_key(param) or check_key(header, what="X-Routing-Key header")


def header_text(raw: bytes) -> str:
    """The text of a raw header value: UTF-8 when it is, else Latin-1 (what HTTP clients send for str).

    Both decodings are exact (no replacement character), so distinct keys stay distinct and a
    key sent as a UTF-8 header meets the same key sent as a param.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def route_fraction(key: str) -> float:
    """A fixed point of [0, 1) for ``key``: the first 8 bytes of its SHA-256 over 2**64."""
    digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def to_canary(share: float, key: str | None, rng: random.Random | None = None) -> bool:
    """Whether a request goes to the canary at ``share``: sticky by ``key``, random without one."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    point = route_fraction(key) if key is not None else (rng or random).random()
    return point < share


def token_overlap(a: str, b: str) -> float:
    """F1 of the whitespace tokens of ``a`` and ``b`` as multisets: 1 for the same tokens, 0 for none shared.

    Two empty answers agree (1.0); an empty and a non-empty one do not (0.0).
    """
    ta, tb = Counter(a.split()), Counter(b.split())
    if not ta and not tb:
        return 1.0
    common = sum((ta & tb).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(tb.values()), common / sum(ta.values())
    return 2 * precision * recall / (precision + recall)


def agreement(production: Sequence[str], shadow: Sequence[str]) -> dict[str, float]:
    """Mean exact match and token overlap of ``shadow``'s rows against ``production``'s, and the row count."""
    pairs = list(zip(production, shadow))
    if not pairs:
        return {"exact_match": 0.0, "token_overlap": 0.0, "rows": 0}
    exact = sum(a == b for a, b in pairs) / len(pairs)
    overlap = sum(token_overlap(a, b) for a, b in pairs) / len(pairs)
    return {"exact_match": exact, "token_overlap": overlap, "rows": len(pairs)}


@dataclass
class ShadowStats:
    """Counters of the shadow queue (read without the lock: approximate is fine)."""

    offered: int = 0
    dropped: int = 0
    done: int = 0
    failed: int = 0


class ShadowQueue:
    """Run shadow copies on one background thread; drop (and count) a copy when ``size`` are waiting.

    The thread starts with the first copy, in the process that serves (a server worker forked
    after the model loaded would not inherit a thread started earlier), and is a daemon: a
    shadow copy never keeps a stopping server alive.
    """

    def __init__(self, work: Callable[[Any], None], *, size: int = 8,
                 on_drop: Callable[[Any], None] | None = None):
        if size < 1:
            raise ValueError(f"shadow queue size must be >= 1, got {size}")
        self._work = work
        self._on_drop = on_drop
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.stats = ShadowStats()

    def offer(self, item: Any) -> bool:
        """Queue ``item`` for the shadow without waiting; False (dropped, counted) when the queue is full."""
        self._start()
        self.stats.offered += 1
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.stats.dropped += 1
            if self._on_drop is not None:
                try:
                    self._on_drop(item)
                except Exception as exc:  # noqa: BLE001 - counting a drop must never fail a request
                    log.warning("could not record a dropped shadow copy: %s", exc)
            return False

    def join(self, timeout: float = 30.0) -> bool:
        """Wait until every queued copy ran (tests, benchmarks); False on timeout."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def _start(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="lifecycle-shadow", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._work(item)
                self.stats.done += 1
            except Exception as exc:  # noqa: BLE001 - a failing shadow is recorded, never fatal
                self.stats.failed += 1
                log.debug("shadow copy failed: %s", exc)
            finally:
                self._queue.task_done()


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RoutingKeyHeader:
    """ASGI middleware: the ``X-Routing-Key`` header of each request into :data:`header_key`.

    The context variable travels with the request into ``predict``: Starlette's tasks and
    ``asyncio.to_thread`` both run their work in a copy of the caller's context.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(ROUTING_HEADER)
        token = header_key.set(header_text(raw) if raw else None)
        try:
            await self.app(scope, receive, send)
        finally:
            header_key.reset(token)
