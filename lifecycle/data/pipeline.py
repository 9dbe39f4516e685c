"""The prepare pass without MLflow: source -> clean -> filter -> scrub -> dedup -> split -> tokenizer ->
encode, written into a working folder in one streaming pass, for every data format.

Items (documents, or instruction examples) stream through in batches; the per-item work of the
format (cleaning, filters, PII, rendering) and the batch-level numpy work (MinHash signatures and
LSH band keys of the whole batch at once) run in ``num_proc`` worker processes, while the main
process keeps the dedup index, writes the raw split files and hands the kept texts to the format.
Raw text (:class:`~lifecycle.data.lm.LmFormat`) packs them into blocks inside the pass, training
the tokenizer on a bounded sample of the train split and having the workers tokenize later
batches; instruction data (:class:`~lifecycle.data.sft.SftFormat`) encodes its examples after the
pass. Memory is bounded by the batches in flight, the tokenizer sample and the dedup index.

PII is scrubbed before dedup and split so that a document scrubbed in an earlier prepared folder
(``dedup.against``) and the same document arriving again compare equal.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import numpy as np

from lifecycle.config import to_dict
from lifecycle.data.card import write_card
from lifecycle.data.config import PrepareConfig
from lifecycle.data.dedup import MinHasher, band_keys, exact_key, lsh_params, normalize_for_hash
from lifecycle.data.lm import LmFormat
from lifecycle.data.sft import SftFormat
from lifecycle.data.sources import SourceStats
from lifecycle.data.split import SPLITS, assign_split
from lifecycle.data.tally import SAMPLE_CHARS, FormatResult, PassTally, card_tokenizer, keep_sample, reference_texts
from lifecycle.data.tokenizer import batched, check_block_size, check_eos, load_tokenizer
from lifecycle.secrets import mask_secrets

log = logging.getLogger(__name__)

#: input characters in flight to the workers (beyond the first 2 * num_proc batches).
INFLIGHT_CHARS = 32_000_000

DataFormat = Union[LmFormat, SftFormat]
FORMATS: dict[str, type[LmFormat] | type[SftFormat]] = {"lm": LmFormat, "sft": SftFormat}


@dataclass
class PipelineResult:
    """What the pass made: the card (also written to the folder) and drop samples."""

    card: dict[str, Any]
    drop_samples: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# -- per-item work (runs in workers) ------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: PrepareConfig, fmt: DataFormat, forked: bool = False) -> None:
    if forked:
        # A forked child must not use the Rust thread pool it inherited (tokenizers deadlocks,
        # even when TOKENIZERS_PARALLELISM=true asks for it); the processes are the parallelism.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["cfg"] = cfg
    _WORKER["format"] = fmt
    _WORKER["hasher"] = MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_size, cfg.seed) if cfg.dedup.near else None
    _WORKER["bands"] = lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm) if cfg.dedup.near else None


@dataclass
class BatchResult:
    """What the workers send back for one batch: totals, drops, and the kept texts column-wise.

    Columns rather than a tuple per item: fewer objects to pickle, and the dedup keys of the
    whole batch travel as one ``(n, bands)`` array.
    """

    in_bytes: int
    drops: list[tuple[str, str, int]]  # (filter name, sample, input bytes), in input order
    texts: list[str]  # what dedup, split and the format judge (a rendered example for sft)
    lines: list[bytes]  # UTF-8 JSON line of each kept item for raw/<split>.jsonl
    out_bytes: list[int]
    pii: list[dict[str, int]]
    keys: list[bytes] | None
    bands: np.ndarray | None
    splits: list[str]
    layouts: Counter[str] = field(default_factory=Counter)


def process_batch(items: list[Any], cfg: PrepareConfig, fmt: DataFormat, hasher: MinHasher | None,
                  bands: tuple[int, int] | None = None) -> BatchResult:
    """Screen a batch of items with ``fmt``, then compute dedup keys and splits of the kept ones.

    Pure: no shared state, so it can run in any worker, and it does the encoding work so the
    single main process only decides and writes. ``bands`` is the LSH (bands, rows) layout.
    """
    in_bytes = 0
    drops: list[tuple[str, str, int]] = []
    kept: list[str] = []
    rows: list[Any] = []
    pii: list[dict[str, int]] = []
    layouts: Counter[str] = Counter()
    for item in items:
        layout = fmt.layout(item)
        if layout is not None:
            layouts[layout] += 1
        failed, text, counts, size, row = fmt.screen(item)
        in_bytes += size
        if failed is not None:
            drops.append((failed, text, size))
            continue
        kept.append(text)
        pii.append(counts)
        rows.append(row)
    # One normalised form per text is shared by the exact key, the shingles and the split.
    norms = [normalize_for_hash(t) for t in kept]
    keys = [exact_key(t, n) for t, n in zip(kept, norms)] if cfg.dedup.exact else None
    band_array = None
    if hasher is not None and kept:
        b, r = bands or lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
        band_array = band_keys(hasher.signatures(norms), b, r)
    splits = [assign_split(t, validation=cfg.split.validation, test=cfg.split.test, seed=cfg.seed, normalized=n)
              for t, n in zip(kept, norms)]
    return BatchResult(in_bytes=in_bytes, drops=drops, texts=kept, lines=fmt.lines(kept, rows),
                       out_bytes=fmt.sizes(kept), pii=pii, keys=keys, bands=band_array, splits=splits, layouts=layouts)


def _process_batch(items: list[Any]) -> BatchResult:
    return process_batch(items, _WORKER["cfg"], _WORKER["format"], _WORKER["hasher"], _WORKER["bands"])


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

    def __init__(self, cfg: PrepareConfig, fmt: DataFormat):
        self.cfg = cfg
        self.pool = None
        if cfg.num_proc > 1:
            ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() \
                else multiprocessing.get_context()
            self.pool = ctx.Pool(cfg.num_proc, initializer=_init_worker, initargs=(cfg, fmt, True))
        else:
            _init_worker(cfg, fmt)

    def map(self, fn: Any, batches: Iterable[list[Any]]) -> Iterator[Any]:
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
        """Stop the workers (at the end of the pass or when it fails)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _progress(total: int | None = None, desc: str = "", unit: str = "doc") -> Any:
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI.
    return tqdm(total=total, desc=desc, unit=unit, disable=None, mininterval=1.0)


# -- the pass ----------------------------------------------------------------------------------------

def prepare_folder(cfg: PrepareConfig, workdir: Path, *, data_format: str = "lm", source_uri: str | None = None,
                   tokenizer_path: str | Path | None = None, reference_dir: Path | None = None) -> PipelineResult:
    """Prepare ``cfg.source`` as ``data_format`` (``lm`` or ``sft``) into ``workdir`` (an empty folder).

    Returns the card (also written to ``workdir``) and drop samples. ``tokenizer_path`` and
    ``reference_dir`` are local paths the caller resolved from URIs; ``source_uri`` is the source
    as the user named it (for the card).
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    tokenizer = None
    if tokenizer_path is not None:
        # Check the tokenizer first: a bad --tokenizer must fail before any long work.
        tokenizer = load_tokenizer(tokenizer_path)
        check_block_size(tokenizer, cfg.pack.block_size, str(cfg.tokenizer.name_or_path or tokenizer_path))
        check_eos(tokenizer)
    fmt = FORMATS[data_format](cfg, tokenizer)

    raw_dir = workdir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    stats = SourceStats()
    tally = PassTally.start(cfg, fmt.terms.extra_filters)
    # Locals for the per-item loop below (no attribute lookups on the hot path).
    filters, dedup_counts, pii_counts = tally.filters, tally.dedup_counts, tally.pii_counts
    filter_bytes = tally.filter_bytes
    split_docs, split_bytes, samples, hist, dedup = (tally.split_docs, tally.split_bytes, tally.samples,
                                                     tally.hist, tally.dedup)
    layouts: Counter[str] = Counter()
    docs_with_pii = 0
    bytes_read = 0
    raw_hash = {s: hashlib.sha256() for s in SPLITS}
    dedup_on = cfg.dedup.exact or cfg.dedup.near
    reference_docs = 0
    try:
        mapper = _Mapper(cfg, fmt)
        try:
            fmt.start(workdir, mapper.submit if mapper.pool is not None else None, 2 * cfg.num_proc)
            if reference_dir is not None and dedup_on:
                t = time.perf_counter()
                reference = batched(reference_texts(reference_dir), cfg.batch_size)
                reference_docs = dedup.add_reference(
                    item for batch in mapper.map(_reference_batch, reference) for item in batch)
                seconds["reference"] = time.perf_counter() - t

            t = time.perf_counter()
            files = {s: (raw_dir / f"{s}.jsonl").open("wb") for s in SPLITS}
            try:
                bar = _progress(cfg.source.max_documents, f"prepare ({fmt.terms.name})", unit=fmt.terms.noun[:-1])
                for res in mapper.map(_process_batch, batched(fmt.items(stats), cfg.batch_size)):
                    bytes_read += res.in_bytes
                    layouts.update(res.layouts)
                    for name, sample, size in res.drops:
                        filters[name] += 1
                        filter_bytes[name] += size
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
                        fmt.add(split, [res.texts[i] for i in idx], [res.out_bytes[i] for i in idx])
                    bar.update(len(res.drops) + len(res.texts))
                bar.close()
            finally:
                for fh in files.values():
                    fh.close()
            seconds["filter"] = time.perf_counter() - t

            read = stats.documents
            tally.check(read, source_uri or cfg.source.uri, fmt.terms)
            done = fmt.finish(workdir, dict(split_docs), {s: h.digest() for s, h in raw_hash.items()})
        finally:
            mapper.close()
    except BaseException:
        fmt.abort()
        raise
    seconds.update(done.seconds)
    seconds["filter"] = max(0.0, seconds["filter"] - done.in_pass)
    for warning in [*done.warnings, *tally.quality_warnings(cfg, bytes_read)]:
        log.warning(warning)
    card = _card(cfg, fmt.terms.name, done, tally, stats, source=source_uri or cfg.source.uri, bytes_read=bytes_read,
                 with_pii=docs_with_pii, reference_docs=reference_docs,
                 tokenizer_from=str(cfg.tokenizer.name_or_path or tokenizer_path), tok_dir=workdir / "tokenizer")
    if "sft" in card:
        card["sft"]["layouts"] = dict(layouts)
    write_card(card, workdir)
    seconds["total"] = time.perf_counter() - t0
    return PipelineResult(card=card, drop_samples=samples, seconds=seconds)


def _card(cfg: PrepareConfig, data_format: str, done: FormatResult, tally: PassTally, stats: SourceStats, *,
          source: str, bytes_read: int, with_pii: int, reference_docs: int, tokenizer_from: str,
          tok_dir: Path) -> dict[str, Any]:
    """The data card of a finished pass."""
    kept = sum(done.splits.values())
    card: dict[str, Any] = {
        "format": data_format,
        "digest": content_digest(done.raw_hash, tok_dir, prefix=done.digest_prefix,
                                 settings=done.digest_settings),
        "block_size": done.block_size or cfg.pack.block_size,
        "vocab_size": len(done.tokenizer),
        "source": mask_secrets(source),  # the card is an artifact: no credentials in it
        "counts": tally.card_counts(stats.documents, kept, bytes_read, stats, with_pii),
        "filters": {**dict(tally.filters), **done.filters},
        "quality": tally.card_quality(cfg, bytes_read),
        "dedup": tally.card_dedup(cfg, reference_docs),
        "pii": tally.card_pii(cfg),
        "pii_mode": cfg.pii.mode,
        "splits": dict(done.splits),
        "split_bytes": dict(tally.split_bytes),
        "tokens": done.tokens,
        "blocks": done.blocks,
        "dropped_tail_tokens": done.dropped_tail,
        **done.sections,
        "tokenizer": card_tokenizer(done.tokenizer, trained=done.trained, source=tokenizer_from,
                                    **done.tokenizer_extra),
        "document_length_chars": tally.hist.to_dict(),
        "warnings": [*done.warnings, *tally.quality_warnings(cfg, bytes_read)],
        "config": to_dict(cfg),
    }
    if stats.files_with_replacements:
        card["counts"]["files_with_replacements"] = stats.files_with_replacements[:20]
    return card


def content_digest(raw_hash: dict[str, bytes], tok_dir: Path, *, prefix: bytes = b"", settings: str = "") -> str:
    """sha256 over the raw split texts, the tokenizer files and the encoding settings: same content, same digest."""
    h = hashlib.sha256(prefix)
    for split in SPLITS:
        h.update(split.encode())
        h.update(raw_hash[split])
    for name in sorted(p.name for p in tok_dir.iterdir() if p.is_file()):
        h.update(name.encode())
        h.update((tok_dir / name).read_bytes())
    h.update(settings.encode())
    return h.hexdigest()
