"""The data card: counts, filters, dedup, PII, splits, tokens, the content digest, and plots.

The length histogram uses fixed logarithmic bins so it costs the same memory for a thousand
documents as for a billion.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lifecycle.errors import DataError

# Quarter-octave bins from 1 character to 2**30 characters.
_EDGES = np.concatenate([[0.0], 2.0 ** np.arange(0, 30.25, 0.25)])


class LengthHistogram:
    """Document lengths (characters) in fixed log bins plus exact min/max/sum."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(_EDGES) - 1, dtype=np.int64)
        self.n = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    def add(self, length: int) -> None:
        """Count one document of ``length`` characters."""
        # Bin 0 holds empty documents; bin k >= 1 holds [2**((k-1)/4), 2**(k/4)).
        i = 0 if length < 1 else int(math.floor(4 * math.log2(length))) + 1
        self.counts[min(i, len(self.counts) - 1)] += 1
        self.n += 1
        self.total += length
        self.min = length if self.min is None else min(self.min, length)
        self.max = length if self.max is None else max(self.max, length)

    def to_dict(self) -> dict[str, Any]:
        """Summary for the data card (non-empty bins only)."""
        nz = np.nonzero(self.counts)[0]
        return {
            "documents": self.n,
            "min": self.min,
            "max": self.max,
            "mean": (self.total / self.n) if self.n else None,
            "bins": [{"from": float(_EDGES[i]), "to": float(_EDGES[i + 1]), "count": int(self.counts[i])} for i in nz],
        }


def plot_length_histogram(hist: dict[str, Any], path: Path, title: str = "Document length") -> Path:
    """Write a PNG bar chart of a :meth:`LengthHistogram.to_dict` summary (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = hist.get("bins", [])
    if bins:
        lefts = [max(b["from"], 1.0) for b in bins]
        widths = [b["to"] - max(b["from"], 1.0) for b in bins]
        ax.bar(lefts, [b["count"] for b in bins], width=widths, align="edge", edgecolor="black", linewidth=0.3)
        ax.set_xscale("log")
    ax.set_xlabel("characters per document (log scale)")
    ax.set_ylabel("documents")
    ax.set_title(f"{title} (n={hist.get('documents', 0)}, mean={hist.get('mean') or 0:.0f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CARD_NAME = "data_card.json"


def write_card(card: dict[str, Any], folder: Path) -> Path:
    """Write ``data_card.json`` into ``folder``."""
    path = folder / CARD_NAME
    path.write_text(json.dumps(card, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_card(folder: str | Path, *, required: bool = True) -> dict[str, Any]:
    """The data card of a prepared folder: the one reader of ``data_card.json``.

    A folder without a card is refused (:class:`DataError`), or gives ``{}`` when the card is
    not ``required``. A card that cannot be read, is not JSON, is not a JSON object or has a
    digest that is not a string is refused with one line naming the file.
    """
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        if not required:
            return {}
        raise DataError(f"{folder}: not a prepared data folder (no {CARD_NAME}); make one with `lifecycle prepare`")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data card ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a valid data card (not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not a valid data card (invalid JSON: {exc.msg} at line {exc.lineno})") from None
    if not isinstance(card, dict):
        raise DataError(f"{path}: not a valid data card (a JSON {type(card).__name__}, not an object)")
    if not isinstance(card.get("digest", ""), str):
        raise DataError(f"{path}: not a valid data card (its digest is not a string)")
    return card
