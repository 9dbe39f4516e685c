"""Pack token ids into fixed-length blocks with EOS after every document.

A stream of documents becomes one long token stream ``doc1 EOS doc2 EOS ...`` cut into blocks of
exactly ``block_size`` ids; the last partial block is dropped (and counted), as in run_clm.py,
so every row has the same length and no padding enters the loss. :class:`StreamingPacker` does
tokenizer training, tokenizing and packing of all splits inside the prepare stage's single pass.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np


class BlockPacker:
    """Accumulates token ids and yields full blocks as ``(n, block_size)`` int64 arrays."""

    def __init__(self, block_size: int, eos_id: int):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.eos_id = eos_id
        self._rest = np.empty(0, dtype=np.int64)
        self.tokens = 0  # tokens fed, EOS included
        self.blocks = 0

    def add(self, docs: Iterable[Sequence[int]]) -> np.ndarray:
        """Add the token ids of some documents; return the blocks that became full."""
        arrays = [np.asarray(ids, dtype=np.int64) for ids in docs]
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
        return self.add_flat(flat, lengths)

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """:meth:`add` for documents given as one flat id array and the length of each."""
        stream = np.empty(len(flat) + len(lengths), dtype=np.int64)
        eos_at = np.cumsum(np.asarray(lengths, dtype=np.int64) + 1) - 1  # EOS right after each document
        is_id = np.ones(len(stream), dtype=bool)
        is_id[eos_at] = False
        stream[is_id] = flat
        stream[eos_at] = self.eos_id
        self.tokens += len(stream)
        buf = np.concatenate([self._rest, stream]) if len(self._rest) else stream
        n = len(buf) // self.block_size
        cut = n * self.block_size
        self._rest = buf[cut:].copy()
        self.blocks += n
        return buf[:cut].reshape(n, self.block_size)

    @property
    def remainder(self) -> int:
        """Tokens left over that do not fill a block (dropped at the end)."""
        return len(self._rest)


def save_arrow_dataset(arrow_path: Path, out: Path) -> None:
    """Save the Arrow stream file ``arrow_path`` as a ``save_to_disk`` dataset at ``out``, then remove the file."""
    from datasets import Dataset
    from datasets import utils as ds_utils

    ds = Dataset.from_file(str(arrow_path))
    # Our own bar already showed this split; datasets' "Saving the dataset" bar is noise.
    was_disabled = ds_utils.are_progress_bars_disabled()
    ds_utils.disable_progress_bars()
    try:
        ds.save_to_disk(str(out))
    finally:
        if not was_disabled:
            ds_utils.enable_progress_bars()
    del ds
    arrow_path.unlink()


class ArrowBlockSink:
    """Streams the packed blocks of one split into an Arrow file, then saves it as a dataset.

    The blocks go to disk as they fill (memory holds one batch), and :meth:`close` turns the
    file into a ``save_to_disk`` folder with one ``input_ids`` column.
    """

    def __init__(self, tmp_path: Path, block_size: int, eos_id: int):
        import pyarrow as pa

        self._pa = pa
        self.tmp_path = tmp_path
        self.block_size = block_size
        self.packer = BlockPacker(block_size, eos_id)
        self._schema = pa.schema([("input_ids", pa.list_(pa.int64()))])
        self._sink = pa.OSFile(str(tmp_path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self._schema)

    def add(self, docs: list[list[int]]) -> None:
        """Pack the token ids of some documents and write the blocks that became full."""
        self._write(self.packer.add(docs))

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """:meth:`add` for documents given as one flat id array and the length of each."""
        self._write(self.packer.add_flat(flat, lengths))

    def _write(self, arr: np.ndarray) -> None:
        pa = self._pa
        if len(arr):
            offsets = pa.array(np.arange(0, arr.size + 1, self.block_size, dtype=np.int32))
            lists = pa.ListArray.from_arrays(offsets, pa.array(arr.reshape(-1)))
            self._writer.write_batch(pa.record_batch([lists], schema=self._schema))

    def close(self, out: Path) -> tuple[int, int, int]:
        """Save the blocks as a dataset at ``out``; return (tokens, blocks, dropped tail tokens)."""
        self._writer.close()
        self._sink.close()
        save_arrow_dataset(self.tmp_path, out)
        return self.packer.tokens, self.packer.blocks, self.packer.remainder

    def abort(self) -> None:
        """Close and remove the temporary file (the pipeline failed)."""
        for closer in (self._writer.close, self._sink.close):
            try:
                closer()
            except Exception:  # noqa: BLE001 - already closed or broken: nothing left to save
                pass
        self.tmp_path.unlink(missing_ok=True)


class StreamingPacker:
    """Tokenizes and packs the kept documents of every split while the corpus streams past.

    Given a tokenizer, documents are encoded in batches as they arrive. Without one, they wait
    in memory until the train split has supplied ``sample_bytes`` of text (or the stream ends);
    a byte-level BPE is trained on exactly that sample (the first train documents, in order), and
    then every waiting and later document is encoded. The tokenizer thus learns from a bounded
    sample, memory stays bounded by it, and no split is read back from disk after filtering.

    The tokenizer is saved to ``workdir/tokenizer`` as soon as it exists. With ``submit`` (a
    worker pool's ``apply_async``), batches are encoded by the workers from that file while the
    main process goes on filtering, and their results are packed in order; without it, here.
    """

    def __init__(self, workdir: Path, splits: Sequence[str], *, block_size: int, batch_size: int,
                 tokenizer: Any = None, vocab_size: int = 8192, min_frequency: int = 2,
                 sample_bytes: int | None = None, submit: Callable[..., Any] | None = None,
                 max_pending: int = 4):
        self.workdir = workdir
        self.tokenizer_dir = workdir / "tokenizer"
        self.splits = tuple(splits)
        self.block_size = block_size
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.trained = tokenizer is None
        self.vocab_size = vocab_size
        self.min_frequency = min_frequency
        self.sample_bytes = sample_bytes
        self.submit = submit
        self.max_pending = max_pending
        #: bytes of train text the tokenizer was trained on (None: reused tokenizer).
        self.sample_used: int | None = None
        self.seconds = {"tokenizer": 0.0, "tokenize_pack": 0.0}
        self._waiting: dict[str, list[str]] = {s: [] for s in self.splits}
        self._pending: dict[str, deque[Any]] = {s: deque() for s in self.splits}
        self._train_bytes = 0
        self._sinks: dict[str, ArrowBlockSink] = {}
        self._file: str | None = None
        if tokenizer is not None:
            self._ready()

    def add(self, split: str, texts: list[str], sizes: Sequence[int] | None = None) -> None:
        """Take the kept documents of ``split``; ``sizes`` are their UTF-8 lengths (counted for
        train while the tokenizer is still to be trained; computed when not given)."""
        if self.tokenizer is None and split == "train" and texts:
            sizes = list(sizes) if sizes is not None else [len(t.encode("utf-8")) for t in texts]
            cut = len(texts)
            if self.sample_bytes is not None:
                # The sample ends with the document that fills it, maybe inside this batch.
                cumulative = list(accumulate(sizes))
                cut = min(len(texts), bisect.bisect_left(cumulative, self.sample_bytes - self._train_bytes) + 1)
            self._train_bytes += sum(sizes[:cut])
            self._waiting[split].extend(texts[:cut])
            if self.sample_bytes is not None and self._train_bytes >= self.sample_bytes:
                self._train()
            texts = texts[cut:]
        if not texts:
            return
        self._waiting[split].extend(texts)
        if self.tokenizer is not None and len(self._waiting[split]) >= self.batch_size:
            self._flush(split)

    def finish(self) -> dict[str, tuple[int, int, int]]:
        """Encode what waits, save every split; (tokens, blocks, dropped tail) per split."""
        if self.tokenizer is None:
            self._train()
        results = {}
        for split in self.splits:
            self._flush(split)
            t = time.perf_counter()
            self._drain(split, wait=True)
            results[split] = self._sinks[split].close(self.workdir / split)
            self.seconds["tokenize_pack"] += time.perf_counter() - t
        return results

    def abort(self) -> None:
        """Drop the temporary files (the pipeline failed)."""
        for sink in self._sinks.values():
            sink.abort()

    def _train(self) -> None:
        from lifecycle.data.tokenizer import (
            FIT_CHECK_BYTES,
            batched,
            choose_block,
            choose_vocab,
            encode_batch,
            fit_block,
            train_tokenizer,
        )

        t = time.perf_counter()
        self.sample_used = self._train_bytes
        # vocab_size 0: --vocab-size auto, sized by the train text read so far (all of it: no sample);
        # block_size 0: --block-size auto, the same way (a tokenizer trained here always reads all of it).
        vocab = self.vocab_size or choose_vocab(self._train_bytes)
        auto_block = not self.block_size
        if auto_block:
            self.block_size = choose_block(self._train_bytes)
        self.tokenizer = train_tokenizer(batched(self._waiting["train"], 1000), vocab_size=vocab,
                                         min_frequency=self.min_frequency)
        if auto_block and self._train_bytes < FIT_CHECK_BYTES:
            # Every split still waits here (nothing is encoded before the tokenizer exists): count them.
            tokens = {split: sum(len(ids) + 1 for ids in encode_batch(self.tokenizer, texts))
                      for split, texts in self._waiting.items()}
            self.block_size = fit_block(self.block_size, tokens)
        self.seconds["tokenizer"] += time.perf_counter() - t
        self._ready()
        for split in self.splits:
            self._flush(split)

    def _ready(self) -> None:
        from lifecycle.data.tokenizer import check_eos

        eos = check_eos(self.tokenizer)
        self.tokenizer.save_pretrained(str(self.tokenizer_dir))
        file = self.tokenizer_dir / "tokenizer.json"
        # Workers can encode only what tokenizer.json fully describes: a fast tokenizer.
        if self.submit is not None and getattr(self.tokenizer, "is_fast", False) and file.is_file():
            self._file = str(file)
        for split in self.splits:
            self._sinks[split] = ArrowBlockSink(self.workdir / f".{split}.arrow", self.block_size, eos)

    def _flush(self, split: str) -> None:
        from lifecycle.data.tokenizer import encode_batch, encode_with_file

        texts = self._waiting[split]
        if not texts:
            return
        t = time.perf_counter()
        self._waiting[split] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            if self._file is not None:
                self._pending[split].append(self.submit(encode_with_file, (chunk, self._file)))
                self._drain(split)
            else:
                self._sinks[split].add(encode_batch(self.tokenizer, chunk))
        self.seconds["tokenize_pack"] += time.perf_counter() - t

    def _drain(self, split: str, wait: bool = False) -> None:
        """Pack the worker results that are done, in order (all of them with ``wait``)."""
        pending = self._pending[split]
        while pending and (wait or len(pending) > self.max_pending or pending[0].ready()):
            self._sinks[split].add_flat(*pending.popleft().get())
