"""Coalesce concurrent ``predict`` calls into shared ``generate`` calls.

``mlflow models serve`` runs each request's ``predict`` in its own thread and never batches
(mlflow#8007), so on its own a busy server decodes one request at a time. The
:class:`Coalescer` queues each caller's rows; one worker thread takes the oldest waiting request,
waits up to ``wait_s`` for others with the same batch key (compatible params) to arrive, runs one
batch of at most ``max_batch`` rows, and hands each caller exactly its own rows back. Requests
with other keys wait for a later batch, oldest first, so nobody starves. Requests that arrive
while a batch runs join the next one without any extra wait.

Pure threading: the batch function is injected, so this is testable without a model.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

#: run(key, items) -> one result per item, in order.
BatchFn = Callable[[Hashable, list[Any]], Sequence[Any]]


@dataclass
class _Pending:
    key: Hashable
    items: list[Any]
    arrived: float
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters for records and benchmarks (read without the lock: approximate is fine)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0


class Coalescer:
    """Run compatible concurrent requests as one batch; see the module docstring."""

    def __init__(self, run: BatchFn, *, max_batch: int = 32, wait_s: float = 0.005, idle_s: float = 30.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run = run
        self.max_batch = max_batch
        self.wait_s = max(0.0, wait_s)
        # An idle worker exits (a later submit starts another): a model loaded only briefly, such
        # as MLflow's input-example check inside log_model, is then freed instead of being kept
        # alive by its worker thread.
        self.idle_s = idle_s
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = BatchStats()

    def submit(self, key: Hashable, items: Sequence[Any]) -> tuple[list[Any], int]:
        """Run ``items`` (sharing ``key``) in batches with other callers; (results, largest batch size).

        A request larger than ``max_batch`` is split into chunks that may land in different
        batches; its results come back in its own order. Exceptions of a batch reach every caller
        in it.
        """
        items = list(items)
        if not items:
            return [], 0
        chunks = [items[i:i + self.max_batch] for i in range(0, len(items), self.max_batch)]
        pending = [_Pending(key, chunk, time.monotonic()) for chunk in chunks]
        with self._cond:
            if self._closed:
                raise RuntimeError("coalescer is closed")
            self._ensure_worker()
            self._queue.extend(pending)
            self._cond.notify_all()
        results: list[Any] = []
        batch_size = 0
        for p in pending:
            rows, size = p.future.result()
            results.extend(rows)
            batch_size = max(batch_size, size)
        return results, batch_size

    def close(self) -> None:
        """Stop the worker after the queued work is done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    # The worker starts on first use, not in __init__: MLflow's server may fork workers after
    # loading the model, and threads do not survive a fork.
    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="lifecycle-coalescer", daemon=True)
            self._thread.start()

    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue:
                if self._closed or (not self._cond.wait(timeout=self.idle_s) and not self._queue):
                    self._thread = None
                    return None
            first = self._queue[0]
            deadline = first.arrived + self.wait_s
            while True:
                rows = sum(len(p.items) for p in self._queue if p.key == first.key)
                remaining = deadline - time.monotonic()
                if rows >= self.max_batch or remaining <= 0 or self._closed:
                    break
                self._cond.wait(timeout=remaining)
            batch: list[_Pending] = []
            size = 0
            for p in list(self._queue):
                if p.key == first.key and size + len(p.items) <= self.max_batch:
                    batch.append(p)
                    size += len(p.items)
                    self._queue.remove(p)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            items = [item for p in batch for item in p.items]
            try:
                results = list(self._run(batch[0].key, items))
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - every caller must learn of the failure
                for p in batch:
                    p.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.rows += len(items)
            self.stats.largest = max(self.stats.largest, len(items))
            offset = 0
            for p in batch:
                p.future.set_result((results[offset:offset + len(p.items)], len(items)))
                offset += len(p.items)
