"""The serving engine: one loaded model, its limits, the coalescer and the inference recorder.

The pyfunc class (:mod:`lifecycle.serving.model`) is a thin MLflow adapter around this; the
engine itself is plain Python + torch, so benchmarks and tests can measure it against a bare
``model.generate`` without MLflow in between.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from lifecycle.errors import AcceleratorOutOfMemoryError
from lifecycle.serving.batching import Arrival, Coalescer
from lifecycle.serving.generate import (
    Completion,
    batch_buckets,
    context_length,
    encode_prompts,
    free_accelerator_memory,
    generate_batch,
    is_out_of_memory,
    load_model,
    pick_device,
)
from lifecycle.serving.records import InferenceRecorder
from lifecycle.serving.redact import record_safe
from lifecycle.serving.requests import GenParams, InvalidRequest, parse_inputs, parse_params, plain_chat_prompt
from lifecycle.serving.settings import ServingConfig

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ["text", "prompt_tokens", "completion_tokens", "finish_reason", "truncated"]

#: Extra record fields from the completion texts (empty on a refusal or failure); see :meth:`Engine.predict`.
RecordExtra = Callable[[list[str]], Mapping[str, Any]]


class Engine:
    """Validate, batch, generate and record; ``predict`` returns the output DataFrame."""

    def __init__(self, model_dir: str | Path, config: ServingConfig | None = None, *,
                 recorder: InferenceRecorder | None = None):
        self.config = config or ServingConfig()
        # A CPU-only variant (int8-dynamic) falls back to CPU when no device was asked for.
        self.device = pick_device(self.config.device, model_dir)
        import torch

        if self.device.type == "cpu" and self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        # Generation runs on other threads (the server's request threads lead batches); they
        # get this thread's CPU thread count, not OpenMP's per-thread default.
        self.threads = torch.get_num_threads() if self.device.type == "cpu" else None
        self.model, self.tokenizer = load_model(model_dir, self.device)
        self.context = context_length(self.model)
        self.recorder = recorder
        # Static cache + compiled decode: pays off on CUDA; elsewhere only when asked for explicitly.
        self.static_cache = bool(self.config.compile)
        # The batch sizes a compiled decode step is built for (warmed up at load time).
        self.buckets = batch_buckets(self.config.max_batch_size) if self.static_cache else None
        self.coalescer = (Coalescer(self._run_batch, max_batch=self.config.max_batch_size,
                                    wait_s=self.config.batch_wait_ms / 1000.0)
                          if self.config.coalesce else None)

    def warmup(self) -> None:
        """Short generations so the first real requests do not pay for lazy initialisation.

        With ``compile`` every batch size a request can be served at (:attr:`buckets`) is
        generated once, so that each compiled graph exists before the first request arrives
        (compiling one on a request thread took longer than the request timeout).
        """
        params = self._params({"max_new_tokens": 2})
        for size in self.buckets or [1]:
            started = time.perf_counter()
            items = [(ids, params, False) for ids, _ in encode_prompts(self.tokenizer, ["Hello"] * size,
                                                                         max_prompt_tokens=self.context - 2,
                                                                         truncate=True)]
            self._run_batch(params.batch_key(), items)
            if self.static_cache:
                log.info("compiled decode for batch size %d in %.1f s", size, time.perf_counter() - started)

    def _params(self, params: Mapping[str, Any] | None) -> GenParams:
        return parse_params(params, max_new_tokens_cap=self.config.max_new_tokens_cap,
                            default_max_new_tokens=self.config.default_max_new_tokens,
                            max_stop_chars=self.config.max_stop_chars)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the tokenizer's template, or the plain format without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return plain_chat_prompt(messages)

    def prompt_limit(self, params: GenParams) -> int:
        """Most prompt tokens a request with ``params`` may carry."""
        limit = self.context - params.max_new_tokens
        if self.config.max_prompt_tokens is not None:
            limit = min(limit, self.config.max_prompt_tokens)
        if limit < 1:
            raise InvalidRequest(
                f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt in the model's "
                f"{self.context}-token context; use at most {self.context - 1}"
            )
        return limit

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None, *,
                extra: RecordExtra | None = None) -> Any:
        """Generate for every row of ``model_input``; the DataFrame of :data:`OUTPUT_COLUMNS`.

        ``extra`` adds fields to the request's inference record (the router's role and request
        id, a shadow's agreement with production); it gets the completion texts.
        """
        import pandas as pd

        start = time.perf_counter()
        # Tell the coalescer a caller is on its way, so a batch starting while this request is
        # still being parsed and tokenized may wait a moment for it.
        arrival = self.coalescer.expect() if self.coalescer is not None else None
        gen: GenParams | None = None
        prompts: list[str] = []
        try:
            gen = self._params(params)
            prompts = parse_inputs(model_input, self.chat_prompt, max_rows=self.config.max_rows)
            completions, batch_size = self._generate(prompts, gen, arrival)
        except InvalidRequest as exc:
            self._record(start, gen, prompts, [], 0, error=self._safe(exc.record, gen, prompts), status="invalid",
                         extra=extra)
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                free_accelerator_memory(self.device)
                self._record(start, gen, prompts, [], 0, error="accelerator out of memory", status="error",
                             extra=extra)
                raise AcceleratorOutOfMemoryError(
                    f"accelerator out of memory ({type(exc).__name__}); retry with fewer or shorter prompts") from exc
            self._record(start, gen, prompts, [], 0, error=self._safe(f"{type(exc).__name__}: {exc}", gen, prompts),
                         status="error", extra=extra)
            raise
        finally:
            if arrival is not None:
                self.coalescer.forget(arrival)
        self._record(start, gen, prompts, completions, batch_size, extra=extra)
        return pd.DataFrame([[c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason, c.truncated]
                             for c in completions], columns=OUTPUT_COLUMNS)

    def record_refusal(self, message: str, *, start: float | None = None, params: Any = None,
                       extra: RecordExtra | None = None) -> None:
        """Record a request refused before it reached :meth:`predict` (e.g. by MLflow's param checks).

        ``start`` is when the refusing check began (``time.perf_counter()``); the request's stop
        strings (``params["stop"]``) are cut out of the recorded message.
        """
        stop = params.get("stop") if isinstance(params, Mapping) else None
        self._record(time.perf_counter() if start is None else start, None, [], [], 0,
                     error=record_safe(message, _texts(stop)), status="invalid", extra=extra)

    @staticmethod
    def _safe(message: str, gen: GenParams | None, prompts: list[str]) -> str:
        """``message`` as it may be recorded: without the request's prompts or stop strings."""
        return record_safe(message, [*prompts, *(gen.stop if gen else ())])

    def _generate(self, prompts: list[str], gen: GenParams,
                  arrival: Arrival | None = None) -> tuple[list[Completion], int]:
        limit = self.prompt_limit(gen)
        items = [(ids, gen, truncated) for ids, truncated
                 in encode_prompts(self.tokenizer, prompts, max_prompt_tokens=limit, truncate=gen.truncate)]
        if self.coalescer is not None:
            return self.coalescer.submit(gen.batch_key(), items, arrival)
        out: list[Completion] = []
        size = self.config.max_batch_size
        for i in range(0, len(items), size):
            out.extend(self._run_batch(gen.batch_key(), items[i:i + size]))
        return out, min(len(items), size)

    def _run_batch(self, key: Any, items: list[tuple[list[int], GenParams, bool]]) -> list[Completion]:
        # Every item shares the batch key, so the first one's params stand for the batch.
        params = items[0][1]
        try:
            results = generate_batch(self.model, self.tokenizer, [ids for ids, _, _ in items],
                                     [p.max_new_tokens for _, p, _ in items], params, static_cache=self.static_cache,
                                     threads=self.threads, buckets=self.buckets)
        except Exception as exc:
            if is_out_of_memory(exc):
                # Once per failed batch, before any caller retries.
                free_accelerator_memory(self.device)
            raise
        for result, (_, _, truncated) in zip(results, items):
            result.truncated = truncated
        return results

    def _record(self, start: float, gen: GenParams | None, prompts: list[str], completions: list[Completion],
                batch_size: int, *, error: str | None = None, status: str = "ok",
                extra: RecordExtra | None = None) -> None:
        if self.recorder is None:
            return
        try:
            texts = [c.text for c in completions]
            self.recorder.record(
                latency_ms=(time.perf_counter() - start) * 1000.0,
                rows=[{"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                       "finish_reason": c.finish_reason, "truncated": c.truncated} for c in completions],
                batch_size=batch_size, params=gen.as_dict() if gen else None, error=error, status=status,
                prompts=prompts, completions=texts, extra=extra(texts) if extra is not None else None,
            )
        except Exception as exc:  # noqa: BLE001 - monitoring must never fail a request
            log.warning("could not write inference record: %s", exc)

    def close(self) -> None:
        """Refuse further batched requests and close the record sink."""
        if self.coalescer is not None:
            self.coalescer.close()
        if self.recorder is not None:
            self.recorder.close()


def _texts(params: Any) -> list[str]:
    """Every string inside ``params`` (e.g. a client's stop strings, however nested)."""
    out: list[str] = []
    stack = [params]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, Mapping):
            stack.extend(str(k) for k in value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)) or hasattr(value, "tolist"):
            stack.extend(value.tolist() if hasattr(value, "tolist") else value)
    return out
