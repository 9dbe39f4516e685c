"""Generation latency and throughput through the pyfunc ``predict``, per request batch size.

A request of batch size ``b`` carries ``b`` prompts (taken round-robin from the prompt set) and
asks for ``max_new_tokens`` with greedy decoding (long prompts keep their last tokens); its latency
is the wall time of ``predict``.
Throughput counts the completion tokens the model reports (a completion that stops at EOS counts
what it produced, not the budget).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

PredictFn = Callable[[list[str], Mapping[str, Any]], Any]


@dataclass(frozen=True)
class LatencyResult:
    """Latency percentiles and throughput at one batch size."""

    batch_size: int
    latencies_ms: tuple[float, ...]
    completion_tokens: int
    seconds: float

    @property
    def p50_ms(self) -> float:
        """Median request latency."""
        return float(np.percentile(self.latencies_ms, 50))

    @property
    def p95_ms(self) -> float:
        """95th percentile request latency (linear interpolation between requests)."""
        return float(np.percentile(self.latencies_ms, 95))

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens per second of request time."""
        return self.completion_tokens / max(self.seconds, 1e-9)


def measure(predict: PredictFn, prompts: Sequence[str], *, batch_size: int, requests: int, warmup: int,
            max_new_tokens: int, sync: Callable[[], None] | None = None) -> LatencyResult:
    """Time ``requests`` calls of ``predict`` with ``batch_size`` prompts each (after ``warmup``)."""
    if not prompts:
        raise ValueError("latency needs at least one prompt")
    params = {"max_new_tokens": max_new_tokens, "do_sample": False, "truncate": True}
    cursor = 0

    def next_batch() -> list[str]:
        nonlocal cursor
        batch = [prompts[(cursor + i) % len(prompts)] for i in range(batch_size)]
        cursor += batch_size
        return batch

    for _ in range(warmup):
        predict(next_batch(), params)
    latencies: list[float] = []
    tokens = 0
    for _ in range(requests):
        batch = next_batch()
        start = time.perf_counter()
        frame = predict(batch, params)
        if sync is not None:
            sync()
        latencies.append((time.perf_counter() - start) * 1000.0)
        tokens += int(np.sum(np.asarray(frame["completion_tokens"], dtype=np.int64)))
    return LatencyResult(batch_size, tuple(latencies), tokens, sum(latencies) / 1000.0)


def latency_metrics(results: Sequence[LatencyResult]) -> dict[str, float]:
    """``latency_p50_ms``/``latency_p95_ms``/``tokens_per_s`` per batch size (``_bs<N>``), and the
    unsuffixed names from the first batch size measured (a single-prompt request by default)."""
    out: dict[str, float] = {}
    for res in results:
        out[f"latency_p50_ms_bs{res.batch_size}"] = res.p50_ms
        out[f"latency_p95_ms_bs{res.batch_size}"] = res.p95_ms
        out[f"tokens_per_s_bs{res.batch_size}"] = res.tokens_per_s
    if results:
        first = results[0]
        out["latency_p50_ms"] = first.p50_ms
        out["latency_p95_ms"] = first.p95_ms
        out["tokens_per_s"] = first.tokens_per_s
    return out
