"""The prepare pipeline without MLflow: source -> clean -> filter -> scrub -> dedup -> split ->
tokenizer -> pack, written into a working folder.

Documents stream through in batches; the per-document work (cleaning, filters, PII, MinHash) runs
in ``num_proc`` worker processes while the main process keeps the dedup index and writes the raw
split files, so memory is bounded by the batch size plus the dedup index. The tokenizer then
streams the raw train split, and each split is tokenized and packed batch by batch into an Arrow
file that becomes a ``save_to_disk`` dataset.

PII is scrubbed before dedup and split so that a document scrubbed in an earlier prepared folder
(``dedup.against``) and the same document arriving again compare equal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from lifecycle.config import to_dict
from lifecycle.data import pii as pii_mod
from lifecycle.data.card import LengthHistogram, write_card
from lifecycle.data.clean import clean_text
from lifecycle.data.config import PrepareConfig
from lifecycle.data.dedup import Deduplicator, MinHasher, exact_key, normalize_for_hash
from lifecycle.data.pack import BlockPacker
from lifecycle.data.quality import FILTER_NAMES, first_failure
from lifecycle.data.raw import read_raw_texts
from lifecycle.data.sources import SourceStats, iter_documents
from lifecycle.data.split import SPLITS, assign_split
from lifecycle.data.tokenizer import (
    batched,
    check_block_size,
    check_eos,
    encode_batch,
    load_tokenizer,
    train_tokenizer,
)
from lifecycle.errors import DataError

log = logging.getLogger(__name__)

SAMPLE_CHARS = 600


@dataclass
class PipelineResult:
    """What the pipeline made: the card (also written to the folder) and drop samples."""

    card: dict[str, Any]
    drop_samples: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# -- per-document work (runs in workers) ------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: PrepareConfig) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["hasher"] = MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_size, cfg.seed) if cfg.dedup.near else None


def _sample(text: str, cfg: PrepareConfig) -> str:
    # Samples are for people to read: never show them unscrubbed PII.
    scrubbed, _ = pii_mod.scrub(text, cfg.pii.types)
    return scrubbed[:SAMPLE_CHARS]


def process_document(text: str, cfg: PrepareConfig, hasher: MinHasher | None) -> tuple:
    """Clean, filter and scrub one document; compute its dedup keys and split.

    Returns ``("drop", in_bytes, filter_name, sample)`` or ``("keep", in_bytes, line, chars,
    out_bytes, pii_counts, key, signature, split)`` where ``line`` is the document's UTF-8 JSON
    line for ``raw/<split>.jsonl``. Pure: no shared state, so it can run in any worker, and it
    does the encoding work so the single main process only decides and writes.
    """
    in_bytes = len(text.encode("utf-8"))
    if cfg.clean.enabled:
        text = clean_text(text, unicode_form=cfg.clean.unicode_form, strip_control=cfg.clean.strip_control,
                          normalize_whitespace=cfg.clean.normalize_whitespace)
    if not text.strip():
        return ("drop", in_bytes, "empty", "")
    if cfg.quality.enabled:
        failed = first_failure(text, cfg.quality)
        if failed is not None:
            return ("drop", in_bytes, failed, _sample(text, cfg))
    counts: dict[str, int] = {}
    if cfg.pii.mode != "off":
        scrubbed, counts = pii_mod.scrub(text, cfg.pii.types)
        if counts and cfg.pii.mode == "drop":
            return ("drop", in_bytes, "pii", scrubbed[:SAMPLE_CHARS])
        text = scrubbed
    norm = normalize_for_hash(text)  # shared by the exact key, the shingles and the split hash
    key = exact_key(text, norm) if cfg.dedup.exact else None
    sig = hasher.signature(text, norm) if hasher is not None else None
    split = assign_split(text, validation=cfg.split.validation, test=cfg.split.test, seed=cfg.seed,
                         normalized=norm)
    line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
    return ("keep", in_bytes, line, len(text), len(text.encode("utf-8")), counts, key, sig, split)


def _process_batch(texts: list[str]) -> list[tuple]:
    cfg = _WORKER["cfg"]
    hasher = _WORKER["hasher"]
    return [process_document(t, cfg, hasher) for t in texts]


def _reference_batch(texts: list[str]) -> list[tuple]:
    cfg = _WORKER["cfg"]
    hasher = _WORKER["hasher"]
    return [(exact_key(t) if cfg.dedup.exact else None, hasher.signature(t) if hasher else None) for t in texts]


class _Mapper:
    """``map`` over batches in-process (num_proc=1) or in a worker pool, keeping order."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.pool = None
        if cfg.num_proc > 1:
            ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() \
                else multiprocessing.get_context()
            self.pool = ctx.Pool(cfg.num_proc, initializer=_init_worker, initargs=(cfg,))
        else:
            _init_worker(cfg)

    def map(self, fn: Any, batches: Iterable[list[str]]) -> Iterator[list[tuple]]:
        """Results of ``fn`` per batch, in order.

        ``Pool.imap`` would read the whole input ahead into its task queue (unbounded memory);
        here at most ``2 * num_proc`` batches are in flight.
        """
        if self.pool is None:
            yield from map(fn, batches)
            return
        pending: deque[Any] = deque()
        limit = 2 * self.cfg.num_proc
        for batch in batches:
            pending.append(self.pool.apply_async(fn, (batch,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _progress(total: int | None = None, desc: str = "", unit: str = "doc") -> Any:
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI.
    return tqdm(total=total, desc=desc, unit=unit, disable=None, mininterval=1.0)


# -- the pipeline --------------------------------------------------------------------------------

def run_pipeline(cfg: PrepareConfig, workdir: Path, *, source_uri: str | None = None,
                 tokenizer_path: str | Path | None = None, reference_dir: Path | None = None) -> PipelineResult:
    """Prepare ``cfg.source`` into ``workdir`` (an empty folder); return the card and samples.

    ``tokenizer_path`` and ``reference_dir`` are local paths the caller resolved from URIs;
    ``source_uri`` is the source as the user named it (for the card).
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    tokenizer = None
    if tokenizer_path is not None:
        # Check the tokenizer first: a bad --tokenizer must fail before any long work.
        tokenizer = load_tokenizer(tokenizer_path)
        check_block_size(tokenizer, cfg.pack.block_size, str(cfg.tokenizer.name_or_path or tokenizer_path))
        check_eos(tokenizer)

    raw_dir = workdir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    stats = SourceStats()
    filters: Counter[str] = Counter({name: 0 for name in FILTER_NAMES})
    if cfg.pii.mode == "drop":
        filters["pii"] = 0
    dedup_counts: Counter[str] = Counter(exact=0, near=0, exact_against=0, near_against=0)
    pii_counts: Counter[str] = Counter()
    docs_with_pii = 0
    split_docs: Counter[str] = Counter({s: 0 for s in SPLITS})
    split_bytes: Counter[str] = Counter({s: 0 for s in SPLITS})
    samples: dict[str, list[str]] = {}
    hist = LengthHistogram()
    bytes_read = 0
    raw_hash = {s: hashlib.sha256() for s in SPLITS}

    dedup = Deduplicator(exact=cfg.dedup.exact, near=cfg.dedup.near, threshold=cfg.dedup.threshold,
                         num_perm=cfg.dedup.num_perm, seed=cfg.seed)
    mapper = _Mapper(cfg)
    reference_docs = 0
    try:
        if reference_dir is not None and (cfg.dedup.exact or cfg.dedup.near):
            t = time.perf_counter()
            reference_docs = dedup.add_reference(
                item for batch in mapper.map(_reference_batch, batched(_reference_texts(reference_dir), cfg.batch_size))
                for item in batch)
            seconds["reference"] = time.perf_counter() - t

        t = time.perf_counter()
        files = {s: (raw_dir / f"{s}.jsonl").open("wb") for s in SPLITS}
        try:
            bar = _progress(cfg.source.max_documents, "prepare: clean/filter/dedup")
            documents = iter_documents(cfg.source, stats)
            for results in mapper.map(_process_batch, batched(documents, cfg.batch_size)):
                for res in results:
                    bytes_read += res[1]
                    if res[0] == "drop":
                        filters[res[2]] += 1
                        _keep_sample(samples, res[2], res[3], cfg.drop_samples)
                        continue
                    _, _, line, chars, out_bytes, counts, key, sig, split = res
                    dup = dedup.check_and_add(key, sig) if (cfg.dedup.exact or cfg.dedup.near) else None
                    if dup is not None:
                        dedup_counts[dup] += 1
                        if len(samples.get(f"dedup_{dup}", ())) < cfg.drop_samples:
                            text = json.loads(line)["text"]
                            _keep_sample(samples, f"dedup_{dup}", text[:SAMPLE_CHARS], cfg.drop_samples)
                        continue
                    if counts:
                        pii_counts.update(counts)
                        docs_with_pii += 1
                    files[split].write(line)
                    raw_hash[split].update(line)
                    split_docs[split] += 1
                    split_bytes[split] += out_bytes
                    hist.add(chars)
                bar.update(len(results))
            bar.close()
        finally:
            for fh in files.values():
                fh.close()
        seconds["filter"] = time.perf_counter() - t
    finally:
        mapper.close()

    read = stats.documents
    kept = sum(split_docs.values())
    if read == 0:
        raise DataError(f"source {source_uri or cfg.source.uri} holds no documents")
    if kept == 0:
        took = {**{k: v for k, v in filters.items() if v}, **{f"dedup_{k}": v for k, v in dedup_counts.items() if v}}
        detail = ", ".join(f"{k} {v}" for k, v in sorted(took.items(), key=lambda kv: -kv[1]))
        raise DataError(f"all {read} documents were dropped ({detail}); loosen the filters with --set quality.<key>=...")
    if split_docs["train"] == 0:
        raise DataError(f"the train split is empty ({kept} documents kept); add documents or lower split fractions")

    # Tokenizer: trained on the train split only, so validation/test stay unseen.
    t = time.perf_counter()
    tok_dir = workdir / "tokenizer"
    trained = tokenizer is None
    if trained:
        tokenizer = train_tokenizer(batched(read_raw_texts(raw_dir / "train.jsonl"), 1000),
                                    vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency)
    tokenizer.save_pretrained(str(tok_dir))
    seconds["tokenizer"] = time.perf_counter() - t

    # Tokenize and pack each split.
    t = time.perf_counter()
    eos = check_eos(tokenizer)
    tokens: dict[str, int] = {}
    blocks: dict[str, int] = {}
    dropped_tail: dict[str, int] = {}
    warnings_: list[str] = []
    for split in SPLITS:
        n_tokens, n_blocks, tail = _pack_split(tokenizer, raw_dir / f"{split}.jsonl", workdir / split,
                                               cfg.pack.block_size, eos, cfg.batch_size, split_docs[split])
        tokens[split], blocks[split], dropped_tail[split] = n_tokens, n_blocks, tail
        if n_blocks == 0 and split == "train":
            raise DataError(f"the train split ({split_docs[split]} documents, {n_tokens} tokens) fills no block "
                            f"of {cfg.pack.block_size} tokens; add documents or use a smaller --block-size")
        if n_blocks == 0:
            # A small increment (continuous training) may leave a held-out split empty; the
            # card says so instead of failing, and later stages decide what that means.
            warnings_.append(f"the {split} split fills no block of {cfg.pack.block_size} tokens "
                             f"({split_docs[split]} documents)")
            log.warning(warnings_[-1])
    seconds["tokenize_pack"] = time.perf_counter() - t

    digest = _content_digest(raw_hash, tok_dir, cfg.pack.block_size)
    card: dict[str, Any] = {
        "format": "lm",
        "digest": digest,
        "block_size": cfg.pack.block_size,
        "vocab_size": len(tokenizer),
        "source": source_uri or cfg.source.uri,
        "counts": {
            "documents_read": read,
            "documents_kept": kept,
            "documents_dropped": read - kept,
            "bytes_read": bytes_read,
            "bytes_kept": sum(split_bytes.values()),
            "files": stats.files,
            "replaced_chars": stats.replaced_chars,
            "non_text_values": stats.non_text_values,
            "documents_with_pii": docs_with_pii,
        },
        "filters": dict(filters),
        "dedup": {**dict(dedup_counts), "reference_documents": reference_docs,
                  "threshold": cfg.dedup.threshold, "exact_enabled": cfg.dedup.exact, "near_enabled": cfg.dedup.near},
        "pii": {kind: int(pii_counts.get(kind, 0)) for kind in cfg.pii.types},
        "pii_mode": cfg.pii.mode,
        "splits": dict(split_docs),
        "split_bytes": dict(split_bytes),
        "tokens": tokens,
        "blocks": blocks,
        "dropped_tail_tokens": dropped_tail,
        "tokenizer": {
            "trained": trained,
            "from": None if trained else str(cfg.tokenizer.name_or_path or tokenizer_path),
            "class": type(tokenizer).__name__,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
        },
        "document_length_chars": hist.to_dict(),
        "warnings": warnings_,
        "config": to_dict(cfg),
    }
    if stats.files_with_replacements:
        card["counts"]["files_with_replacements"] = stats.files_with_replacements[:20]
    write_card(card, workdir)
    seconds["total"] = time.perf_counter() - t0
    return PipelineResult(card=card, drop_samples=samples, seconds=seconds)


def _keep_sample(samples: dict[str, list[str]], name: str, text: str, limit: int) -> None:
    bucket = samples.setdefault(name, [])
    if len(bucket) < limit:
        bucket.append(text)


def _reference_texts(folder: Path) -> Iterator[str]:
    raw = folder / "raw"
    files = [raw / f"{s}.jsonl" for s in SPLITS if (raw / f"{s}.jsonl").is_file()]
    if not files:
        raise DataError(f"--dedup-against {folder}: not a prepared data folder (no raw/*.jsonl)")
    for path in files:
        yield from read_raw_texts(path)


def _pack_split(tokenizer: Any, raw: Path, out: Path, block_size: int, eos: int, batch_size: int,
                n_docs: int) -> tuple[int, int, int]:
    """Tokenize ``raw`` and write packed blocks as a ``save_to_disk`` dataset at ``out``."""
    import pyarrow as pa
    from datasets import Dataset

    arrow_path = out.parent / f".{out.name}.arrow"
    schema = pa.schema([("input_ids", pa.list_(pa.int64()))])
    packer = BlockPacker(block_size, eos)
    bar = _progress(n_docs, f"prepare: tokenize {out.name}")
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for texts in batched(read_raw_texts(raw), batch_size):
            arr = packer.add(encode_batch(tokenizer, texts))
            bar.update(len(texts))
            if len(arr):
                offsets = pa.array(np.arange(0, arr.size + 1, block_size, dtype=np.int32))
                lists = pa.ListArray.from_arrays(offsets, pa.array(arr.reshape(-1)))
                writer.write_batch(pa.record_batch([lists], schema=schema))
    bar.close()
    ds = Dataset.from_file(str(arrow_path))
    # Our own bar already showed this split; datasets' "Saving the dataset" bar is noise.
    from datasets import utils as ds_tqdm

    was_disabled = ds_tqdm.are_progress_bars_disabled()
    ds_tqdm.disable_progress_bars()
    try:
        ds.save_to_disk(str(out))
    finally:
        if not was_disabled:
            ds_tqdm.enable_progress_bars()
    del ds
    arrow_path.unlink()
    return packer.tokens, packer.blocks, packer.remainder


def _content_digest(raw_hash: dict[str, Any], tok_dir: Path, block_size: int) -> str:
    """sha256 over the raw split texts, the tokenizer and the block size: same content, same digest."""
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(split.encode())
        h.update(raw_hash[split].digest())
    for name in sorted(p.name for p in tok_dir.iterdir() if p.is_file()):
        h.update(name.encode())
        h.update((tok_dir / name).read_bytes())
    h.update(f"block_size={block_size}".encode())
    return h.hexdigest()


def remove_tree(path: Path) -> None:
    """Remove a working folder, ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)
