"""Instruction data (``format: sft``): records -> rendered examples -> input_ids / attention_mask / labels.

A record is either ``{"prompt": ..., "response": ...}`` (column names configurable) or a chat
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``. Each example is
kept as *segments*: pieces of text that are either context (masked out of the loss) or a
response the model must learn to write (labelled), each response followed by EOS so the model
learns to stop:

* prompt/response: ``[prompt (context), response (labelled) + EOS]``. The prompt is used verbatim:
  serve the model with the same prompt string and it answers with the response.
* chat: rendered with the tokenizer's chat template, or :data:`DEFAULT_CHAT_TEMPLATE` when it has
  none (the prepare stage then writes it into the tokenizer folder, so training, evaluation and
  serving all render the same way). Every assistant turn is labelled; the text the template puts
  around it (role headers, the generation prompt) is context.

Segments are tokenized one by one (the first with the tokenizer's own special tokens, as the
serving stage encodes a prompt), so the boundary between the prompt and its response is exactly
where generation starts at serving time. The labels are ``-100`` on context tokens: the loss is on
the responses only. An example longer than the block loses its oldest tokens (the prompt side) by
default, or is dropped; either way the data card counts it. By default each row is one example,
padded per batch at training time; with ``sft.packing`` several short examples share a row, with
position ids that restart for each example and a block-diagonal mask built from them at training
time, so no example ever attends to another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from lifecycle.config import to_dict
from lifecycle.data import pii as pii_mod
from lifecycle.data.card import write_card
from lifecycle.data.clean import clean_text
from lifecycle.data.config import PrepareConfig
from lifecycle.data.dedup import MinHasher, exact_key, normalize_for_hash
from lifecycle.data.pack import save_arrow_dataset
from lifecycle.data.quality import first_failure, words_of
from lifecycle.data.sources import SourceStats, first_record_keys, iter_records
from lifecycle.data.split import SPLITS, assign_split
from lifecycle.data.tally import PassTally, card_tokenizer, keep_sample, reference_texts
from lifecycle.data.tokenizer import EOS_TOKEN, batched, check_block_size, check_eos, load_tokenizer, train_tokenizer
from lifecycle.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SAMPLE_CHARS = 600
#: Filters only instruction data has (next to the quality filters of FILTER_NAMES and "pii").
SFT_FILTERS = ("no_response", "too_long")

#: The chat format used when the tokenizer has none: one ``"<role>: <content>"`` line per message,
#: EOS closing each assistant turn, and ``"assistant:"`` as the generation prompt. It renders a
#: conversation exactly as the serving stage's plain fallback does (lifecycle.serving.requests.
#: plain_chat_prompt), so a model served without the template still sees the same prompts.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- message['role'] + ': ' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant:' }}{%- endif %}"
)

#: One piece of an example: (text, labelled, followed by EOS).
Segment = tuple[str, bool, bool]


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


# -- rendering ----------------------------------------------------------------------------------

class ChatRenderer:
    """Renders chat messages with a Jinja chat template, the way transformers does.

    Built from plain strings (template, special tokens) so it pickles into worker processes and
    works before the tokenizer exists (a trained tokenizer is made after filtering).
    """

    def __init__(self, template: str, *, eos_token: str, bos_token: str | None = None, from_tokenizer: bool = False):
        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token or ""
        self.from_tokenizer = from_tokenizer
        self._compiled: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None}

    def _compile(self) -> Any:
        if self._compiled is None:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise jinja2.exceptions.TemplateError(message)

            # The environment transformers' apply_chat_template uses.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.template)
            except jinja2.TemplateError as exc:
                raise ConfigError(f"the chat template does not compile: {exc}") from None
        return self._compiled

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The template applied to ``messages``."""
        import jinja2

        try:
            return self._compile().render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          eos_token=self.eos_token, bos_token=self.bos_token)
        except jinja2.TemplateError as exc:
            raise DataError(f"the chat template refused a conversation: {exc}") from None


def renderer_for(tokenizer: Any | None) -> ChatRenderer:
    """The tokenizer's own chat template if it has one, else :data:`DEFAULT_CHAT_TEMPLATE`."""
    if tokenizer is None:
        return ChatRenderer(DEFAULT_CHAT_TEMPLATE, eos_token=EOS_TOKEN)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    eos = tokenizer.eos_token or EOS_TOKEN
    if template:
        return ChatRenderer(template, eos_token=eos, bos_token=tokenizer.bos_token, from_tokenizer=True)
    return ChatRenderer(DEFAULT_CHAT_TEMPLATE, eos_token=eos, bos_token=tokenizer.bos_token)


def _split_span(span: str, eos: str) -> tuple[str, str]:
    """A rendered assistant turn cut after its EOS: (response without EOS, what follows)."""
    at = span.find(eos) if eos else -1
    if at < 0:
        return span, ""
    return span[:at], span[at + len(eos):]


def chat_segments(messages: Sequence[dict[str, str]], renderer: ChatRenderer) -> list[Segment]:
    """Segments of a conversation: the template's text as context, each assistant turn labelled.

    Turn ``i``'s response is what the full rendering of ``messages[:i+1]`` adds to the rendering
    of ``messages[:i]`` with the generation prompt, i.e. exactly what the model must write after
    the prompt it is served. A template that does not render that way is refused.
    """
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = renderer.render(messages[:i], add_generation_prompt=True)
        full = renderer.render(messages[:i + 1])
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError("the chat template does not render a conversation as prompt + answer "
                            "(a turn's rendering is not a prefix of the next); use a template that does")
        response, rest = _split_span(full[len(prefix):], renderer.eos_token)
        segments.append((prefix[len(done):], False, False))
        segments.append((response, True, True))
        done = full[:len(full) - len(rest)]
    return [s for s in segments if s[0] or s[2]]


def final_prompt(example: dict[str, Any], renderer: ChatRenderer) -> tuple[str, str]:
    """(prompt, reference): what to send the served model and the answer expected back."""
    if "messages" in example:
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return renderer.render(messages[:last], add_generation_prompt=True), messages[last]["content"]
    return example["prompt"], example["response"]


def example_segments(example: dict[str, Any], renderer: ChatRenderer) -> list[Segment]:
    """Segments of a cleaned example (see the module docstring)."""
    if "messages" in example:
        return chat_segments(example["messages"], renderer)
    return [(example["prompt"], False, False), (example["response"], True, True)]


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


def process_example(example: dict[str, Any], cfg: PrepareConfig, hasher: MinHasher | None,
                    renderer: ChatRenderer) -> tuple:
    """Clean, filter and scrub one example; render it; compute its dedup keys and split.

    Returns ``("drop", in_bytes, filter_name, sample)`` or ``("keep", in_bytes, line, chars,
    out_bytes, pii_counts, key, signature, split)``, the shape of the raw-text pipeline's
    per-document result. Dedup and split use the whole rendered example.
    """
    in_bytes = sum(len(t.encode("utf-8")) for t in _fields(example))
    if cfg.clean.enabled:
        c = cfg.clean
        example = _map_fields(example, lambda t: clean_text(t, unicode_form=c.unicode_form, strip_control=c.strip_control,
                                                            normalize_whitespace=c.normalize_whitespace))
    responses = _responses(example)
    if not responses or not any(r.strip() for r in responses):
        return ("drop", in_bytes, "no_response", _sample(example, cfg))
    if "messages" not in example and not example["prompt"].strip():
        return ("drop", in_bytes, "empty", _sample(example, cfg))
    if cfg.quality.enabled:
        for response in responses:
            failed = response_failure(response, cfg)
            if failed is not None:
                return ("drop", in_bytes, failed, _sample(example, cfg))
    counts: Counter[str] = Counter()
    if cfg.pii.mode != "off":
        def scrub(text: str) -> str:
            scrubbed, found = pii_mod.scrub(text, cfg.pii.types)
            counts.update(found)
            return scrubbed

        example = _map_fields(example, scrub)
        if counts and cfg.pii.mode == "drop":
            return ("drop", in_bytes, "pii", _sample(example, cfg))
    segments = example_segments(example, renderer)
    text = "".join(t for t, _, _ in segments)
    prompt, reference = final_prompt(example, renderer)
    norm = normalize_for_hash(text)
    key = exact_key(text, norm) if cfg.dedup.exact else None
    sig = hasher.signature(text, norm) if hasher is not None else None
    split = assign_split(text, validation=cfg.split.validation, test=cfg.split.test, seed=cfg.seed, normalized=norm)
    row = {**example, "text": text, "prompt": prompt, "response": reference, "segments": [list(s) for s in segments]}
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    return ("keep", in_bytes, line, len(text), len(text.encode("utf-8")), dict(counts), key, sig, split)


def _sample(example: dict[str, Any], cfg: PrepareConfig) -> str:
    # Samples are for people to read: never show them unscrubbed PII.
    text = json.dumps(example, ensure_ascii=False)
    return pii_mod.scrub(text, cfg.pii.types)[0][:SAMPLE_CHARS]


# -- tokenization -------------------------------------------------------------------------------

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


# -- the pipeline -------------------------------------------------------------------------------

@dataclass
class SplitStats:
    """What tokenizing one split did."""

    examples: int = 0
    rows: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    too_long: int = 0
    max_length: int = 0


def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an sft ``raw/<split>.jsonl`` (text, prompt, response, segments, the example)."""
    path = Path(path)
    rows = list(_read_rows(path))
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
        for rows in batched(_read_rows(raw), batch_size):
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


def _init_worker(cfg: PrepareConfig, renderer: ChatRenderer) -> None:
    _WORKER["cfg"], _WORKER["renderer"] = cfg, renderer
    _WORKER["hasher"] = MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_size, cfg.seed) if cfg.dedup.near else None


def _process_batch(examples: list[dict[str, Any]]) -> list[tuple]:
    cfg, renderer, hasher = _WORKER["cfg"], _WORKER["renderer"], _WORKER["hasher"]
    return [(*process_example(e, cfg, hasher, renderer), "chat" if "messages" in e else "prompt_response")
            for e in examples]


def _map_examples(examples: Iterable[dict[str, Any]], cfg: PrepareConfig, renderer: ChatRenderer) -> Iterator[tuple]:
    """:func:`process_example` over ``examples``, in order, in ``cfg.num_proc`` worker processes.

    Each result carries the example's layout as its last item. At most ``2 * num_proc`` batches
    are in flight, so memory stays bounded however large the source is.
    """
    import multiprocessing
    from collections import deque

    if cfg.num_proc <= 1:
        _init_worker(cfg, renderer)
        for batch in batched(examples, cfg.batch_size):
            yield from _process_batch(batch)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ctx.Pool(cfg.num_proc, initializer=_init_worker, initargs=(cfg, renderer))
    try:
        pending: deque[Any] = deque()
        for batch in batched(examples, cfg.batch_size):
            pending.append(pool.apply_async(_process_batch, (batch,)))
            if len(pending) >= 2 * cfg.num_proc:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def _records_as_examples(cfg: PrepareConfig, stats: SourceStats) -> Iterator[dict[str, Any]]:
    for index, record in enumerate(iter_records(cfg.source, stats)):
        yield record_example(record, cfg, index)


def run_sft_pipeline(cfg: PrepareConfig, workdir: Path, *, source_uri: str | None = None,
                     tokenizer_path: str | Path | None = None, reference_dir: Path | None = None) -> Any:
    """Prepare instruction data from ``cfg.source`` into ``workdir``; a ``PipelineResult``.

    The same steps as the raw-text pipeline (clean, filter, PII, dedup, split, tokenizer), on
    whole examples; then every example is tokenized into its own row instead of being packed.
    """
    from lifecycle.data.pipeline import PipelineResult

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    tokenizer = None
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
        check_block_size(tokenizer, cfg.pack.block_size, str(cfg.tokenizer.name_or_path or tokenizer_path))
        check_eos(tokenizer)
    renderer = renderer_for(tokenizer)
    hasher = MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_size, cfg.seed) if cfg.dedup.near else None

    raw_dir = workdir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    stats = SourceStats()
    tally = PassTally.start(cfg, ("no_response",))
    filters, dedup_counts, pii_counts = tally.filters, tally.dedup_counts, tally.pii_counts
    split_docs, split_bytes, samples, hist, dedup = (tally.split_docs, tally.split_bytes, tally.samples,
                                                     tally.hist, tally.dedup)
    with_pii = 0
    bytes_read = 0
    layouts: Counter[str] = Counter()

    reference_docs = 0
    if reference_dir is not None and (cfg.dedup.exact or cfg.dedup.near):
        reference_docs = dedup.add_reference(
            (exact_key(t) if cfg.dedup.exact else None, hasher.signature(t) if hasher else None)
            for t in reference_texts(reference_dir))

    t = time.perf_counter()
    files = {s: (raw_dir / f"{s}.jsonl").open("wb") for s in SPLITS}
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.source.max_documents, desc="prepare (sft): clean/filter/dedup", unit="example",
                   disable=None, mininterval=1.0)
        for res in _map_examples(_records_as_examples(cfg, stats), cfg, renderer):
            layouts[res[-1]] += 1
            res = res[:-1]
            bar.update(1)
            bytes_read += res[1]
            if res[0] == "drop":
                filters[res[2]] += 1
                keep_sample(samples, res[2], res[3], cfg.drop_samples)
                continue
            _, _, line, chars, out_bytes, counts, key, sig, split = res
            dup = dedup.check_and_add(key, sig) if (cfg.dedup.exact or cfg.dedup.near) else None
            if dup is not None:
                dedup_counts[dup] += 1
                keep_sample(samples, f"dedup_{dup}", line.decode("utf-8")[:SAMPLE_CHARS], cfg.drop_samples)
                continue
            if counts:
                pii_counts.update(counts)
                with_pii += 1
            files[split].write(line)
            split_docs[split] += 1
            split_bytes[split] += out_bytes
            hist.add(chars)
        bar.close()
    finally:
        for fh in files.values():
            fh.close()
    seconds["filter"] = time.perf_counter() - t

    read = stats.documents
    tally.check(read, source_uri or cfg.source.uri, noun="examples", source_noun="records",
                knobs="--set quality.<key>=... or sft.<key>=...")

    t = time.perf_counter()
    tok_dir = workdir / "tokenizer"
    trained = tokenizer is None
    if trained:
        tokenizer = train_tokenizer(batched((r["text"] for r in _read_rows(raw_dir / "train.jsonl")), 1000),
                                    vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency)
    template = "tokenizer" if renderer.from_tokenizer else "default"
    if not renderer.from_tokenizer:
        # Written into the tokenizer folder: training saves it with the model and serving's
        # apply_chat_template then renders chat requests exactly as these examples were rendered.
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(tok_dir))
    seconds["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    split_stats: dict[str, SplitStats] = {}
    raw_hash: dict[str, bytes] = {}
    warnings_: list[str] = []
    for split in SPLITS:
        split_stats[split], raw_hash[split] = tokenize_split(
            tokenizer, raw_dir / f"{split}.jsonl", workdir / split, block_size=cfg.pack.block_size,
            overflow=cfg.sft.overflow, batch_size=cfg.batch_size, packing=cfg.sft.packing)
        if split_stats[split].examples == 0 and split == "train":
            raise DataError(f"no train example fits in a block of {cfg.pack.block_size} tokens "
                            f"({split_stats[split].too_long} too long); use a larger --block-size")
        if split_stats[split].examples == 0:
            warnings_.append(f"the {split} split holds no example")
            log.warning(warnings_[-1])
    seconds["tokenize"] = time.perf_counter() - t

    digest = _content_digest(raw_hash, tok_dir, cfg)
    examples = {s: split_stats[s].examples for s in SPLITS}
    card: dict[str, Any] = {
        "format": "sft",
        "digest": digest,
        "block_size": cfg.pack.block_size,
        "vocab_size": len(tokenizer),
        "source": source_uri or cfg.source.uri,
        "counts": tally.card_counts(read, sum(examples.values()), bytes_read, stats, with_pii),
        "filters": {**dict(filters), "too_long": sum(s.too_long for s in split_stats.values())},
        "dedup": tally.card_dedup(cfg, reference_docs),
        "pii": tally.card_pii(cfg),
        "pii_mode": cfg.pii.mode,
        "splits": examples,
        "split_bytes": dict(split_bytes),
        "tokens": {s: split_stats[s].tokens for s in SPLITS},
        # The rows: one per example, or fewer when examples are packed.
        "blocks": {s: split_stats[s].rows for s in SPLITS},
        "dropped_tail_tokens": {s: 0 for s in SPLITS},
        "sft": {
            "layouts": dict(layouts),
            "chat_template": template,
            "columns": {"prompt": cfg.sft.prompt_column, "response": cfg.sft.response_column,
                        "messages": cfg.sft.messages_column},
            "overflow": cfg.sft.overflow,
            "packing": cfg.sft.packing,
            "response_tokens": {s: split_stats[s].response_tokens for s in SPLITS},
            "truncated_examples": {s: split_stats[s].truncated for s in SPLITS},
            "truncated_tokens": {s: split_stats[s].truncated_tokens for s in SPLITS},
            "dropped_too_long": {s: split_stats[s].too_long for s in SPLITS},
            "max_length": {s: split_stats[s].max_length for s in SPLITS},
        },
        "tokenizer": card_tokenizer(tokenizer, trained=trained, source=str(cfg.tokenizer.name_or_path or tokenizer_path)),
        "document_length_chars": hist.to_dict(),
        "warnings": warnings_,
        "config": to_dict(cfg),
    }
    write_card(card, workdir)
    seconds["total"] = time.perf_counter() - t0
    return PipelineResult(card=card, drop_samples=samples, seconds=seconds)


def _content_digest(raw_hash: dict[str, bytes], tok_dir: Path, cfg: PrepareConfig) -> str:
    """sha256 over the kept examples, the tokenizer (template included) and the encoding settings."""
    h = hashlib.sha256(b"format=sft")
    for split in SPLITS:
        h.update(split.encode())
        h.update(raw_hash[split])
    for name in sorted(p.name for p in tok_dir.iterdir() if p.is_file()):
        h.update(name.encode())
        h.update((tok_dir / name).read_bytes())
    h.update(f"block_size={cfg.pack.block_size};overflow={cfg.sft.overflow};packing={cfg.sft.packing}".encode())
    return h.hexdigest()


# -- reading prepared sft data (training and evaluation) ------------------------------------------

def load_rows(split_dir: Path) -> tuple[list[list[int]], list[list[int]], list[list[int]] | None]:
    """``input_ids``, ``labels`` and (packed data only, else None) ``position_ids`` of a prepared sft split."""
    from datasets import load_from_disk

    ds = load_from_disk(str(split_dir))
    missing = [c for c in ("input_ids", "labels") if c not in ds.column_names]
    if missing:
        raise DataError(f"{split_dir}: no {' and '.join(missing)} column; not an sft split")
    positions = list(ds["position_ids"]) if "position_ids" in ds.column_names else None
    return list(ds["input_ids"]), list(ds["labels"]), positions


def pad_positions(positions: Iterable[Sequence[int]]) -> Any:
    """Right-padded ``position_ids`` of packed rows (padding gets 0: a one-token 'example' of its own)."""
    import torch

    positions = list(positions)
    width = max((len(r) for r in positions), default=0)
    out = np.zeros((len(positions), width), dtype=np.int64)
    for i, r in enumerate(positions):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def block_diagonal_mask(position_ids: Any) -> Any:
    """``[B, 1, T, T]`` boolean attention mask of packed rows: causal within each example only.

    An example starts wherever the position id is 0, so token ``i`` may attend to token ``j``
    when ``j <= i`` and no example starts in ``(j, i]``.
    """
    import torch

    example = torch.cumsum((position_ids == 0).long(), dim=1)
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal)[:, None]


def pad_rows(ids: Iterable[Sequence[int]], labels: Iterable[Sequence[int]], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask`` tensors."""
    import torch

    ids, labels = list(ids), list(labels)
    width = max((len(r) for r in ids), default=0)
    x = np.full((len(ids), width), pad_id, dtype=np.int64)
    y = np.full((len(ids), width), IGNORE_INDEX, dtype=np.int64)
    m = np.zeros((len(ids), width), dtype=np.int64)
    for i, (a, b) in enumerate(zip(ids, labels)):
        x[i, :len(a)] = a
        y[i, :len(b)] = b
        m[i, :len(a)] = 1
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)
