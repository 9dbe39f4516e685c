"""What the prepare pass (:mod:`~lifecycle.data.pipeline`) counts while the source streams past, what
a data format (raw text: :mod:`~lifecycle.data.lm`, instruction data: :mod:`~lifecycle.data.sft`)
reports when it finishes, and the checks at the end of the pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lifecycle.data import pii as pii_mod
from lifecycle.data.card import LengthHistogram
from lifecycle.data.config import PrepareConfig
from lifecycle.data.dedup import Deduplicator
from lifecycle.data.quality import FILTER_NAMES
from lifecycle.data.raw import read_raw_texts
from lifecycle.data.sources import SourceStats
from lifecycle.data.split import SPLITS
from lifecycle.errors import DataError

#: characters of a dropped text kept as a sample.
SAMPLE_CHARS = 600
#: the card warns when one quality rule drops more than this share of the input bytes.
QUALITY_WARN_SHARE = 0.10


@dataclass(frozen=True)
class FormatTerms:
    """What a data format calls its units, and the filters only it has (for the tally and its errors)."""

    name: str
    #: the units kept and dropped, and what an empty source lacks.
    noun: str = "documents"
    source_noun: str = "documents"
    #: the settings that loosen the filters.
    knobs: str = "--set quality.<key>=..."
    extra_filters: tuple[str, ...] = ()


@dataclass
class FormatResult:
    """What a data format made of the kept texts at the end of the pass (tokenizer, splits, stats)."""

    tokenizer: Any
    trained: bool
    #: kept units (documents, examples) per split, as the splits finally hold them.
    splits: dict[str, int]
    tokens: dict[str, int]
    blocks: dict[str, int]
    dropped_tail: dict[str, int]
    #: sha256 of each raw split file as finally kept.
    raw_hash: dict[str, bytes]
    #: what the content digest covers besides the raw text and the tokenizer.
    digest_prefix: bytes = b""
    digest_settings: str = ""
    filters: dict[str, int] = field(default_factory=dict)  # drops decided after the pass
    sections: dict[str, Any] = field(default_factory=dict)  # format-only card sections
    tokenizer_extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    #: seconds the format spent inside the pass loop (not filtering).
    in_pass: float = 0.0
    #: tokens per block as packed (``--block-size auto`` chooses it during the pass); None: the config's.
    block_size: int | None = None


@dataclass
class PassTally:
    """The counters of one prepare pass and its dedup index.

    The hot loops bind the counters to locals once (``filters = tally.filters``) rather than
    going through the attribute for every document.
    """

    filters: Counter[str]  # drops per filter, every filter listed (0 when it took nothing)
    dedup_counts: Counter[str]
    pii_counts: Counter[str]
    split_docs: Counter[str]
    split_bytes: Counter[str]
    samples: dict[str, list[str]]  # a few dropped texts per reason
    hist: LengthHistogram  # lengths of the kept texts, in characters
    dedup: Deduplicator
    #: input bytes of the texts each filter dropped (bytes, not counts: a rule that drops many
    #: short paragraphs can cost little text, one that drops a few books can cost most of it).
    filter_bytes: Counter[str] = field(default_factory=Counter)

    @classmethod
    def start(cls, cfg: PrepareConfig, extra_filters: tuple[str, ...] = ()) -> PassTally:
        """Zeroed counters for ``cfg`` (the quality filters, then ``extra_filters``, then "pii" when it drops)."""
        filters: Counter[str] = Counter({name: 0 for name in (*FILTER_NAMES, *extra_filters)})
        if cfg.pii.mode == "drop":
            filters["pii"] = 0
        return cls(
            filters=filters,
            dedup_counts=Counter(exact=0, near=0, exact_against=0, near_against=0),
            pii_counts=Counter(),
            split_docs=Counter({s: 0 for s in SPLITS}),
            split_bytes=Counter({s: 0 for s in SPLITS}),
            samples={},
            hist=LengthHistogram(),
            dedup=Deduplicator(exact=cfg.dedup.exact, near=cfg.dedup.near, threshold=cfg.dedup.threshold,
                               num_perm=cfg.dedup.num_perm, seed=cfg.seed),
        )

    def check(self, read: int, source: str, terms: FormatTerms = FormatTerms("lm")) -> int:
        """Refuse a pass that kept nothing usable (:class:`DataError`); the number kept otherwise.

        ``read`` is what the source held; ``terms`` name the units, what an empty source lacks and
        the settings that loosen the filters.
        """
        noun, knobs = terms.noun, terms.knobs
        kept = sum(self.split_docs.values())
        if read == 0:
            raise DataError(f"source {source} holds no {terms.source_noun}")
        if kept == 0:
            took = {**{k: v for k, v in self.filters.items() if v},
                    **{f"dedup_{k}": v for k, v in self.dedup_counts.items() if v}}
            detail = ", ".join(f"{k} {v}" for k, v in sorted(took.items(), key=lambda kv: -kv[1]))
            raise DataError(f"all {read} {noun} were dropped ({detail}); loosen the filters with {knobs}")
        if self.split_docs["train"] == 0:
            raise DataError(f"the train split is empty ({kept} {noun} kept); add {noun} or lower split fractions")
        return kept

    def card_counts(self, read: int, kept: int, bytes_read: int, stats: SourceStats, with_pii: int) -> dict[str, Any]:
        """The card's ``counts`` section (``kept``: what the splits finally hold)."""
        return {
            "documents_read": read,
            "documents_kept": kept,
            "documents_dropped": read - kept,
            "bytes_read": bytes_read,
            "bytes_kept": sum(self.split_bytes.values()),
            "files": stats.files,
            "replaced_chars": stats.replaced_chars,
            "non_text_values": stats.non_text_values,
            "documents_with_pii": with_pii,
        }

    def card_quality(self, cfg: PrepareConfig, bytes_read: int) -> dict[str, Any]:
        """The card's ``quality`` section: the rule set and the input bytes each quality rule dropped."""
        rules = cfg.quality.rules if cfg.quality.enabled else "off"
        return {"rules": rules, "bytes_read": bytes_read,
                "bytes_dropped": {name: int(self.filter_bytes.get(name, 0)) for name in FILTER_NAMES}}

    def quality_warnings(self, cfg: PrepareConfig, bytes_read: int) -> list[str]:
        """One warning per quality rule that dropped more than :data:`QUALITY_WARN_SHARE` of the input bytes."""
        if bytes_read <= 0:
            return []
        rules = cfg.quality.rules if cfg.quality.enabled else "off"
        # "empty" is not a judgement a rule set changes (nothing is there to keep), so it never warns.
        hint = {"web": "if the source is curated text (books, dialogue, docs), try --set quality.rules=clean",
                "clean": "if this text is wanted, try --set quality.rules=off or loosen quality.<key>",
                "off": "loosen quality.<key>"}[rules]
        out = []
        for name in FILTER_NAMES[1:]:
            share = self.filter_bytes.get(name, 0) / bytes_read
            if share > QUALITY_WARN_SHARE:
                out.append(f"quality rule {name} dropped {share:.1%} of the input bytes "
                           f"(quality.rules={rules}); {hint}")
        return out

    def card_dedup(self, cfg: PrepareConfig, reference_docs: int) -> dict[str, Any]:
        """The card's ``dedup`` section."""
        return {**dict(self.dedup_counts), "reference_documents": reference_docs,
                "threshold": cfg.dedup.threshold, "exact_enabled": cfg.dedup.exact, "near_enabled": cfg.dedup.near}

    def card_pii(self, cfg: PrepareConfig) -> dict[str, int]:
        """The card's ``pii`` section: what was found of each scrubbed kind."""
        return {kind: int(self.pii_counts.get(kind, 0)) for kind in cfg.pii.types}


def card_tokenizer(tokenizer: Any, *, trained: bool, source: str, **extra: Any) -> dict[str, Any]:
    """The card's ``tokenizer`` section: trained here or loaded from ``source``, and its specials.

    ``extra`` (e.g. ``trained_on_bytes``) goes after ``from``, where both passes keep it.
    """
    return {"trained": trained, "from": None if trained else source, **extra,
            "class": type(tokenizer).__name__, "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}


def pii_safe_sample(text: str, cfg: PrepareConfig) -> str:
    """The start of a dropped text, scrubbed: samples are for people to read, never with PII."""
    return pii_mod.scrub(text, cfg.pii.types)[0][:SAMPLE_CHARS]


def keep_sample(samples: dict[str, list[str]], name: str, text: str, limit: int) -> None:
    """Keep ``text`` as a sample of what ``name`` dropped, up to ``limit`` per name."""
    bucket = samples.setdefault(name, [])
    if len(bucket) < limit:
        bucket.append(text)


def reference_texts(folder: Path) -> Iterator[str]:
    """The texts of an earlier prepared folder (``--dedup-against``): rendered examples for sft data."""
    raw = folder / "raw"
    files = [raw / f"{s}.jsonl" for s in SPLITS if (raw / f"{s}.jsonl").is_file()]
    if not files:
        raise DataError(f"--dedup-against {folder}: not a prepared data folder (no raw/*.jsonl)")
    for path in files:
        yield from read_raw_texts(path)
