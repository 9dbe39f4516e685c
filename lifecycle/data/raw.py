"""The raw text of a prepared split: ``raw/<split>.jsonl``, one ``{"text": ...}`` per document.

One reader for the contract, used by the prepare stage itself (tokenizer training, packing,
dedup against earlier data), by bits-per-byte in evaluation and by the monitoring reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from lifecycle.errors import DataError


def read_raw_texts(path: str | Path) -> Iterator[str]:
    """Yield the documents of a raw split file; a malformed line is named as ``file:line``."""
    path = Path(path)
    with path.open("r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with a string 'text'")
            yield row["text"]
