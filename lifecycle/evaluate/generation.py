"""Prompt sets and generation metrics (ROUGE-L, BLEU, exact match) through local evaluate modules.

A prompt set is JSONL: one ``{"prompt": ..., "reference": ...}`` per line. The default set is cut
from the evaluated split's documents: each document is cut in two at a word boundary; the first
part (its last ``max_prompt_chars`` characters) is the prompt, the first ``reference_words`` words
of the rest the reference.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from lifecycle.data.raw import json_objects
from lifecycle.errors import DataError

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Prompt:
    """One prompt and the text it should be continued with."""

    prompt: str
    reference: str


def load_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read a JSONL prompt file; a malformed line is a :class:`DataError` naming ``file:line``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file not found: {p}")
    prompts: list[Prompt] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, row in json_objects(lines, p):
        missing = [k for k in ("prompt", "reference") if k not in row]
        if missing:
            raise DataError(f"{p}:{number}: missing {' and '.join(repr(k) for k in missing)}")
        if not isinstance(row["prompt"], str) or not isinstance(row["reference"], str):
            raise DataError(f"{p}:{number}: 'prompt' and 'reference' must be strings")
        if not row["prompt"].strip():
            raise DataError(f"{p}:{number}: empty prompt")
        prompts.append(Prompt(row["prompt"], row["reference"]))
    if not prompts:
        raise DataError(f"{p}: no prompts (the file is empty)")
    return prompts[:limit] if limit else prompts


def _first_words(text: str, n: int | None) -> str:
    if n is None:
        return text.strip()
    words = _WORD.findall(text)
    return " ".join(words[:n])


def cut_document(text: str, fraction: float, max_prompt_chars: int, reference_words: int | None) -> Prompt | None:
    """Cut ``text`` in two at the whitespace nearest ``fraction`` of its length (None if it can't)."""
    text = text.strip()
    target = int(len(text) * fraction)
    spaces = [m.start() for m in re.finditer(r"\s", text)]
    if not spaces:
        return None
    cut = min(spaces, key=lambda i: abs(i - target))
    head, tail = text[:cut].rstrip(), text[cut:].strip()
    if not head or not tail:
        return None
    if len(head) > max_prompt_chars:
        # Keep the end of the head (what the continuation follows), starting at a word boundary.
        head = head[-max_prompt_chars:]
        head = head[head.find(" ") + 1:] if " " in head else head
    reference = _first_words(tail, reference_words)
    return Prompt(head, reference) if reference else None


def default_prompts(documents: Sequence[str], *, num_prompts: int, cut_fraction: float = 0.5,
                    max_prompt_chars: int = 400, min_document_chars: int = 40,
                    reference_words: int | None = 24) -> list[Prompt]:
    """The default prompt set: the first ``num_prompts`` usable documents, each cut in two.

    Deterministic (document order), so a challenger and its baseline, and two runs on the same
    data digest, see the same prompts.
    """
    prompts: list[Prompt] = []
    for doc in documents:
        if len(doc.strip()) < min_document_chars:
            continue
        item = cut_document(doc, cut_fraction, max_prompt_chars, reference_words)
        if item is not None:
            prompts.append(item)
        if len(prompts) >= num_prompts:
            break
    if not prompts:
        raise DataError(f"no document of the split is long enough (>= {min_document_chars} characters) "
                        "to cut into a prompt; give --prompts FILE.jsonl")
    return prompts


def write_prompts(prompts: Sequence[Prompt], path: str | Path) -> Path:
    """Write a prompt set as JSONL (logged with the run so it can be reused with --prompts)."""
    p = Path(path)
    with p.open("w", encoding="utf-8") as fh:
        for item in prompts:
            fh.write(json.dumps({"prompt": item.prompt, "reference": item.reference}, ensure_ascii=False) + "\n")
    return p


@lru_cache(maxsize=None)
def load_metric(name: str) -> Any:
    """Load one of the project's local evaluate modules by path (never from a hub)."""
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no local metric {name!r}; known: {', '.join(known)}")
    return evaluate.load(str(path))


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-L (F, 0..1), BLEU (sacrebleu, 0..100) and exact match (0..1) of generated text."""
    preds, refs = list(predictions), list(references)
    rouge = load_metric("rouge").compute(predictions=preds, references=refs, rouge_types=["rougeL"])
    bleu = load_metric("bleu").compute(predictions=preds, references=refs)
    exact = load_metric("exact_match").compute(predictions=preds, references=refs)
    return {"rougeL": float(rouge["rougeL"]), "bleu": float(bleu["bleu"]), "exact_match": float(exact["exact_match"])}


def per_prompt_rouge(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F of each prediction against its reference (for win rates)."""
    scores = load_metric("rouge").compute(predictions=list(predictions), references=list(references),
                                          rouge_types=["rougeL"], use_aggregator=False)
    return [float(s) for s in scores["rougeL"]]


def continuation_nll(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, device: str = "cpu",
                     batch_size: int = 8) -> list[float]:
    """Bits per byte of each reference given its prompt (teacher-forced): the model's own judgement
    of the right continuation, comparable across tokenizers because it is normalised by bytes."""
    import math

    import torch

    from lifecycle.evaluate.loss import _token_nll, context_length, document_prefix_id

    ctx = context_length(model)
    prefix = document_prefix_id(tokenizer)
    rows: list[tuple[list[int], int, int]] = []
    for item in prompts:
        p_ids = [prefix, *tokenizer(item.prompt, add_special_tokens=False)["input_ids"]]
        # The reference follows the prompt after a space (how cut_document split it).
        r_ids = tokenizer(" " + item.reference, add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[-ctx:]
        n_ref = min(len(r_ids), len(ids) - 1)
        rows.append((ids, n_ref, max(len((" " + item.reference).encode("utf-8")), 1)))
    out: list[float] = []
    with torch.inference_mode():
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo:lo + batch_size]
            width = max(len(ids) for ids, _, _ in chunk)
            ids_t = torch.full((len(chunk), width), prefix, dtype=torch.long)
            mask = torch.zeros_like(ids_t)
            for r, (ids, _, _) in enumerate(chunk):
                ids_t[r, :len(ids)] = torch.tensor(ids)
                mask[r, :len(ids)] = 1
            nll = _token_nll(model, ids_t.to(device), mask.to(device)).double().cpu()
            for r, (ids, n_ref, n_bytes) in enumerate(chunk):
                end = len(ids) - 1  # predictions for positions 1..len-1 live at 0..len-2
                total = float(nll[r, end - n_ref:end].sum()) if n_ref > 0 else 0.0
                out.append(total / math.log(2) / n_bytes)
    return out
