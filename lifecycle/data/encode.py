"""Example encoding and packing: segments -> ``input_ids`` / ``labels``, one row per example or packed.

Segments are tokenized one by one (the first with the tokenizer's own special tokens, as the
serving stage encodes a prompt), so the boundary between the prompt and its response is exactly
where generation starts at serving time. The labels are ``-100`` on context tokens: the loss is on
the responses only. An example longer than the block loses its oldest tokens (the prompt side) by
default, or is dropped; either way the data card counts it. By default each row is one example,
padded per batch at training time; with ``sft.packing`` several short examples share a row, with
position ids that restart for each example (training builds a block-diagonal mask from them, so no
example ever attends to another).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from lifecycle.data.pack import save_arrow_dataset
from lifecycle.data.raw import json_objects
from lifecycle.data.tokenizer import batched, check_eos
from lifecycle.errors import DataError

IGNORE_INDEX = -100


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before a text of its own accord (e.g. BOS), as serving encodes prompts."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    if plain and plain[0] in full:
        return list(full[:full.index(plain[0])])
    return []


@dataclass
class Encoded:
    """One tokenized example, or why it was dropped."""

    input_ids: list[int]
    labels: list[int]
    truncated_tokens: int = 0
    dropped: str | None = None


def encode_segments(tokenizer: Any, segments: Sequence[Sequence[Any]], *, block_size: int, overflow: str = "truncate",
                    prefix: list[int] | None = None, eos_id: int | None = None) -> Encoded:
    """``input_ids`` and ``labels`` (``-100`` on context) of one example, at most ``block_size`` long.

    Too long: ``truncate`` drops the oldest tokens (the prompt side) as long as the last response
    stays whole, else (or with ``drop``) the example is dropped as ``too_long``.
    """
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    eos = check_eos(tokenizer) if eos_id is None else eos_id
    texts = [str(s[0]) for s in segments]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids: list[int] = list(prefix)
    labels: list[int] = [IGNORE_INDEX] * len(prefix)
    last_start = -1
    for (text, labelled, add_eos), toks in zip(segments, encoded):
        if labelled:
            last_start = len(ids)
        ids.extend(toks)
        labels.extend(toks if labelled else [IGNORE_INDEX] * len(toks))
        if add_eos:
            ids.append(eos)
            labels.append(eos if labelled else IGNORE_INDEX)
    if last_start < 0 or all(x == IGNORE_INDEX for x in labels):
        return Encoded([], [], dropped="no_response")
    # Context after the last response teaches nothing.
    end = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX) + 1
    ids, labels = ids[:end], labels[:end]
    if len(ids) <= block_size:
        return Encoded(ids, labels)
    cut = len(ids) - block_size
    # The first label is predicted from the token before it: keep one token of context.
    if overflow == "drop" or cut > last_start - 1:
        return Encoded([], [], dropped="too_long")
    return Encoded(ids[cut:], labels[cut:], truncated_tokens=cut)


@dataclass
class SplitStats:
    """What tokenizing one split did (counts of examples, rows and tokens)."""

    examples: int = 0  # kept
    rows: int = 0  # one per example, or fewer when packed
    tokens: int = 0
    response_tokens: int = 0  # labelled: what the loss is spent on
    truncated: int = 0  # examples that lost prompt tokens ...
    truncated_tokens: int = 0  # ... and how many in all
    too_long: int = 0  # examples dropped: even truncated they would not fit
    max_length: int = 0


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a raw split file of instruction data, as they were written."""
    with path.open("r", encoding="utf-8") as fh:
        for _, row in json_objects(fh, path):
            yield row


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an sft ``raw/<split>.jsonl`` (text, prompt, response, segments, the example)."""
    path = Path(path)
    rows = list(read_rows(path))
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("segments"), list) or not isinstance(row.get("prompt"), str):
            raise DataError(f"{path}:{number}: not an sft example (needs prompt, response and segments)")
    return rows


class ExamplePacker:
    """Packs encoded examples, in order, into rows of at most ``block_size`` tokens.

    Position ids restart at 0 with every example: training rebuilds from them a block-diagonal
    causal mask, so a token attends only to earlier tokens of its own example, and each example
    sees the positions it would see alone (its loss is the same packed or not).
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}

    def add(self, ids: list[int], labels: list[int]) -> list[dict[str, list[int]]]:
        """Add one example; return the rows it completed."""
        done = self.flush() if len(self._row["input_ids"]) + len(ids) > self.block_size else []
        self._row["input_ids"] += ids
        self._row["labels"] += labels
        self._row["position_ids"] += list(range(len(ids)))
        return done

    def flush(self) -> list[dict[str, list[int]]]:
        """The row being filled (if any), finished."""
        if not self._row["input_ids"]:
            return []
        row = self._row
        self._row = {"input_ids": [], "labels": [], "position_ids": []}
        return [row]


def tokenize_split(tokenizer: Any, raw: Path, out: Path, *, block_size: int, overflow: str,
                   batch_size: int = 512, packing: bool = False) -> tuple[SplitStats, bytes]:
    """Tokenize the examples of ``raw`` into a ``save_to_disk`` dataset at ``out``.

    One row per example, or with ``packing`` several examples per row (with ``position_ids``, see
    :class:`ExamplePacker`). Examples dropped as too long are also removed from ``raw`` (so,
    unpacked, row ``i`` of the dataset is line ``i`` of the raw file); returns the stats and the
    sha256 of the raw file as kept.
    """
    import pyarrow as pa

    stats = SplitStats()
    prefix = special_prefix(tokenizer)
    eos = check_eos(tokenizer)
    kept_raw = raw.with_name(f".{raw.name}.kept")
    raw_hash = hashlib.sha256()
    arrow_path = out.parent / f".{out.name}.arrow"
    fields = [("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())),
              ("labels", pa.list_(pa.int32()))]
    if packing:
        fields.append(("position_ids", pa.list_(pa.int32())))
    schema = pa.schema(fields)
    packer = ExamplePacker(block_size) if packing else None

    def add_rows(cols: dict[str, list[Any]], rows: list[dict[str, list[int]]]) -> None:
        for r in rows:
            cols["input_ids"].append(r["input_ids"])
            cols["attention_mask"].append([1] * len(r["input_ids"]))
            cols["labels"].append(r["labels"])
            if packing:
                cols["position_ids"].append(r["position_ids"])
            stats.rows += 1

    def write(cols: dict[str, list[Any]]) -> None:
        if cols["input_ids"]:
            writer.write_batch(pa.record_batch([pa.array(cols[k], type=schema.field(k).type) for k in schema.names],
                                               schema=schema))

    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            kept_raw.open("wb") as kept:
        for rows in batched(read_rows(raw), batch_size):
            cols: dict[str, list[Any]] = {name: [] for name in schema.names}
            for row in rows:
                enc = encode_segments(tokenizer, row["segments"], block_size=block_size, overflow=overflow,
                                      prefix=prefix, eos_id=eos)
                if enc.dropped:
                    stats.too_long += 1
                    continue
                line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                kept.write(line)
                raw_hash.update(line)
                if packer is not None:
                    add_rows(cols, packer.add(enc.input_ids, enc.labels))
                else:
                    add_rows(cols, [{"input_ids": enc.input_ids, "labels": enc.labels}])
                stats.examples += 1
                stats.tokens += len(enc.input_ids)
                stats.response_tokens += sum(1 for x in enc.labels if x != IGNORE_INDEX)
                stats.max_length = max(stats.max_length, len(enc.input_ids))
                if enc.truncated_tokens:
                    stats.truncated += 1
                    stats.truncated_tokens += enc.truncated_tokens
            write(cols)
        if packer is not None:
            cols = {name: [] for name in schema.names}
            add_rows(cols, packer.flush())
            write(cols)
    kept_raw.replace(raw)
    save_arrow_dataset(arrow_path, out)
    return stats, raw_hash.digest()


_WORKER: dict[str, Any] = {}


def load_rows(split_dir: Path) -> tuple[list[list[int]], list[list[int]], list[list[int]] | None]:
    """``input_ids``, ``labels`` and (packed data only, else None) ``position_ids`` of a prepared sft split."""
    from datasets import load_from_disk

    ds = load_from_disk(str(split_dir))
    missing = [c for c in ("input_ids", "labels") if c not in ds.column_names]
    if missing:
        raise DataError(f"{split_dir}: no {' and '.join(missing)} column; not an sft split")
    positions = list(ds["position_ids"]) if "position_ids" in ds.column_names else None
    return list(ds["input_ids"]), list(ds["labels"]), positions

