"""The reference a window is compared with: segments of the training data's test split.

Choice of reference prompt lengths (documented for the policy author): prompts are compared
with the **paragraphs** (blank-line separated segments) of the reference test split's raw
documents, tokenized by the served model's tokenizer exactly as the serving engine tokenizes a
prompt (``tokenizer(text)``). Whole documents would be far longer than any prompt and flag every
window; the prompt distribution of a first window would make the monitor blind to drift that was
already there on day one. Paragraphs are the unit a user most often pastes as a prompt, and they
come from data the version was trained and evaluated on, so the reference is fixed per version.

Token-level statistics need the recorded text (``LIFECYCLE_INFERENCE_LOG_TEXT=1`` at serve time);
without it they are reported as unavailable, never estimated.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lifecycle.data.card import read_card
from lifecycle.data.raw import read_raw_texts
from lifecycle.errors import DataError, NotFoundError

_PARAGRAPH = re.compile(r"\n\s*\n")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class Reference:
    """Reference segments of a prepared data folder and what they are (for the run's params)."""

    folder: Path
    segments: list[str]
    digest: str | None
    documents: int


def split_segments(documents: Iterable[str], *, min_chars: int = 1) -> list[str]:
    """Paragraphs of ``documents`` (blank-line separated, stripped, at least ``min_chars`` long)."""
    out: list[str] = []
    for doc in documents:
        out += [p.strip() for p in _PARAGRAPH.split(doc) if len(p.strip()) >= min_chars]
    return out


def load_reference(folder: Path, *, split: str = "test", max_segments: int = 2000, seed: int = 0) -> Reference:
    """Read ``raw/<split>.jsonl`` of a prepared data folder into at most ``max_segments`` segments.

    A deterministic sample (``seed``) keeps the reference identical from one run to the next.
    """
    raw = folder / "raw" / f"{split}.jsonl"
    if not raw.is_file():
        raise NotFoundError(f"reference {folder} holds no raw/{split}.jsonl: pass --reference with a prepared data "
                            "folder or runs:/<data_run_id>/prepared made by `lifecycle prepare`")
    docs = list(read_raw_texts(raw))
    segments = split_segments(docs)
    if not segments:
        raise DataError(f"reference {raw} holds no text")
    if len(segments) > max_segments:
        segments = random.Random(seed).sample(segments, max_segments)
    digest = read_card(folder, required=False).get("digest")
    return Reference(folder=folder, segments=segments, digest=digest, documents=len(docs))


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, tokenized the way the serving engine tokenizes prompts."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts))["input_ids"]]


def _byte_level_high_chars() -> set[str]:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return {ch for b, ch in mapping.items() if b >= 0x80}


def fallback_token_ids(tokenizer: Any) -> set[int]:
    """Ids that signal text the vocabulary does not cover.

    The unknown token; SentencePiece-style byte-fallback tokens (``<0x80>``); and, for byte-level
    BPE (GPT-2 style, where nothing is ever unknown), the bare single-byte tokens of non-ASCII
    bytes: a character reaches the model as those only when no merge of the vocabulary covers it.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    ids: set[int] = set()
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        ids.add(int(unk))
    ids |= {i for tok, i in vocab.items() if _BYTE_FALLBACK.match(tok)}
    high = _byte_level_high_chars()
    if sum(1 for ch in high if ch in vocab) >= len(high) // 2:
        ids |= {vocab[ch] for ch in high if ch in vocab}
    return ids


def unknown_rate(ids: Sequence[Sequence[int]], fallback: set[int]) -> float:
    """Fraction of tokens that are unknown/byte-fallback tokens (NaN without tokens)."""
    total = sum(len(x) for x in ids)
    if total == 0:
        return float("nan")
    return sum(1 for x in ids for t in x if t in fallback) / total


def token_counts(ids: Sequence[Sequence[int]]) -> Counter:
    """Unigram counts of token ids."""
    counts: Counter = Counter()
    for x in ids:
        counts.update(x)
    return counts


def lengths(ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Token length of each tokenized text."""
    return np.asarray([len(x) for x in ids], dtype=np.float64)
