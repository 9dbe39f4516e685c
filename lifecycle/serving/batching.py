"""Coalesce concurrent ``predict`` calls into shared ``generate`` calls (leader/follower).

``mlflow models serve`` runs each request's ``predict`` in its own thread and never batches
(mlflow#8007), so on its own a busy server decodes one request at a time. The
:class:`Coalescer` is the usual "continuous" scheme instead of a fixed batching window:

* a caller that finds the engine idle becomes the *leader*: it takes rows of the oldest queued
  request and of every queued request with the same batch key (compatible params), up to
  ``max_batch`` rows,
  and runs that batch at once in its own thread: a lone caller never waits;
* callers that arrive while a batch runs queue up (*followers*); when the batch ends, its callers
  get exactly their own rows back and one waiting follower leads the next batch, so under load
  batches grow by themselves to what arrived during the previous one;
* the only wait is optional and short: when callers are known to be on their way (they announced
  themselves with :meth:`Coalescer.expect` and are still parsing and tokenizing), a leader whose
  batch is not full waits up to ``wait_s`` for them to queue.

Batches are shared fairly: a batch takes rows round-robin, one from each waiting request with
the batch's key in turn, so a small request that arrives behind a huge one rides in the very next
batch instead of waiting for every row of the huge one; requests served by a batch then go to the
back of the queue, so a request with another key leads the batch after. Nobody starves.

Pure threading, no thread of its own (nothing to start after a fork, nothing that keeps a
briefly loaded model alive): the batch function is injected, so this is testable without
a model.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

#: run(key, items) -> one result per item, in order.
BatchFn = Callable[[Hashable, list[Any]], Sequence[Any]]


@dataclass(eq=False)
class _Request:
    """One caller's rows: taken into batches a few at a time, results put back by index."""

    key: Hashable
    items: list[Any]
    taken: int = 0  # rows handed to a batch so far (rows are taken in order)
    finished: int = 0  # rows whose batch has ended
    results: list[Any] = field(default_factory=list)
    batch_size: int = 0
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or self.finished == len(self.items)


@dataclass(eq=False)
class Arrival:
    """A caller on its way (see :meth:`Coalescer.expect`); counted until it queues or gives up."""

    counted: bool = True


@dataclass
class BatchStats:
    """Counters for records and benchmarks (read without the lock: approximate is fine)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0


class Coalescer:
    """Run compatible concurrent requests as one batch; see the module docstring."""

    def __init__(self, run: BatchFn, *, max_batch: int = 32, wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run = run
        self.max_batch = max_batch
        self.wait_s = max(0.0, wait_s)
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._busy = False  # a leader is running a batch
        self._arriving = 0  # callers announced by expect() that have not queued yet
        self._closed = False
        self.stats = BatchStats()

    @property
    def queued(self) -> int:
        """Requests with rows still waiting for a batch."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether a batch is running now."""
        return self._busy

    def expect(self) -> Arrival:
        """Announce a caller that will :meth:`submit` soon (after parsing its request).

        A leader that starts a batch while announced callers are still on their way waits up to
        ``wait_s`` for them. Pass the arrival to :meth:`submit`, or to :meth:`forget` when the
        request is refused before it gets there (safe to call after submit too).
        """
        with self._cond:
            self._arriving += 1
        return Arrival()

    def forget(self, arrival: Arrival | None) -> None:
        """The announced caller will not submit after all (e.g. its request was refused)."""
        if arrival is None or not arrival.counted:
            return
        with self._cond:
            if arrival.counted:
                arrival.counted = False
                self._arriving -= 1
                self._cond.notify_all()

    def submit(self, key: Hashable, items: Sequence[Any], arrival: Arrival | None = None) -> tuple[list[Any], int]:
        """Run ``items`` (sharing ``key``) in batches with other callers; (results, largest batch size).

        A request's rows may land in several batches (shared round-robin with the other waiting
        requests); its results come back in its own order. The exception of a failed batch reaches
        every caller in it.
        """
        items = list(items)
        if not items:
            self.forget(arrival)
            return [], 0
        mine = _Request(key, items, results=[None] * len(items))
        with self._cond:
            if arrival is not None and arrival.counted:
                arrival.counted = False
                self._arriving -= 1
            if self._closed:
                self._cond.notify_all()
                raise RuntimeError("coalescer is closed")
            self._queue.append(mine)
            # Wake a leader that waits for announced callers (followers just go back to sleep).
            self._cond.notify_all()
        while True:
            with self._cond:
                while self._busy and not mine.done:
                    self._cond.wait()
                if mine.done:
                    break
                # The engine is idle and part of this request is still queued: lead a batch.
                self._busy = True
                batch = self._take_batch()
            self._lead(batch)
        if mine.error is not None:
            raise mine.error
        return mine.results, mine.batch_size

    def close(self) -> None:
        """Refuse new requests; those already queued still run (their callers lead them)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take_batch(self) -> list[tuple[_Request, int]]:
        """Under the lock: up to ``max_batch`` rows of the oldest request's key, round-robin."""
        first = self._queue[0]
        if self.wait_s > 0 and self._arriving > 0:
            deadline = time.monotonic() + self.wait_s
            while self._arriving > 0 and not self._closed:
                rows = sum(len(r.items) - r.taken for r in self._queue if r.key == first.key)
                remaining = deadline - time.monotonic()
                if rows >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(timeout=remaining)
        peers = [r for r in self._queue if r.key == first.key]
        batch: list[tuple[_Request, int]] = []
        # One row from each waiting request in turn: a huge request cannot hold a small one back.
        while len(batch) < self.max_batch:
            before = len(batch)
            for r in peers:
                if r.taken < len(r.items) and len(batch) < self.max_batch:
                    batch.append((r, r.taken))
                    r.taken += 1
            if len(batch) == before:
                break
        # Served requests go to the back: the next batch starts with whoever waited longest.
        for r in peers:
            self._queue.remove(r)
            if r.taken < len(r.items):
                self._queue.append(r)
        return batch

    def _lead(self, batch: list[tuple[_Request, int]]) -> None:
        """Run one batch outside the lock, hand every caller its rows, pass the lead on."""
        items = [r.items[i] for r, i in batch]
        error: BaseException | None = None
        results: list[Any] = []
        try:
            results = list(self._run(batch[0][0].key, items))
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except BaseException as exc:  # noqa: BLE001 - every caller in the batch must learn of the failure
            error = exc
        with self._cond:
            for (r, i), result in zip(batch, results if error is None else [None] * len(batch)):
                r.batch_size = max(r.batch_size, len(items))
                if error is None:
                    r.results[i] = result
                    r.finished += 1
                elif r.error is None:
                    r.error = error
                    if r in self._queue:  # its other rows must not run for a caller that failed
                        self._queue.remove(r)
            if error is None:
                self.stats.batches += 1
                self.stats.rows += len(items)
                self.stats.largest = max(self.stats.largest, len(items))
            self._busy = False
            # Callers of this batch return; one still queued becomes the next leader.
            self._cond.notify_all()
