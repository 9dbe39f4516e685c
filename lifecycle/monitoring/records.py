"""Read inference records (the serving stage's JSONL contract) and select one window of one version.

See :mod:`lifecycle.serving.records` for the fields. A damaged line (torn by a server killed
mid-write, a stray non-UTF-8 byte, binary garbage, a record with a missing field or a field of the
wrong type) is skipped, counted and named in a warning, never fatal: one bad line used to block
every later ``monitor`` of the file. The count is reported (``monitor/records_skipped``) so that a
window that lost data says so instead of looking healthier than the service that ran. A record
glued to the end of a torn one (the next writer appended right after it) is recovered.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

from lifecycle.errors import ConfigError, DataError

LOG_ENV = "LIFECYCLE_INFERENCE_LOG"  # the same variable the serving stage writes to
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

MismatchPolicy = Literal["refuse", "separate"]
#: Every record starts with its timestamp (the writer's key order): where a glued record begins.
_RECORD_START = b'{"ts":'
#: Damaged lines named one by one in the warning (the count covers them all).
_NAMED = 5

log = logging.getLogger(__name__)


def parse_since(text: str | None, *, now: datetime | None = None) -> datetime | None:
    """``24h`` / ``30m`` / ``7d`` (before ``now``) or an ISO-8601 time; None means "all records".

    A naive ISO time is taken as UTC (records are written in UTC).
    """
    if text is None or not str(text).strip() or str(text).strip().lower() == "all":
        return None
    now = now or datetime.now(timezone.utc)
    match = _RELATIVE.match(str(text))
    if match:
        return now - timedelta(**{_UNITS[match.group(2).lower()]: float(match.group(1))})
    try:
        when = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since {text!r}: give an ISO time (2026-01-31T12:00:00Z) or a duration "
                          "such as 30m, 24h, 7d") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def records_path(path: str | os.PathLike[str] | None) -> Path:
    """The records file: ``path`` or ``$LIFECYCLE_INFERENCE_LOG``, which must exist."""
    text = os.fspath(path) if path else os.environ.get(LOG_ENV, "").strip()
    if not text:
        raise ConfigError(f"no inference records given: pass --records FILE or set {LOG_ENV}")
    p = Path(text).expanduser()
    if not p.is_file():
        raise DataError(f"inference records file not found: {p}")
    return p


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # In UTC: an offset that moves the time out of datetime's range is a damaged value.
        return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _problem(rec: Any, ts: datetime | None) -> str | None:
    """Why ``rec`` is not a usable inference record, or None when every field monitor reads is sound.

    ``ts`` is ``rec["ts"]`` as :func:`_timestamp` parsed it (once per record, by the caller).
    """
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not a record"
    if "ts" not in rec or "latency_ms" not in rec:
        return "not an inference record (needs at least 'ts' and 'latency_ms')"
    if ts is None:
        return "'ts' is not an ISO time"
    if not _number(rec["latency_ms"]):
        return "'latency_ms' is not a non-negative number"
    for key in ("model_name", "model_version", "error", "status", "finish_reason"):
        value = rec.get(key)
        if value is not None and (not isinstance(value, (str, int)) or isinstance(value, bool)):
            return f"'{key}' has the wrong type"
    if rec.get("batch_size") is not None and not _number(rec["batch_size"]):
        return "'batch_size' is not a non-negative number"
    rows = rec.get("rows")
    if rows is not None:
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return "'rows' is not a list of objects"
        for r in rows:
            if any(r.get(k) is not None and not _number(r[k]) for k in ("prompt_tokens", "completion_tokens")):
                return "a row's token count is not a non-negative number"
    for key in ("prompts", "completions"):
        if rec.get(key) is not None and not (isinstance(rec[key], list) and all(isinstance(t, str) for t in rec[key])):
            return f"'{key}' is not a list of strings"
    return None


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) or (None, why the line is damaged)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte {exc.start})"
    try:
        rec = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, f"not a JSON record ({getattr(exc, 'msg', 'nested too deeply')})"
    ts = _timestamp(rec.get("ts")) if isinstance(rec, dict) else None
    why = _problem(rec, ts)
    if why is not None:
        return None, why
    rec["_ts"] = ts
    return rec, None


@dataclass
class RecordsRead:
    """The usable records of a file and the damaged lines that were skipped (``path:line: why``)."""

    records: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)


def load_records(path: str | os.PathLike[str]) -> RecordsRead:
    """Every usable record of a JSONL file, each with a parsed ``_ts``; damaged lines skipped and counted.

    Blank lines are not records and are not counted. A damaged line that ends in a whole record
    (a writer appended right after a torn line) keeps that record and counts the torn part.
    One warning names the first damaged lines and the total.
    """
    p = Path(path)
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    with open(p, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            rec, why = _parse(raw)
            if rec is None:
                glued = raw.rfind(_RECORD_START, 1)
                if glued > 0:
                    rec, _ = _parse(raw[glued:])
                    if rec is not None:
                        why = f"torn record before a whole one ({why})"
                skipped.append(f"{p}:{n}: {why}")
            if rec is not None:
                out.append(rec)
    if skipped:
        named = "; ".join(skipped[:_NAMED]) + ("" if len(skipped) <= _NAMED else f"; and {len(skipped) - _NAMED} more")
        log.warning("skipped %d damaged line(s) of %s: %s", len(skipped), p, named)
    return RecordsRead(records=out, skipped=skipped)


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The usable records of a JSONL file (see :func:`load_records`, which also returns what was skipped)."""
    return load_records(path).records


def identity(rec: dict[str, Any]) -> str:
    """``name vVERSION`` of the model that served a record."""
    return f"{rec.get('model_name')} v{rec.get('model_version')}"


@dataclass
class Window:
    """The records of one model version inside ``[since, until]``, and the earlier ones (baseline)."""

    records: list[dict[str, Any]]
    baseline: list[dict[str, Any]]
    since: datetime | None
    until: datetime
    others: Counter = field(default_factory=Counter)  # identity -> records of other versions left out


def select_window(records: Iterable[dict[str, Any]], *, name: str, version: str,
                  aliases: Iterable[str] = (), since: datetime | None = None,
                  until: datetime | None = None, mismatch: MismatchPolicy = "refuse") -> Window:
    """The window's records of ``name`` version ``version``; refuse or separate other versions.

    A record belongs to the version when its ``model_name``/``model_version`` are ``name`` and
    ``version``, or when its ``model_version`` is one of ``aliases`` (a model served straight from
    ``mlflow models serve`` names itself after its run id). Records of other versions inside the
    window are never mixed in: by default they raise :class:`DataError` listing what was found;
    with ``mismatch="separate"`` they are counted in ``others`` and left out.
    """
    if mismatch not in ("refuse", "separate"):
        raise ConfigError(f"--version-mismatch must be refuse or separate, got {mismatch!r}")
    until = until or datetime.now(timezone.utc)
    ids = {str(version), *map(str, aliases)}
    mine: list[dict[str, Any]] = []
    baseline: list[dict[str, Any]] = []
    others: Counter = Counter()
    seen_any = False
    for rec in records:
        seen_any = True
        if rec["_ts"] > until:
            continue
        ok = (rec.get("model_name") == name and str(rec.get("model_version")) == str(version)) or (
            str(rec.get("model_version")) in ids - {str(version)})
        in_window = since is None or rec["_ts"] >= since
        if not ok:
            if in_window:
                others[identity(rec)] += 1
            continue
        (mine if in_window else baseline).append(rec)
    span = f"since {since.isoformat(timespec='seconds')}" if since else "in the file"
    if others and mismatch == "refuse":
        found = ", ".join(f"{k} ({n})" for k, n in others.most_common())
        raise DataError(f"the window holds records of other model versions than {name} v{version}: {found}; "
                        "pass --version-mismatch separate to keep only the asked version, or pick the "
                        "version with --alias/--version")
    if not seen_any:
        raise DataError("no inference records: the records file holds none (is LIFECYCLE_INFERENCE_LOG set "
                        "where the model is served?)")
    if not mine:
        what = f"no inference records of {name} v{version}"
        extra = f" (left out: {', '.join(f'{k} ({n})' for k, n in others.most_common())})" if others else ""
        hint = "" if since is None else "; widen the window with --since"
        raise DataError(f"{what} {span}{extra}{hint}")
    return Window(records=mine, baseline=baseline, since=since, until=until, others=others)

