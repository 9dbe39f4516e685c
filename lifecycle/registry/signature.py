"""Is a webhook delivery authentic, fresh and new? MLflow's signature scheme and replay memory.

MLflow signs each delivery with the webhook's secret: ``X-MLflow-Signature: v1,<base64
HMAC-SHA256 of "{delivery_id}.{timestamp}.{body}">``, where the timestamp (``X-MLflow-Timestamp``)
is Unix seconds and the delivery id (``X-MLflow-Delivery-Id``) a fresh UUID. A delivery older (or
newer) than :data:`MAX_SKEW_S` is refused, and :class:`SeenDeliveries` remembers the ids accepted
within that window, so a captured delivery cannot be replayed while its timestamp still passes.
Pure logic: no MLflow, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import threading
import time

#: Deliveries whose timestamp is further than this from now are refused (replay protection).
MAX_SKEW_S = 300


def _mac(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(secret: str, delivery_id: str, timestamp: str, body: str | bytes) -> str:
    """MLflow's webhook signature: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` (a str body as UTF-8)."""
    return _mac(secret, delivery_id, timestamp, body if isinstance(body, bytes) else body.encode())


def verify_signature(secret: str, delivery_id: str, timestamp: str, body: bytes, header: str,
                     *, now: float | None = None) -> str | None:
    """None when the delivery is authentic and fresh, else why it is not (never the secret)."""
    if not (delivery_id and timestamp and header):
        return "missing X-MLflow-Delivery-Id / X-MLflow-Timestamp / X-MLflow-Signature"
    # Plain ASCII digits only: int() would also take "+1_700_000_000" or non-ASCII digits.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        return "bad timestamp"
    age = abs((now if now is not None else time.time()) - int(timestamp))
    if age > MAX_SKEW_S:
        return f"timestamp {age:.0f} s away from now (replay?)"
    # The MAC is over the body's bytes as sent (MLflow sends UTF-8 JSON): no decoding, so two
    # different bodies can never share a signature through a lenient decode.
    expected = _mac(secret, delivery_id, timestamp, body)
    if not hmac.compare_digest(expected.encode(), header.strip().encode("utf-8", errors="replace")):
        return "signature mismatch"
    return None


class SeenDeliveries:
    """The delivery ids accepted while their timestamp can still pass :func:`verify_signature`.

    Memory is bounded twice: an id is forgotten once its timestamp is older than
    :data:`MAX_SKEW_S` (the signature check refuses it from then on anyway), and at most
    ``capacity`` ids are held; when that many signed deliveries arrive within one window,
    :meth:`remember` says no rather than forget an id that could still be replayed.
    """

    def __init__(self, capacity: int = 20_000, window_s: float = MAX_SKEW_S) -> None:
        self.capacity = capacity
        self.window_s = window_s
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def _forget_expired(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            expiry, delivery_id = heapq.heappop(self._heap)
            if self._expiry.get(delivery_id) == expiry:
                del self._expiry[delivery_id]

    def seen(self, delivery_id: str, *, now: float | None = None) -> bool:
        """Whether ``delivery_id`` was accepted within the window."""
        with self._lock:
            self._forget_expired(time.time() if now is None else now)
            return delivery_id in self._expiry

    def full(self, *, now: float | None = None) -> bool:
        """Whether no further id can be remembered until older ones expire."""
        with self._lock:
            self._forget_expired(time.time() if now is None else now)
            return len(self._expiry) >= self.capacity

    def remember(self, delivery_id: str, timestamp: str, *, now: float | None = None) -> bool:
        """Remember an accepted delivery until its timestamp leaves the window; False when full."""
        with self._lock:
            self._forget_expired(time.time() if now is None else now)
            if delivery_id not in self._expiry and len(self._expiry) >= self.capacity:
                return False
            expiry = int(timestamp) + self.window_s
            self._expiry[delivery_id] = expiry
            heapq.heappush(self._heap, (expiry, delivery_id))
            return True

    def __len__(self) -> int:
        return len(self._expiry)
