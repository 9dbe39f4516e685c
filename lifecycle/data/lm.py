"""Raw text (``format: lm``): documents -> cleaned, filtered, scrubbed text -> packed blocks.

The format's plug into the prepare pass (:mod:`~lifecycle.data.pipeline`): a document is the
source records' text column; each kept document is written as ``{"text": ...}`` to its raw split
file and handed to a :class:`~lifecycle.data.pack.StreamingPacker`, which trains the tokenizer on
a bounded sample of the train split and packs every split into blocks while the corpus streams.
"""

from __future__ import annotations

import time
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lifecycle.data import pii as pii_mod
from lifecycle.data.clean import clean_text
from lifecycle.data.config import PrepareConfig
from lifecycle.data.pack import StreamingPacker
from lifecycle.data.quality import first_failure
from lifecycle.data.sources import SourceStats, iter_documents
from lifecycle.data.split import SPLITS
from lifecycle.data.tally import SAMPLE_CHARS, FormatResult, FormatTerms, pii_safe_sample
from lifecycle.data.tokenizer import sample_bytes
from lifecycle.errors import DataError


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


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
            return (failed, pii_safe_sample(text, cfg), {})
    counts: dict[str, int] = {}
    if cfg.pii.mode != "off":
        scrubbed, counts = pii_mod.scrub(text, cfg.pii.types)
        if counts and cfg.pii.mode == "drop":
            return ("pii", scrubbed[:SAMPLE_CHARS], {})
        text = scrubbed
    return (None, text, counts)


class LmFormat:
    """Raw text, packed into blocks of ``pack.block_size`` tokens with EOS between documents."""

    terms = FormatTerms("lm")

    def __init__(self, cfg: PrepareConfig, tokenizer: Any = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.packer: StreamingPacker | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Workers screen documents only: the tokenizer and the packer stay in the main process.
        return {"cfg": self.cfg, "tokenizer": None, "packer": None}

    def items(self, stats: SourceStats) -> Iterator[str]:
        """The documents of the source."""
        return iter_documents(self.cfg.source, stats)

    @staticmethod
    def layout(item: Any) -> str | None:
        """Raw text has a single layout (not counted)."""
        return None

    def screen(self, text: str) -> tuple[str | None, str, dict[str, int], int, Any]:
        """``(failed, text or sample, pii counts, input bytes, row)`` of one document (row: None)."""
        failed, out, counts = screen_document(text, self.cfg)
        return failed, out, counts, _utf8_len(text), None

    @staticmethod
    def lines(texts: list[str], rows: list[Any]) -> list[bytes]:
        """The raw split lines of kept documents: byte for byte ``json.dumps({"text": t}, ensure_ascii=False)``,
        without its per-call setup."""
        return [('{"text": ' + encode_basestring(t) + "}\n").encode("utf-8") for t in texts]

    @staticmethod
    def sizes(texts: list[str]) -> list[int]:
        """UTF-8 bytes of each kept text."""
        return list(map(_utf8_len, texts))

    def start(self, workdir: Path, submit: Callable[..., Any] | None, max_pending: int) -> None:
        """Open the packer: with ``submit`` (a worker pool's), workers encode while this process filters."""
        cfg = self.cfg
        # The tokenizer is trained on the train split only, so validation/test stay unseen.
        auto = cfg.tokenizer.auto_vocab
        # block_size 0: --block-size auto, chosen by the packer with the vocabulary from the whole
        # train split (so no tokenizer sample; config refuses it with a reused tokenizer, whose
        # packer starts before any text is read).
        whole = auto or cfg.pack.auto_block
        self.packer = StreamingPacker(workdir, SPLITS, block_size=0 if cfg.pack.auto_block else cfg.pack.block_size,
                                      batch_size=cfg.batch_size,
                                      tokenizer=self.tokenizer, vocab_size=0 if auto else cfg.tokenizer.vocab_size,
                                      min_frequency=cfg.tokenizer.min_frequency,
                                      sample_bytes=None if whole else sample_bytes(cfg.tokenizer.sample_bytes,
                                                                                   cfg.tokenizer.vocab_size),
                                      submit=submit, max_pending=max_pending)

    def add(self, split: str, texts: list[str], sizes: Sequence[int]) -> None:
        """Take kept documents of ``split`` (in order) for packing."""
        assert self.packer is not None
        self.packer.add(split, texts, sizes)

    def abort(self) -> None:
        """Drop the packer's temporary files (the pass failed)."""
        if self.packer is not None:
            self.packer.abort()

    def finish(self, workdir: Path, split_docs: dict[str, int], raw_hash: dict[str, bytes]) -> FormatResult:
        """Encode what waits, save every split's blocks; refuse a train split that fills no block."""
        assert self.packer is not None
        t = time.perf_counter()
        packed = self.packer.finish()
        finish_seconds = time.perf_counter() - t
        packer, block = self.packer, self.packer.block_size
        tokens: dict[str, int] = {}
        blocks: dict[str, int] = {}
        tail: dict[str, int] = {}
        warnings: list[str] = []
        for split in SPLITS:
            tokens[split], blocks[split], tail[split] = packed[split]
            if blocks[split] == 0 and split == "train":
                raise DataError(f"the train split ({split_docs[split]} documents, {tokens[split]} tokens) fills no "
                                f"block of {block} tokens; add documents or use a smaller --block-size")
            if blocks[split] == 0:
                # A small increment (continuous training) may leave a held-out split empty; the
                # card says so instead of failing, and later stages decide what that means.
                warnings.append(f"the {split} split fills no block of {block} tokens ({split_docs[split]} documents)")
        # Tokenizing and packing ran inside the pass: its time is reported apart from filtering.
        return FormatResult(
            tokenizer=packer.tokenizer, trained=packer.trained, splits=dict(split_docs), tokens=tokens, blocks=blocks,
            dropped_tail=tail, raw_hash=raw_hash, digest_settings=f"block_size={block}", warnings=warnings,
            block_size=block,
            # trained_on_bytes: the train text the BPE learned from (the first bytes, up to tokenizer.sample_bytes).
            tokenizer_extra={"trained_on_bytes": packer.sample_used},
            seconds={"tokenizer": packer.seconds["tokenizer"], "tokenize_pack": packer.seconds["tokenize_pack"]},
            in_pass=packer.seconds["tokenizer"] + packer.seconds["tokenize_pack"] - finish_seconds)
