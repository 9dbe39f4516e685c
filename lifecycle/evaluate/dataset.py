"""What evaluation measures on: a prepared folder's split, or any raw source the prepare stage reads.

A prepared folder (local, or ``runs:/<id>/prepared``) gives fixed packed blocks, the split's raw
documents (``raw/<split>.jsonl``, used by bits-per-byte and the default prompt set), its
tokenizer and its digest. A raw source (a text/JSONL file, ``hf:...``) gives documents only: each
model tokenizes and packs them with its own tokenizer, and the digest is that of the text.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lifecycle.data.card import read_card
from lifecycle.data.raw import read_raw_texts
from lifecycle.errors import DataError


@dataclass
class EvalData:
    """The documents (and, for prepared data, the packed blocks) of one evaluation."""

    source: str
    split: str
    documents: list[str]
    digest: str
    blocks: np.ndarray | None = None
    tokenizer_dir: Path | None = None
    card: dict[str, Any] = field(default_factory=dict)
    #: instruction data (format sft) only: the split's tokenized examples and their raw rows.
    sft: SftSplit | None = None

    @property
    def prepared(self) -> bool:
        """True when the blocks (or sft examples) come from a prepared folder."""
        return self.blocks is not None or self.sft is not None

    @property
    def block_size(self) -> int | None:
        """Length of the prepared blocks (sft: the longest an example may be; None for a raw source)."""
        if self.sft is not None:
            return int(self.card.get("block_size") or max(len(r) for r in self.sft.input_ids))
        return None if self.blocks is None else int(self.blocks.shape[1])


@dataclass
class SftSplit:
    """One split of instruction data: token rows (row i is raw line i) and the raw examples."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    #: raw rows: text, prompt (as served), response (the reference), segments, and the example.
    examples: list[dict[str, Any]]

    def response_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each example's labelled text (what its response loss is spent on)."""
        return np.array([max(sum(len(str(t).encode("utf-8")) for t, labelled, _ in e["segments"] if labelled), 1)
                         for e in self.examples], dtype=np.int64)


def find_prepared_dir(path: Path) -> Path | None:
    """The prepared folder at ``path`` (or its ``prepared/`` child, a run's artifact root)."""
    for cand in (path, path / "prepared"):
        if (cand / "data_card.json").is_file():
            return cand
    return None


def load_prepared_split(folder: Path, split: str, *, source: str) -> EvalData:
    """Blocks, raw documents, tokenizer and digest of one split of a prepared folder."""
    from datasets import load_from_disk

    card = read_card(folder)
    split_dir = folder / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in folder.iterdir() if (p / "dataset_info.json").exists())
        raise DataError(f"{source}: no split {split!r} (found: {', '.join(found) or 'none'})")
    state = split_dir / "state.json"
    try:
        files = json.loads(state.read_text(encoding="utf-8")).get("_data_files") if state.is_file() else None
    except (OSError, json.JSONDecodeError):
        files = None
    if files == []:  # datasets cannot even load a split saved with zero rows (no shards)
        raise DataError(f"{source}: split {split!r} is empty (0 blocks); evaluate another split with --split")
    try:
        ds = load_from_disk(str(split_dir))
    except Exception as exc:  # noqa: BLE001 - any unreadable split is bad input, said in one line
        raise DataError(f"{source}: split {split!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if "input_ids" not in ds.column_names:
        raise DataError(f"{source}: split {split!r} has no input_ids column (format {card.get('format')!r})")
    if card.get("format") == "sft":
        return _load_sft_split(folder, split, ds, card, source=source)
    if len(ds) == 0:
        raise DataError(f"{source}: split {split!r} is empty (0 blocks); evaluate another split with --split")
    blocks = np.asarray(ds.with_format("numpy")["input_ids"], dtype=np.int64)
    raw = folder / "raw" / f"{split}.jsonl"
    if not raw.is_file():
        raise DataError(f"{source}: raw/{split}.jsonl is missing (bits-per-byte needs the split's raw text)")
    documents = [d for d in read_raw_texts(raw) if d]
    if not documents:
        raise DataError(f"{source}: split {split!r} has no raw documents (raw/{split}.jsonl is empty)")
    digest = str(card.get("digest") or "")
    if not digest:
        raise DataError(f"{source}: data_card.json has no digest")
    tok = folder / "tokenizer"
    return EvalData(source=source, split=split, documents=documents, digest=digest, blocks=blocks,
                    tokenizer_dir=tok if tok.is_dir() else None, card=card)


def _load_sft_split(folder: Path, split: str, ds: Any, card: dict[str, Any], *, source: str) -> EvalData:
    from lifecycle.data.encode import read_examples

    if len(ds) == 0:
        raise DataError(f"{source}: split {split!r} holds no example; evaluate another split with --split")
    if "labels" not in ds.column_names:
        raise DataError(f"{source}: split {split!r} has no labels column; prepare it again with --format sft")
    raw = folder / "raw" / f"{split}.jsonl"
    if not raw.is_file():
        raise DataError(f"{source}: raw/{split}.jsonl is missing (generation needs the split's prompts)")
    examples = read_examples(raw)
    if "position_ids" in ds.column_names:
        return _load_packed_sft(folder, split, examples, card, source=source)
    if len(examples) != len(ds):
        raise DataError(f"{source}: raw/{split}.jsonl holds {len(examples)} examples but split {split!r} "
                        f"{len(ds)} rows; the folder was changed after it was prepared")
    digest = str(card.get("digest") or "")
    if not digest:
        raise DataError(f"{source}: data_card.json has no digest")
    tok = folder / "tokenizer"
    return EvalData(source=source, split=split, documents=[e["text"] for e in examples], digest=digest,
                    tokenizer_dir=tok if tok.is_dir() else None, card=card,
                    sft=SftSplit(input_ids=list(ds["input_ids"]), labels=list(ds["labels"]), examples=examples))


def _load_packed_sft(folder: Path, split: str, examples: list[dict[str, Any]], card: dict[str, Any], *,
                     source: str) -> EvalData:
    """Packed instruction data: evaluation scores every example on its own, so the examples are
    tokenized again from their segments (exactly as prepare encoded them before packing)."""
    from transformers import AutoTokenizer

    from lifecycle.data.encode import encode_segments

    tok_dir = folder / "tokenizer"
    if not tok_dir.is_dir():
        raise DataError(f"{source}: no tokenizer/ folder (packed sft data is scored per example)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    block = int(card.get("block_size") or 0)
    ids, labels = [], []
    for example in examples:
        enc = encode_segments(tokenizer, example["segments"], block_size=block,
                              overflow=str(card.get("sft", {}).get("overflow", "truncate")))
        if enc.dropped:
            raise DataError(f"{source}: an example of raw/{split}.jsonl no longer fits its block of {block} tokens")
        ids.append(enc.input_ids)
        labels.append(enc.labels)
    digest = str(card.get("digest") or "")
    if not digest:
        raise DataError(f"{source}: data_card.json has no digest")
    return EvalData(source=source, split=split, documents=[e["text"] for e in examples], digest=digest,
                    tokenizer_dir=tok_dir, card=card, sft=SftSplit(input_ids=ids, labels=labels, examples=examples))


def _read_raw_source(source: str) -> list[str]:
    """Documents of a raw source (text/JSONL/CSV/Parquet file or folder, ``hf:NAME``,
    ``builtin:pydoc``) through the prepare stage's readers, which refuse bad input the same way."""
    from lifecycle.data.config import SourceConfig
    from lifecycle.data.sources import iter_documents

    return [d for d in iter_documents(SourceConfig(uri=source)) if d and d.strip()]


def text_digest(documents: list[str]) -> str:
    """SHA-256 of a list of documents (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def load_eval_data(data: str | os.PathLike[str], split: str = "test") -> EvalData:
    """Resolve DATA: a prepared folder or ``runs:/`` URI of one (its ``split``), or a raw source."""
    from lifecycle.tracking import resolve_artifact

    text = os.fspath(data)
    is_uri = text.startswith(("runs:/", "models:/")) or ("://" in text and not text.startswith("hf:"))
    local = Path(text).expanduser()
    if is_uri or local.is_dir():
        path = resolve_artifact(text, what="data")
        prepared = find_prepared_dir(path) if path.is_dir() else None
        if prepared is not None:
            return load_prepared_split(prepared, split, source=text)
        text = str(path)  # a folder or file of raw text: read like the prepare stage reads it
    documents = _read_raw_source(text)
    if not documents:
        raise DataError(f"{text}: no documents to evaluate on (the source is empty)")
    return EvalData(source=os.fspath(data), split="all", documents=documents, digest=text_digest(documents))


def tokenizers_match(data: EvalData, tokenizer: Any) -> bool:
    """Whether ``tokenizer`` encodes like the prepared data's tokenizer (same vocabulary)."""
    if not data.prepared:
        return True  # raw source: every model packs the text with its own tokenizer
    if data.tokenizer_dir is None:
        # Without the tokenizer files the card's vocabulary size is the only evidence.
        return int(data.card.get("vocab_size", -1)) == len(tokenizer)
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(data.tokenizer_dir))
    return theirs.get_vocab() == tokenizer.get_vocab()
