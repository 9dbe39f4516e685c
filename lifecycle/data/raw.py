"""The raw text of a prepared split: ``raw/<split>.jsonl``, one ``{"text": ...}`` per document.

One reader for the contract, used by the prepare stage itself (tokenizer training, packing,
dedup against earlier data), by bits-per-byte in evaluation and by the monitoring reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from lifecycle.errors import DataError


def json_objects(lines: Iterable[str], where: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file.

    The one place that refuses a line that is not JSON, or not an object, naming ``file:line``:
    every JSONL reader of the project (sources, raw splits, prompt files) goes through it.
    """
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}:{number}: expected a JSON object per line, got {type(row).__name__}")
        yield number, row


def read_raw_texts(path: str | Path) -> Iterator[str]:
    """Yield the documents of a raw split file; a malformed line is named as ``file:line``."""
    path = Path(path)
    with path.open("r", encoding="utf-8") as fh:
        for number, row in json_objects(fh, path):
            if not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with a string 'text'")
            yield row["text"]
