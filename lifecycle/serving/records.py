"""Inference records: one JSON line per request, for monitoring.

The sink is a JSONL file named by ``LIFECYCLE_INFERENCE_LOG``: one line per ``predict`` call,
each written with a single ``os.write`` of the whole line on an ``O_APPEND`` descriptor, so
concurrent requests and several server worker processes never interleave inside a line (the
kernel appends each write whole, at the end of the file). A writer killed in the middle of a
large write can still leave a torn line; the reader (:mod:`lifecycle.monitoring.records`) skips
and counts it, and a recorder that opens a file ending in a torn line starts on a fresh line.
Prompt and completion text are stored only when ``LIFECYCLE_INFERENCE_LOG_TEXT=1``, and then
scrubbed with the prepare stage's PII scrubber. ``error`` never quotes the request (see
:class:`~lifecycle.serving.requests.InvalidRequest`) nor credentials of a URI.

Record fields (the contract with ``lifecycle monitor``):

``ts`` (ISO-8601 UTC), ``model_name``, ``model_version``, ``latency_ms`` (whole predict call,
or the refusal for a request refused before it; always > 0: a measured time rounds up to 0.001),
``n_rows``, ``prompt_tokens`` and ``completion_tokens`` (sums over rows), ``batch_size`` (rows in
the largest ``generate`` call that served the request), ``finish_reason`` (``length`` if any row
hit its limit, else ``stop``; null on error), ``rows`` (per row: ``prompt_tokens``,
``completion_tokens``, ``finish_reason``, ``truncated``), ``params`` (the generation params),
``error`` (null, or the one-line message of a refused or failed request), ``status``
(``ok`` | ``invalid`` | ``error``), and with text enabled ``prompts`` / ``completions``
(scrubbed lists) and ``pii`` (counts of what the scrubber replaced).

Behind the canary/shadow router (:mod:`lifecycle.serving.router`) records also carry ``role``
(``production`` | ``canary`` | ``shadow``: which arm answered) and ``request_id`` (shared by a
production record and the shadow record of the same request); a shadow record carries
``agreement`` (``exact_match`` and ``token_overlap`` of the shadow's answer with production's, the
mean over rows), and a shadow copy dropped under load is recorded with ``status`` ``dropped``
(:data:`DROPPED`): it was never run, so it says nothing about the challenger and readers count it
apart, never as an error. Records without ``role`` (a plain server, older files) are production's.
"""

from __future__ import annotations

import json
import math
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lifecycle.secrets import mask_secrets

LOG_ENV = "LIFECYCLE_INFERENCE_LOG"
#: ``status`` of a shadow copy the router dropped because its queue was full (never run).
DROPPED = "dropped"
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
        # O_APPEND: every write lands whole at the current end of the file, whoever else appends.
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if _ends_torn(self.path):
            # A writer died mid-line: start on a fresh line so that our first record stays whole.
            self._write(b"\n")

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
               prompts: Sequence[str] | None = None, completions: Sequence[str] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write one request's record and return it (``extra``: the router's ``role``, ``request_id`` ...)."""
        rec: dict[str, Any] = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "latency_ms": measured_ms(latency_ms),
            "n_rows": len(rows),
            "prompt_tokens": int(sum(r.get("prompt_tokens", 0) for r in rows)),
            "completion_tokens": int(sum(r.get("completion_tokens", 0) for r in rows)),
            "batch_size": int(batch_size),
            "finish_reason": None if error or not rows else (
                "length" if any(r.get("finish_reason") == "length" for r in rows) else "stop"),
            "rows": [dict(r) for r in rows],
            "params": dict(params or {}),
            "error": None if error is None else mask_secrets(str(error)),
            "status": status,
        }
        if extra:
            rec.update({k: v for k, v in extra.items() if k not in rec})
        if self.include_text:
            pii: dict[str, int] = {}
            rec["prompts"] = [self._scrubbed(t, pii) for t in (prompts or [])]
            rec["completions"] = [self._scrubbed(t, pii) for t in (completions or [])]
            rec["pii"] = pii
        line = (json.dumps(rec, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        self._write(line)
        return rec

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None:
                raise ValueError(f"inference recorder for {self.path} is closed")
            written = os.write(self._fd, data)
            # A regular file takes the whole buffer in one write unless the disk is full or the
            # process is being killed; finish the line rather than leave it torn.
            while written < len(data):
                written += os.write(self._fd, data[written:])

    def _scrubbed(self, text: str, counts: dict[str, int]) -> str:
        assert self._scrub is not None
        clean, found = self._scrub(text)
        for kind, n in dict(found).items():
            counts[kind] = counts.get(kind, 0) + int(n)
        return clean

    def close(self) -> None:
        """Close the file (records after this raise)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def measured_ms(value: float) -> float:
    """Milliseconds to 3 decimals, rounded up: a time that was measured is never recorded as 0."""
    ms = float(value)
    if not math.isfinite(ms) or ms <= 0:
        return 0.001
    return math.ceil(ms * 1000.0) / 1000.0


def _ends_torn(path: Path) -> bool:
    """Whether the file is non-empty and its last byte is not a newline."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False
