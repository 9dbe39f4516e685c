"""The prepare pipeline without MLflow: source -> clean -> filter -> scrub -> dedup -> split ->
tokenizer -> pack, written into a working folder in one streaming pass.

Documents stream through in batches; the per-document work (cleaning, filters, PII) and the
batch-level numpy work (MinHash signatures and LSH band keys of the whole batch at once) run in
``num_proc`` worker processes, while the main process keeps the dedup index, writes the raw split
files and feeds the kept documents to a :class:`~lifecycle.data.pack.StreamingPacker`, which
trains the tokenizer on a bounded sample of the train split (``tokenizer.sample_bytes``), saves
it, has the workers tokenize later batches from the saved file (the Rust backend, one thread per
worker) and appends packed blocks, in order, to an Arrow file per split. Memory is bounded by
the batches in flight, the tokenizer sample and the dedup index.

PII is scrubbed before dedup and split so that a document scrubbed in an earlier prepared folder
(``dedup.against``) and the same document arriving again compare equal.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from lifecycle.config import to_dict
from lifecycle.data import pii as pii_mod
from lifecycle.data.card import write_card
from lifecycle.data.clean import clean_text
from lifecycle.data.config import PrepareConfig
from lifecycle.data.dedup import MinHasher, band_keys, exact_key, lsh_params, normalize_for_hash
from lifecycle.data.pack import StreamingPacker
from lifecycle.data.quality import first_failure
from lifecycle.data.sources import SourceStats, iter_documents
from lifecycle.data.split import SPLITS, assign_split
from lifecycle.data.tally import PassTally, card_tokenizer, keep_sample, reference_texts
from lifecycle.data.tokenizer import batched, check_block_size, check_eos, load_tokenizer, sample_bytes
from lifecycle.errors import DataError

log = logging.getLogger(__name__)

SAMPLE_CHARS = 600
#: input characters in flight to the workers (beyond the first 2 * num_proc batches).
INFLIGHT_CHARS = 32_000_000


@dataclass
class PipelineResult:
    """What the pipeline made: the card (also written to the folder) and drop samples."""

    card: dict[str, Any]
    drop_samples: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# -- per-document work (runs in workers) ------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: PrepareConfig, forked: bool = False) -> None:
    if forked:
        # A forked child must not use the Rust thread pool it inherited (tokenizers deadlocks,
        # even when TOKENIZERS_PARALLELISM=true asks for it); the processes are the parallelism.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["cfg"] = cfg
    _WORKER["hasher"] = MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_size, cfg.seed) if cfg.dedup.near else None
    _WORKER["bands"] = lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm) if cfg.dedup.near else None


def _sample(text: str, cfg: PrepareConfig) -> str:
    # Samples are for people to read: never show them unscrubbed PII.
    scrubbed, _ = pii_mod.scrub(text, cfg.pii.types)
    return scrubbed[:SAMPLE_CHARS]


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


@dataclass
class BatchResult:
    """What the workers send back for one batch: totals, drops, and the kept documents column-wise.

    Columns rather than a tuple per document: fewer objects to pickle, and the dedup keys of the
    whole batch travel as one ``(n, bands)`` array.
    """

    in_bytes: int
    drops: list[tuple[str, str]]  # (filter name, sample), in input order
    texts: list[str]
    lines: list[bytes]  # UTF-8 JSON line of each kept text for raw/<split>.jsonl
    out_bytes: list[int]
    pii: list[dict[str, int]]
    keys: list[bytes] | None
    bands: np.ndarray | None
    splits: list[str]


def screen_document(text: str, cfg: PrepareConfig) -> tuple[str | None, str, dict[str, int]]:
    """Clean, filter and scrub one document.

    Returns ``(None, text, pii_counts)`` for a document to keep (``text`` cleaned and scrubbed),
    or ``(filter_name, sample, {})`` for one to drop.
    """
    if cfg.clean.enabled:
        text = clean_text(text, unicode_form=cfg.clean.unicode_form, strip_control=cfg.clean.strip_control,
                          normalize_whitespace=cfg.clean.normalize_whitespace)
    if not text.strip():
        return ("empty", "", {})
    if cfg.quality.enabled:
        failed = first_failure(text, cfg.quality)
        if failed is not None:
            return (failed, _sample(text, cfg), {})
    counts: dict[str, int] = {}
    if cfg.pii.mode != "off":
        scrubbed, counts = pii_mod.scrub(text, cfg.pii.types)
        if counts and cfg.pii.mode == "drop":
            return ("pii", scrubbed[:SAMPLE_CHARS], {})
        text = scrubbed
    return (None, text, counts)


def process_batch(texts: list[str], cfg: PrepareConfig, hasher: MinHasher | None,
                  bands: tuple[int, int] | None = None) -> BatchResult:
    """Screen a batch of documents, then compute dedup keys and splits of the kept ones.

    Pure: no shared state, so it can run in any worker, and it does the encoding work so the
    single main process only decides and writes. ``bands`` is the LSH (bands, rows) layout.
    """
    in_bytes = 0
    drops: list[tuple[str, str]] = []
    kept: list[str] = []
    pii: list[dict[str, int]] = []
    for text in texts:
        in_bytes += _utf8_len(text)
        failed, text, counts = screen_document(text, cfg)
        if failed is not None:
            drops.append((failed, text))
            continue
        kept.append(text)
        pii.append(counts)
    # One normalised form per document is shared by the exact key, the shingles and the split.
    norms = [normalize_for_hash(t) for t in kept]
    keys = [exact_key(t, n) for t, n in zip(kept, norms)] if cfg.dedup.exact else None
    band_array = None
    if hasher is not None and kept:
        b, r = bands or lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
        band_array = band_keys(hasher.signatures(norms), b, r)
    splits = [assign_split(t, validation=cfg.split.validation, test=cfg.split.test, seed=cfg.seed, normalized=n)
              for t, n in zip(kept, norms)]
    # Byte for byte what json.dumps({"text": t}, ensure_ascii=False) writes, without its per-call setup.
    lines = [('{"text": ' + encode_basestring(t) + "}\n").encode("utf-8") for t in kept]
    return BatchResult(in_bytes=in_bytes, drops=drops, texts=kept, lines=lines, out_bytes=list(map(_utf8_len, kept)),
                       pii=pii, keys=keys, bands=band_array, splits=splits)


def _process_batch(texts: list[str]) -> BatchResult:
    return process_batch(texts, _WORKER["cfg"], _WORKER["hasher"], _WORKER["bands"])


def _reference_batch(texts: list[str]) -> list[tuple]:
    cfg = _WORKER["cfg"]
    hasher = _WORKER["hasher"]
    keys = [exact_key(t) for t in texts] if cfg.dedup.exact else [None] * len(texts)
    if hasher is None or not texts:
        return [(k, None) for k in keys]
    band_lists = band_keys(hasher.signatures([normalize_for_hash(t) for t in texts]), *_WORKER["bands"]).tolist()
    return [(k, None, b) for k, b in zip(keys, band_lists)]


class _Mapper:
    """``map`` over batches in-process (num_proc=1) or in a worker pool, keeping order."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.pool = None
        if cfg.num_proc > 1:
            ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() \
                else multiprocessing.get_context()
            self.pool = ctx.Pool(cfg.num_proc, initializer=_init_worker, initargs=(cfg, True))
        else:
            _init_worker(cfg)

    def map(self, fn: Any, batches: Iterable[list[str]]) -> Iterator[Any]:
        """Results of ``fn`` per batch, in order.

        ``Pool.imap`` would read the whole input ahead into its task queue (unbounded memory).
        Here up to ``8 * num_proc`` batches are in flight, enough that the workers keep going
        while the main process trains the tokenizer or encodes a batch, but never more than
        :data:`INFLIGHT_CHARS` characters of input beyond ``2 * num_proc`` batches: long
        documents get a smaller window, not more memory.
        """
        if self.pool is None:
            yield from map(fn, batches)
            return
        pending: deque[tuple[Any, int]] = deque()
        chars = 0
        most, least = 8 * self.cfg.num_proc, 2 * self.cfg.num_proc
        for batch in batches:
            size = sum(map(len, batch))
            pending.append((self.pool.apply_async(fn, (batch,)), size))
            chars += size
            while len(pending) >= most or (len(pending) > least and chars > INFLIGHT_CHARS):
                result, size = pending.popleft()
                chars -= size
                yield result.get()
        while pending:
            yield pending.popleft()[0].get()

    def submit(self, fn: Any, args: tuple) -> Any:
        """Run ``fn(*args)`` in a worker; the pool's ``AsyncResult``."""
        return self.pool.apply_async(fn, args)

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
    tally = PassTally.start(cfg)
    # Locals for the per-document loop below (no attribute lookups on the hot path).
    filters, dedup_counts, pii_counts = tally.filters, tally.dedup_counts, tally.pii_counts
    split_docs, split_bytes, samples, hist, dedup = (tally.split_docs, tally.split_bytes, tally.samples,
                                                     tally.hist, tally.dedup)
    docs_with_pii = 0
    bytes_read = 0
    raw_hash = {s: hashlib.sha256() for s in SPLITS}

    dedup_on = cfg.dedup.exact or cfg.dedup.near
    reference_docs = 0
    packer = None
    try:
        mapper = _Mapper(cfg)
        try:
            # The tokenizer is trained on the train split only, so validation/test stay unseen.
            # With workers, they also encode (from the saved tokenizer) while this process filters.
            packer = StreamingPacker(workdir, SPLITS, block_size=cfg.pack.block_size, batch_size=cfg.batch_size,
                                     tokenizer=tokenizer, vocab_size=cfg.tokenizer.vocab_size,
                                     min_frequency=cfg.tokenizer.min_frequency,
                                     sample_bytes=sample_bytes(cfg.tokenizer.sample_bytes, cfg.tokenizer.vocab_size),
                                     submit=mapper.submit if mapper.pool is not None else None,
                                     max_pending=2 * cfg.num_proc)
            if reference_dir is not None and dedup_on:
                t = time.perf_counter()
                reference_docs = dedup.add_reference(
                    item for batch in mapper.map(_reference_batch, batched(reference_texts(reference_dir), cfg.batch_size))
                    for item in batch)
                seconds["reference"] = time.perf_counter() - t

            t = time.perf_counter()
            files = {s: (raw_dir / f"{s}.jsonl").open("wb") for s in SPLITS}
            try:
                bar = _progress(cfg.source.max_documents, "prepare")
                documents = iter_documents(cfg.source, stats)
                for res in mapper.map(_process_batch, batched(documents, cfg.batch_size)):
                    bytes_read += res.in_bytes
                    for name, sample in res.drops:
                        filters[name] += 1
                        keep_sample(samples, name, sample, cfg.drop_samples)
                    bands = res.bands.tolist() if res.bands is not None else None
                    out: dict[str, list[int]] = {s: [] for s in SPLITS}  # kept indices per split
                    for i, split in enumerate(res.splits):
                        if dedup_on:
                            dup = dedup.check_and_add(res.keys[i] if res.keys is not None else None, None,
                                                      bands[i] if bands is not None else None)
                            if dup is not None:
                                dedup_counts[dup] += 1
                                keep_sample(samples, f"dedup_{dup}", res.texts[i][:SAMPLE_CHARS], cfg.drop_samples)
                                continue
                        if res.pii[i]:
                            pii_counts.update(res.pii[i])
                            docs_with_pii += 1
                        out[split].append(i)
                        split_bytes[split] += res.out_bytes[i]
                        hist.add(len(res.texts[i]))
                    for split, idx in out.items():
                        if not idx:
                            continue
                        blob = b"".join([res.lines[i] for i in idx])
                        files[split].write(blob)
                        raw_hash[split].update(blob)
                        split_docs[split] += len(idx)
                        packer.add(split, [res.texts[i] for i in idx], [res.out_bytes[i] for i in idx])
                    bar.update(len(res.drops) + len(res.texts))
                bar.close()
            finally:
                for fh in files.values():
                    fh.close()
            seconds["filter"] = time.perf_counter() - t

            read = stats.documents
            kept = tally.check(read, source_uri or cfg.source.uri)

            t = time.perf_counter()
            packed = packer.finish()
            finish_seconds = time.perf_counter() - t
        finally:
            mapper.close()
    except BaseException:
        if packer is not None:
            packer.abort()
        raise
    tokenizer = packer.tokenizer
    tok_dir = packer.tokenizer_dir  # saved there as soon as it existed
    trained = packer.trained
    # Tokenizing and packing ran inside the pass: its time is reported apart from filtering.
    seconds["tokenizer"] = packer.seconds["tokenizer"]
    seconds["tokenize_pack"] = packer.seconds["tokenize_pack"]
    seconds["filter"] = max(0.0, seconds["filter"] - (packer.seconds["tokenizer"] + packer.seconds["tokenize_pack"]
                                                      - finish_seconds))

    tokens: dict[str, int] = {}
    blocks: dict[str, int] = {}
    dropped_tail: dict[str, int] = {}
    warnings_: list[str] = []
    for split in SPLITS:
        n_tokens, n_blocks, tail = packed[split]
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

    digest = _content_digest(raw_hash, tok_dir, cfg.pack.block_size)
    card: dict[str, Any] = {
        "format": "lm",
        "digest": digest,
        "block_size": cfg.pack.block_size,
        "vocab_size": len(tokenizer),
        "source": source_uri or cfg.source.uri,
        "counts": tally.card_counts(read, kept, bytes_read, stats, docs_with_pii),
        "filters": dict(filters),
        "dedup": tally.card_dedup(cfg, reference_docs),
        "pii": tally.card_pii(cfg),
        "pii_mode": cfg.pii.mode,
        "splits": dict(split_docs),
        "split_bytes": dict(split_bytes),
        "tokens": tokens,
        "blocks": blocks,
        "dropped_tail_tokens": dropped_tail,
        # trained_on_bytes: the train text the BPE learned from (the first bytes, up to tokenizer.sample_bytes).
        "tokenizer": card_tokenizer(tokenizer, trained=trained, source=str(cfg.tokenizer.name_or_path or tokenizer_path),
                                    trained_on_bytes=packer.sample_used),
        "document_length_chars": hist.to_dict(),
        "warnings": warnings_,
        "config": to_dict(cfg),
    }
    if stats.files_with_replacements:
        card["counts"]["files_with_replacements"] = stats.files_with_replacements[:20]
    write_card(card, workdir)
    seconds["total"] = time.perf_counter() - t0
    return PipelineResult(card=card, drop_samples=samples, seconds=seconds)


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
