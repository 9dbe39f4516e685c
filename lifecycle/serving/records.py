"""Inference records: one JSON line per request, for monitoring.

The sink is a JSONL file named by ``LIFECYCLE_INFERENCE_LOG`` (appended, one line per
``predict`` call, written under a lock and flushed, so concurrent requests and several server
worker processes never interleave partial lines: each line goes out in one ``write`` on a file
opened in append mode). Prompt and completion text are stored only when
``LIFECYCLE_INFERENCE_LOG_TEXT=1``, and then scrubbed with the prepare stage's PII scrubber.

Record fields (the contract with ``lifecycle monitor``):

``ts`` (ISO-8601 UTC), ``model_name``, ``model_version``, ``latency_ms`` (whole predict call),
``n_rows``, ``prompt_tokens`` and ``completion_tokens`` (sums over rows), ``batch_size`` (rows in
the largest ``generate`` call that served the request), ``finish_reason`` (``length`` if any row
hit its limit, else ``stop``; null on error), ``rows`` (per row: ``prompt_tokens``,
``completion_tokens``, ``finish_reason``, ``truncated``), ``params`` (the generation params),
``error`` (null, or the one-line message of a refused or failed request), ``status``
(``ok`` | ``invalid`` | ``error``), and with text enabled ``prompts`` / ``completions``
(scrubbed lists) and ``pii`` (counts of what the scrubber replaced).
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

LOG_ENV = "LIFECYCLE_INFERENCE_LOG"
TEXT_ENV = "LIFECYCLE_INFERENCE_LOG_TEXT"

Scrubber = Callable[[str], "tuple[str, Mapping[str, int]]"]


def _default_scrubber() -> Scrubber:
    # Imported lazily: the data stage is heavy to import and only needed when text is kept.
    from lifecycle.data.pii import scrub

    return scrub


class InferenceRecorder:
    """Append one JSON line per request to ``path``; thread-safe and flushed per line."""

    def __init__(self, path: str | os.PathLike[str], *, model_name: str | None, model_version: str | None,
                 include_text: bool = False, scrubber: Scrubber | None = None):
        self.path = Path(path)
        self.model_name = model_name
        self.model_version = model_version
        self.include_text = include_text
        self._scrub = scrubber if scrubber is not None or not include_text else _default_scrubber()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: each record reaches the OS as one write.
        self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives with the model

    @classmethod
    def from_env(cls, *, model_name: str | None, model_version: str | None,
                 environ: Mapping[str, str] | None = None) -> "InferenceRecorder | None":
        """The recorder the environment asks for, or None when ``LIFECYCLE_INFERENCE_LOG`` is unset."""
        env = os.environ if environ is None else environ
        path = env.get(LOG_ENV, "").strip()
        if not path:
            return None
        text = env.get(TEXT_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        return cls(path, model_name=model_name, model_version=model_version, include_text=text)

    def record(self, *, latency_ms: float, rows: Sequence[Mapping[str, Any]] = (), batch_size: int = 0,
               params: Mapping[str, Any] | None = None, error: str | None = None, status: str = "ok",
               prompts: Sequence[str] | None = None, completions: Sequence[str] | None = None) -> dict[str, Any]:
        """Write one request's record and return it."""
        rec: dict[str, Any] = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "latency_ms": round(float(latency_ms), 3),
            "n_rows": len(rows),
            "prompt_tokens": int(sum(r.get("prompt_tokens", 0) for r in rows)),
            "completion_tokens": int(sum(r.get("completion_tokens", 0) for r in rows)),
            "batch_size": int(batch_size),
            "finish_reason": None if error or not rows else (
                "length" if any(r.get("finish_reason") == "length" for r in rows) else "stop"),
            "rows": [dict(r) for r in rows],
            "params": dict(params or {}),
            "error": error,
            "status": status,
        }
        if self.include_text:
            pii: dict[str, int] = {}
            rec["prompts"] = [self._scrubbed(t, pii) for t in (prompts or [])]
            rec["completions"] = [self._scrubbed(t, pii) for t in (completions or [])]
            rec["pii"] = pii
        line = json.dumps(rec, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
        return rec

    def _scrubbed(self, text: str, counts: dict[str, int]) -> str:
        assert self._scrub is not None
        clean, found = self._scrub(text)
        for kind, n in dict(found).items():
            counts[kind] = counts.get(kind, 0) + int(n)
        return clean

    def close(self) -> None:
        """Close the file (records after this raise)."""
        with self._lock:
            self._fh.close()
