"""Read inference records (the serving stage's JSONL contract) and select one window of one version.

See :mod:`lifecycle.serving.records` for the fields. Malformed lines are refused with their line
number rather than skipped: a monitor that silently drops data reports a healthier service than
the one that runs.
"""

from __future__ import annotations

import json
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


def _timestamp(value: Any, where: str) -> datetime:
    try:
        ts = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"{where}: 'ts' is not an ISO time: {value!r}") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a JSONL file, each with a parsed ``_ts`` (aware datetime); blank lines skipped."""
    p = Path(path)
    out: list[dict[str, Any]] = []
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not a JSON record ({exc.msg})") from None
            if not isinstance(rec, dict) or "ts" not in rec or "latency_ms" not in rec:
                raise DataError(f"{where}: not an inference record (needs at least 'ts' and 'latency_ms')")
            rec["_ts"] = _timestamp(rec["ts"], where)
            out.append(rec)
    return out


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

