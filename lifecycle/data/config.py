"""The validated configuration of the prepare stage (a dataclass tree, loadable from YAML).

Defaults are documented next to each field; ``__post_init__`` refuses values that cannot work,
with a message that says which key and what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from lifecycle.errors import ConfigError

PII_TYPES = ("email", "phone", "ipv4", "credit_card", "aws_access_key", "api_key", "private_key")


def _check_min(prefix: str, section: object, limits: dict[str, int]) -> None:
    """Refuse the first field of ``section`` that lies below its limit in ``limits``."""
    for name, low in limits.items():
        value = getattr(section, name)
        if value < low:
            raise ConfigError(f"{prefix}{name}: must be >= {low}, got {value}")


def _check_column(key: str, value: object) -> None:
    """A column name is used exactly as given: a non-empty string, never a number or a boolean."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: a column name must be a string, got {type(value).__name__} {value!r}")
    if not value:
        raise ConfigError(f"{key}: must not be empty")


@dataclass
class SourceConfig:
    """Where documents come from and how they are read."""

    #: local file/folder, ``hf:NAME[:CONFIG]``, a ``save_to_disk`` folder, or ``builtin:pydoc``.
    uri: str = "builtin:pydoc"
    #: column holding the text in jsonl/json/csv/parquet/datasets sources.
    text_column: str = "text"
    #: ``.txt``/``.md``: one document per file instead of blank-line separated documents.
    document_per_file: bool = False
    #: stop after this many documents read from the source (None: all).
    max_documents: Optional[int] = None
    #: bytes that are not UTF-8: ``strict`` fails naming file and offset, ``replace`` counts them.
    errors: Literal["strict", "replace"] = "strict"

    def __post_init__(self) -> None:
        if not self.uri:
            raise ConfigError("source.uri: a source is required (path, hf:NAME or builtin:pydoc)")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"source.max_documents: must be >= 1, got {self.max_documents}")
        _check_column("source.text_column", self.text_column)


@dataclass
class CleanConfig:
    """Unicode and whitespace normalisation applied before anything else."""

    enabled: bool = True
    unicode_form: Literal["NFC", "NFKC"] = "NFC"
    strip_control: bool = True
    normalize_whitespace: bool = True


@dataclass
class QualityConfig:
    """Gopher/C4-style document filters. CJK characters count as one word each.

    Defaults are looser than Gopher's on word length and alphabetic share because the built-in
    corpus is technical prose with code samples.
    """

    enabled: bool = True
    #: named rule set: ``web`` (every rule below, made for crawled web pages), ``clean`` (curated
    #: text: only the rules that catch real garbage, no word-count or word-length limits), ``off``
    #: (no quality rule; cleaning, dedup and PII still run). The default stays ``web`` so that
    #: existing configs and prepared digests do not change; the card warns when it costs much.
    rules: Literal["web", "clean", "off"] = "web"
    min_words: int = 10
    max_words: int = 100_000
    #: mean length of non-CJK words; skipped when most of the text is CJK.
    min_mean_word_length: float = 2.0
    max_mean_word_length: float = 12.0
    #: ('#' + ellipsis) occurrences per word (Gopher: 0.1).
    max_symbol_word_ratio: float = 0.1
    #: share of non-empty lines ending in '...' or '…' (Gopher: 0.3).
    max_ellipsis_line_fraction: float = 0.3
    #: share of non-empty lines that repeat an earlier line (Gopher: 0.3).
    max_duplicate_line_fraction: float = 0.3
    #: share of paragraphs that repeat an earlier paragraph (Gopher: 0.3).
    max_duplicate_paragraph_fraction: float = 0.3
    #: share of words containing at least one alphabetic character, CJK included (Gopher: 0.8).
    min_alpha_word_fraction: float = 0.5

    def __post_init__(self) -> None:
        # Also checked here, not only by the loader: QualityConfig(rules=...) in code must fail the same way.
        if self.rules not in ("web", "clean", "off"):
            raise ConfigError(f"quality.rules: {self.rules!r} is not one of web, clean, off")
        if self.min_words < 0 or self.max_words < max(1, self.min_words):
            raise ConfigError(f"quality: need 0 <= min_words <= max_words, got {self.min_words}..{self.max_words}")
        if not 0 <= self.min_mean_word_length <= self.max_mean_word_length:
            raise ConfigError("quality: need 0 <= min_mean_word_length <= max_mean_word_length")
        for name in ("max_ellipsis_line_fraction", "max_duplicate_line_fraction",
                     "max_duplicate_paragraph_fraction", "min_alpha_word_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"quality.{name}: must lie in [0, 1], got {value}")
        if self.max_symbol_word_ratio < 0:
            raise ConfigError("quality.max_symbol_word_ratio: must be >= 0")


@dataclass
class DedupConfig:
    """Exact (hash of normalised text) and near-duplicate (MinHash LSH) removal."""

    exact: bool = True
    near: bool = True
    #: Jaccard similarity above which two documents are near duplicates.
    threshold: float = 0.8
    num_perm: int = 128
    #: shingles are n-grams of words (each CJK character is a word).
    shingle_size: int = 5
    #: earlier prepared data (folder, runs:/ or models:/ URI) to deduplicate against.
    against: Optional[str] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"dedup.threshold: must lie in (0, 1], got {self.threshold}")
        _check_min("dedup.", self, {"num_perm": 16, "shingle_size": 1})


@dataclass
class PiiConfig:
    """PII scrubbing: typed placeholders (``replace``), drop the document, or ``off``."""

    mode: Literal["replace", "drop", "off"] = "replace"
    types: list[str] = field(default_factory=lambda: list(PII_TYPES))

    def __post_init__(self) -> None:
        unknown = [t for t in self.types if t not in PII_TYPES]
        if unknown:
            raise ConfigError(f"pii.types: unknown type {unknown[0]!r}; valid: {', '.join(PII_TYPES)}")


@dataclass
class SplitConfig:
    """Hash-based split: a document keeps its split when the corpus grows."""

    validation: float = 0.05
    test: float = 0.05

    def __post_init__(self) -> None:
        for name in ("validation", "test"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"split.{name}: must lie in (0, 1), got {value}")
        if self.validation + self.test >= 1.0:
            raise ConfigError("split: validation + test must leave something for train (sum < 1)")


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE on the train split, or reuse an existing tokenizer."""

    #: reuse: a tokenizer/model/prepared folder, runs:/ or models:/ URI, or a hub name.
    name_or_path: Optional[str] = None
    vocab_size: int = 8192
    #: Choose vocab_size from the train split's size instead (``--vocab-size auto``; the tokenizer is
    #: then trained on the whole train split): see lifecycle.data.tokenizer.choose_vocab.
    auto_vocab: bool = False
    min_frequency: int = 2
    #: train the BPE on the first this-many bytes of the train split; null: 256 per vocab entry
    #: (2 MB for 8192), 0: the whole train split.
    sample_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        if self.sample_bytes is not None and self.sample_bytes < 0:
            raise ConfigError("tokenizer.sample_bytes: must be >= 0 (0: the whole train split), "
                              f"got {self.sample_bytes}")
        if self.vocab_size < 300:
            raise ConfigError(f"tokenizer.vocab_size: must be >= 300 (256 bytes + merges), got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ConfigError("tokenizer.min_frequency: must be >= 1")


@dataclass
class PackConfig:
    """Fixed-length blocks of token ids, EOS between documents."""

    block_size: int = 256
    #: Choose block_size from the train split's size instead (``--block-size auto``, raw text with a
    #: tokenizer trained here): see lifecycle.data.tokenizer.choose_block.
    auto_block: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ConfigError(f"pack.block_size: must be >= 2, got {self.block_size}")


@dataclass
class SftConfig:
    """Instruction data (``format: sft``): prompt/response or chat records, loss on responses only."""

    #: columns of prompt/response records.
    prompt_column: str = "prompt"
    response_column: str = "response"
    #: column of chat records: a list of ``{"role": system|user|assistant, "content": ...}``.
    messages_column: str = "messages"
    #: an example longer than the block: cut the prompt's oldest tokens (``truncate``) or ``drop`` it.
    overflow: Literal["truncate", "drop"] = "truncate"
    #: responses shorter than this many words are dropped (the ``min_words`` filter for responses).
    min_response_words: int = 1
    #: the statistical quality filters (word length, symbols, alphabetic share, repeated lines) judge
    #: responses of at least this many words only: on a one-word answer they measure nothing.
    quality_min_words: int = 10
    #: several short examples per row (position ids restart per example and training masks each
    #: example off from the others); off: one example per row, padded per batch.
    packing: bool = False

    def __post_init__(self) -> None:
        for name in ("prompt_column", "response_column", "messages_column"):
            _check_column(f"sft.{name}", getattr(self, name))
        if self.min_response_words < 0 or self.quality_min_words < 0:
            raise ConfigError("sft.min_response_words and sft.quality_min_words must be >= 0")


@dataclass
class PrepareConfig:
    """Everything the prepare stage needs, section by section."""

    #: ``lm`` (raw text, packed), ``sft`` (prompt/response or chat records), or ``auto``: ``sft``
    #: when the source's first record has the sft columns, else ``lm``.
    format: Literal["auto", "lm", "sft"] = "auto"
    source: SourceConfig = field(default_factory=SourceConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    #: worker processes for the per-document steps (1: in-process).
    num_proc: int = 1
    #: salts the split hash and the MinHash permutations.
    seed: int = 0
    #: documents per batch handed to a worker / the tokenizer.
    batch_size: int = 512
    #: documents kept per filter as a sample of what was dropped.
    drop_samples: int = 5

    def __post_init__(self) -> None:
        _check_min("", self, {"num_proc": 1, "batch_size": 1, "drop_samples": 0})
        if self.pack.auto_block and self.tokenizer.name_or_path is not None:
            raise ConfigError("pack.auto_block (--block-size auto) sizes blocks by the text a tokenizer is trained on "
                              "here; with --tokenizer give --block-size a number")
        if self.pack.auto_block and self.format == "sft":
            raise ConfigError("pack.auto_block (--block-size auto) is for raw text; sft examples need --block-size "
                              "as a number")
