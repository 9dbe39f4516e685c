"""Instruction data (``format: sft``): records -> examples -> rendered, screened rows -> tokenized rows.

A record is either ``{"prompt": ..., "response": ...}`` (column names configurable) or a chat
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` (in CSV, a JSON list
in one cell). Each example is kept as *segments*: pieces of text that are either context (masked
out of the loss) or a response the model must learn to write (labelled), each response followed by
EOS so the model learns to stop:

* prompt/response: ``[prompt (context), response (labelled) + EOS]``. The prompt is used verbatim:
  serve the model with the same prompt string and it answers with the response.
* chat: rendered with a chat template (:mod:`~lifecycle.data.chat`).

This module is the format's plug into the prepare pass (:mod:`~lifecycle.data.pipeline`): the pass
cleans, filters, scrubs, deduplicates and splits whole examples; at its end the tokenizer is
trained on the kept train examples and every example is encoded (:mod:`~lifecycle.data.encode`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lifecycle.data import pii as pii_mod
from lifecycle.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ROLES,
    ChatRenderer,
    example_segments,
    final_prompt,
    renderer_for,
)
from lifecycle.data.clean import clean_text
from lifecycle.data.config import PrepareConfig
from lifecycle.data.encode import SplitStats, read_rows, tokenize_split
from lifecycle.data.quality import first_failure, words_of
from lifecycle.data.sources import SourceStats, first_record_keys, iter_records
from lifecycle.data.split import SPLITS
from lifecycle.data.tally import FormatResult, FormatTerms, pii_safe_sample
from lifecycle.data.tokenizer import batched, choose_vocab, train_tokenizer
from lifecycle.errors import DataError

#: Filters only instruction data has (next to the quality filters of FILTER_NAMES and "pii").
SFT_FILTERS = ("no_response", "too_long")


# -- format detection and records ---------------------------------------------------------------

def detect_format(cfg: PrepareConfig) -> str:
    """``cfg.format`` unless ``auto``: then ``sft`` when the first record has the sft columns
    (``messages``, or ``prompt`` and ``response``) and no text column, else ``lm``."""
    if cfg.format != "auto":
        return cfg.format
    keys = first_record_keys(cfg.source)
    if not keys:
        return "lm"
    s = cfg.sft
    has_sft = s.messages_column in keys or (s.prompt_column in keys and s.response_column in keys)
    return "sft" if has_sft and cfg.source.text_column not in keys else "lm"


def _where(index: int) -> str:
    return f"record {index + 1}"


def record_example(record: dict[str, Any], cfg: PrepareConfig, index: int) -> dict[str, Any]:
    """The example of one record: ``{"messages": [...]}`` or ``{"prompt": ..., "response": ...}``.

    A record without the sft columns, or with malformed messages, is a :class:`DataError`
    naming the record; non-string values become empty strings (and are later dropped as such).
    """
    s = cfg.sft
    if s.messages_column in record and record[s.messages_column] is not None:
        messages = record[s.messages_column]
        if isinstance(messages, str) and messages.lstrip().startswith("["):
            messages = _json_list(messages)  # a chat column of a CSV file: a JSON list in one cell
        if hasattr(messages, "tolist") and not isinstance(messages, list):
            messages = messages.tolist()
        if not isinstance(messages, (list, tuple)):
            raise DataError(f"{_where(index)}: {s.messages_column!r} must be a list of "
                            f"{{role, content}} objects, got {type(messages).__name__}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{_where(index)}: {s.messages_column}[{i}] must be an object with role and content")
            if m["role"] not in ROLES:
                raise DataError(f"{_where(index)}: {s.messages_column}[{i}].role must be one of "
                                f"{', '.join(ROLES)}, got {m['role']!r}")
            out.append({"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else ""})
        return {"messages": out}
    missing = [c for c in (s.prompt_column, s.response_column) if c not in record]
    if missing:
        cols = ", ".join(map(str, record)) or "(none)"
        raise DataError(f"{_where(index)}: no {' or '.join(repr(c) for c in missing)} column and no "
                        f"{s.messages_column!r}; columns are: {cols} (use --prompt-column/--response-column "
                        f"or --messages-column)")
    prompt, response = record[s.prompt_column], record[s.response_column]
    return {"prompt": prompt if isinstance(prompt, str) else "",
            "response": response if isinstance(response, str) else ""}



def _json_list(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# -- per-example work ---------------------------------------------------------------------------

def _fields(example: dict[str, Any]) -> list[str]:
    if "messages" in example:
        return [m["content"] for m in example["messages"]]
    return [example["prompt"], example["response"]]


def _map_fields(example: dict[str, Any], fn: Any) -> dict[str, Any]:
    if "messages" in example:
        return {"messages": [{"role": m["role"], "content": fn(m["content"])} for m in example["messages"]]}
    return {"prompt": fn(example["prompt"]), "response": fn(example["response"])}


def _responses(example: dict[str, Any]) -> list[str]:
    if "messages" in example:
        return [m["content"] for m in example["messages"] if m["role"] == "assistant"]
    return [example["response"]]


def response_failure(response: str, cfg: PrepareConfig) -> str | None:
    """The quality filter a response fails, or None.

    The word-count limits always apply (``sft.min_response_words`` replaces ``quality.min_words``);
    the statistical filters only judge responses of ``sft.quality_min_words`` words or more.
    """
    q = replace(cfg.quality, min_words=cfg.sft.min_response_words)
    n = len(words_of(response))
    if n < q.min_words:
        return "min_words"
    if n > q.max_words:
        return "max_words"
    if n >= cfg.sft.quality_min_words:
        return first_failure(response, q)
    return None



def screen_example(example: dict[str, Any], cfg: PrepareConfig,
                   renderer: ChatRenderer) -> tuple[str | None, str, dict[str, int], int, Any]:
    """Clean, filter and scrub one example, then render it.

    Returns ``(filter_name, sample, {}, in_bytes, None)`` for an example to drop, or ``(None, text,
    pii_counts, in_bytes, row)`` for one to keep: ``text`` is the whole rendered example (what dedup
    and split judge) and ``row`` what ``raw/<split>.jsonl`` keeps of it.
    """
    in_bytes = sum(len(t.encode("utf-8")) for t in _fields(example))
    if cfg.clean.enabled:
        c = cfg.clean
        example = _map_fields(example, lambda t: clean_text(
            t, unicode_form=c.unicode_form, strip_control=c.strip_control, normalize_whitespace=c.normalize_whitespace))
    responses = _responses(example)
    if not responses or not any(r.strip() for r in responses):
        return ("no_response", _sample(example, cfg), {}, in_bytes, None)
    if "messages" not in example and not example["prompt"].strip():
        return ("empty", _sample(example, cfg), {}, in_bytes, None)
    if cfg.quality.enabled:
        for response in responses:
            failed = response_failure(response, cfg)
            if failed is not None:
                return (failed, _sample(example, cfg), {}, in_bytes, None)
    counts: Counter[str] = Counter()
    if cfg.pii.mode != "off":
        def scrub(text: str) -> str:
            scrubbed, found = pii_mod.scrub(text, cfg.pii.types)
            counts.update(found)
            return scrubbed

        example = _map_fields(example, scrub)
        if counts and cfg.pii.mode == "drop":
            return ("pii", _sample(example, cfg), {}, in_bytes, None)
    segments = example_segments(example, renderer)
    text = "".join(t for t, _, _ in segments)
    prompt, reference = final_prompt(example, renderer)
    row = {**example, "text": text, "prompt": prompt, "response": reference, "segments": [list(s) for s in segments]}
    return (None, text, dict(counts), in_bytes, row)


def _sample(example: dict[str, Any], cfg: PrepareConfig) -> str:
    return pii_safe_sample(json.dumps(example, ensure_ascii=False), cfg)


# -- the format's plug into the pass ------------------------------------------------------------

class SftFormat:
    """Instruction data: one row per example (or several per row with ``sft.packing``), loss on responses."""

    terms = FormatTerms("sft", noun="examples", source_noun="records", extra_filters=("no_response",),
                        knobs="--set quality.<key>=... or sft.<key>=...")

    def __init__(self, cfg: PrepareConfig, tokenizer: Any = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.renderer = renderer_for(tokenizer)

    def __getstate__(self) -> dict[str, Any]:
        # Workers render and screen examples only: the tokenizer stays in the main process.
        return {**self.__dict__, "tokenizer": None}

    def items(self, stats: SourceStats) -> Iterator[dict[str, Any]]:
        """The examples of the source's records (a malformed record is refused, named)."""
        for index, record in enumerate(iter_records(self.cfg.source, stats)):
            yield record_example(record, self.cfg, index)

    @staticmethod
    def layout(example: dict[str, Any]) -> str:
        """``chat`` or ``prompt_response`` (counted in the card for every example read)."""
        return "chat" if "messages" in example else "prompt_response"

    def screen(self, example: dict[str, Any]) -> tuple[str | None, str, dict[str, int], int, Any]:
        """:func:`screen_example` with this format's renderer."""
        return screen_example(example, self.cfg, self.renderer)

    @staticmethod
    def lines(texts: list[str], rows: list[Any]) -> list[bytes]:
        """The raw split lines of kept examples: their rows as JSON."""
        return [(json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows]

    @staticmethod
    def sizes(texts: list[str]) -> list[int]:
        """UTF-8 bytes of each kept (rendered) example."""
        return [len(t.encode("utf-8")) for t in texts]

    def start(self, workdir: Path, submit: Callable[..., Any] | None, max_pending: int) -> None:
        """Nothing to open: examples are tokenized after the pass, once the tokenizer exists."""

    def add(self, split: str, texts: list[str], sizes: Sequence[int]) -> None:
        """Kept examples are already in the raw split files; they are encoded from there."""

    def abort(self) -> None:
        """Nothing to clean up beyond the working folder."""

    def finish(self, workdir: Path, split_docs: dict[str, int], raw_hash: dict[str, bytes]) -> FormatResult:
        """Train (or reuse) the tokenizer, then encode every split's examples into rows."""
        cfg, raw_dir = self.cfg, workdir / "raw"
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        tokenizer, trained = self.tokenizer, self.tokenizer is None
        if trained:
            vocab = cfg.tokenizer.vocab_size
            if cfg.tokenizer.auto_vocab:  # --vocab-size auto: sized by the train split's bytes
                vocab = choose_vocab((raw_dir / "train.jsonl").stat().st_size)
            tokenizer = train_tokenizer(batched((r["text"] for r in read_rows(raw_dir / "train.jsonl")), 1000),
                                        vocab_size=vocab, min_frequency=cfg.tokenizer.min_frequency)
        if not self.renderer.from_tokenizer:
            # Written into the tokenizer folder: training saves it with the model and serving's
            # apply_chat_template then renders chat requests exactly as these examples were rendered.
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        tokenizer.save_pretrained(str(workdir / "tokenizer"))
        seconds["tokenizer"] = time.perf_counter() - t

        t = time.perf_counter()
        stats: dict[str, SplitStats] = {}
        kept_hash: dict[str, bytes] = {}
        warnings: list[str] = []
        for split in SPLITS:
            stats[split], kept_hash[split] = tokenize_split(
                tokenizer, raw_dir / f"{split}.jsonl", workdir / split, block_size=cfg.pack.block_size,
                overflow=cfg.sft.overflow, batch_size=cfg.batch_size, packing=cfg.sft.packing)
            if stats[split].examples == 0 and split == "train":
                raise DataError(f"no train example fits in a block of {cfg.pack.block_size} tokens "
                                f"({stats[split].too_long} too long); use a larger --block-size")
            if stats[split].examples == 0:
                warnings.append(f"the {split} split holds no example")
        seconds["tokenize"] = time.perf_counter() - t
        per = lambda key: {s: getattr(stats[s], key) for s in SPLITS}  # noqa: E731 - a card table per stat
        section = {
            "layouts": {},  # filled by the pass (every example read counts)
            "chat_template": "tokenizer" if self.renderer.from_tokenizer else "default",
            "columns": {"prompt": cfg.sft.prompt_column, "response": cfg.sft.response_column,
                        "messages": cfg.sft.messages_column},
            "overflow": cfg.sft.overflow,
            "packing": cfg.sft.packing,
            "response_tokens": per("response_tokens"),
            "truncated_examples": per("truncated"),
            "truncated_tokens": per("truncated_tokens"),
            "dropped_too_long": per("too_long"),
            "max_length": per("max_length"),
        }
        return FormatResult(
            tokenizer=tokenizer, trained=trained, splits=per("examples"), tokens=per("tokens"),
            # The rows: one per example, or fewer when examples are packed.
            blocks=per("rows"), dropped_tail={s: 0 for s in SPLITS}, raw_hash=kept_hash,
            digest_prefix=b"format=sft",
            digest_settings=f"block_size={cfg.pack.block_size};overflow={cfg.sft.overflow};packing={cfg.sft.packing}",
            filters={"too_long": sum(s.too_long for s in stats.values())}, sections={"sft": section},
            warnings=warnings, seconds=seconds)
