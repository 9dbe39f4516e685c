"""Measure one model (challenger or baseline) on prepared data and a prompt set.

The steps run in an order that keeps one copy of the weights in memory at a time: first the
teacher-forced measurements (block loss, bits-per-byte, reference likelihood) on a plain
``AutoModelForCausalLM``, then generation, behavioural checks and latency through the pyfunc model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lifecycle.errors import DataError
from lifecycle.evaluate import checks as checks_mod
from lifecycle.evaluate import generation, latency, loss
from lifecycle.evaluate.config import EvalConfig
from lifecycle.evaluate.dataset import EvalData, tokenizers_match

log = logging.getLogger(__name__)


@dataclass
class SideResult:
    """Everything measured on one model, with the per-unit values comparisons pair up."""

    label: str
    uri: str
    metrics: dict[str, float]
    block_nll: np.ndarray
    blocks_digest: str
    doc_bpb: np.ndarray
    prompt_bpb: list[float]
    generations: list[str]
    prompt_rouge: list[float]
    checks: list[checks_mod.CheckResult]
    vocab_digest: str
    served_via: str = ""
    served_device: str = ""
    notes: list[str] = field(default_factory=list)
    #: What the teacher-forced measurements ran in: fp32, bf16, fp16, or a variant's own (int8-dynamic).
    precision: str = ""


def precision_of(model: Any, model_dir: Path) -> str:
    """The precision ``model`` computes in: an int8 variant by name, else its weights' dtype (fp32, bf16, fp16)."""
    from lifecycle.serving.variant import read_variant

    meta = read_variant(model_dir)
    if meta is not None and meta["method"] == "int8-dynamic":
        return "int8-dynamic"
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    for p in model.parameters():
        if p.is_floating_point():
            dtype = str(p.dtype).replace("torch.", "")
            return names.get(dtype, dtype)
    return "unknown"


def vocab_digest(tokenizer: Any) -> str:
    """A digest of the tokenizer's vocabulary (equal digests: the same token ids for a text)."""
    blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _blocks_for(data: EvalData, tokenizer: Any, model: Any, cfg: EvalConfig, notes: list[str]) -> np.ndarray:
    """The prepared blocks when this tokenizer made them, else the documents packed with it."""
    if data.prepared and tokenizers_match(data, tokenizer):
        blocks = data.blocks
    else:
        size = cfg.loss.block_size or data.block_size or min(loss.context_length(model), 256)
        size = min(size, loss.context_length(model))
        if data.prepared:
            notes.append(f"tokenizer differs from the prepared data's: loss over the split's raw documents "
                         f"packed with this model's tokenizer into blocks of {size}")
        blocks = loss.pack_documents(tokenizer, data.documents, size)
    assert blocks is not None
    return blocks[: cfg.loss.max_blocks] if cfg.loss.max_blocks else blocks


def _generate(predict: Any, prompts: Sequence[generation.Prompt], cfg: EvalConfig) -> list[str]:
    params = {"max_new_tokens": cfg.generation.max_new_tokens, "do_sample": False, "truncate": True}
    out: list[str] = []
    size = cfg.generation.batch_size
    for lo in range(0, len(prompts), size):
        frame = predict([p.prompt for p in prompts[lo:lo + size]], params)
        out += [str(t) for t in frame["text"]]
    return out


def _teacher_forced_lm(label: str, model: Any, tokenizer: Any, data: EvalData, prompts: Sequence[generation.Prompt],
                       cfg: EvalConfig, *, device: str, progress: bool, notes: list[str]) -> tuple:
    """Raw text: loss over packed blocks, bits-per-byte over documents, reference likelihood."""
    blocks = _blocks_for(data, tokenizer, model, cfg, notes)
    block = loss.block_losses(model, blocks, batch_size=cfg.loss.batch_size, device=device, progress=progress,
                              desc=f"{label} loss")
    docs = data.documents[: cfg.loss.max_documents] if cfg.loss.max_documents else data.documents
    dn = loss.document_nll(model, tokenizer, docs, window=cfg.loss.window, batch_size=cfg.loss.batch_size,
                           device=device, progress=progress, desc=f"{label} bits/byte")
    bpb = generation.load_metric("bits_per_byte").compute(nll=dn.nll.tolist(), num_bytes=dn.num_bytes.tolist())
    prompt_bpb = generation.continuation_nll(model, tokenizer, prompts, device=device,
                                             batch_size=cfg.generation.batch_size)
    metrics: dict[str, float] = {
        "loss": block.loss,
        "perplexity": block.perplexity,
        "loss_tokens_per_s": block.tokens_per_s,
        "bits_per_byte": float(bpb["bits_per_byte"]),
        "num_blocks": float(len(block.block_nll)),
        "num_documents": float(len(docs)),
        "num_prompts": float(len(prompts)),
        "reference_bits_per_byte": float(np.mean(prompt_bpb)),
    }
    blocks_digest = hashlib.sha256(np.ascontiguousarray(blocks).tobytes()).hexdigest()[:16]
    return metrics, block, dn.per_document_bpb, prompt_bpb, blocks_digest


def sft_rows(data: EvalData, tokenizer: Any, model: Any, notes: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """The prepared example rows when this tokenizer made them, else the examples' segments
    tokenized with this model's tokenizer (a baseline with another vocabulary)."""
    from lifecycle.data.encode import encode_segments

    assert data.sft is not None
    if tokenizers_match(data, tokenizer):
        return data.sft.input_ids, data.sft.labels
    size = min(data.block_size or loss.context_length(model), loss.context_length(model))
    notes.append(f"tokenizer differs from the prepared data's: the examples re-tokenized with this model's "
                 f"tokenizer (at most {size} tokens each)")
    ids, labels = [], []
    for example in data.sft.examples:
        enc = encode_segments(tokenizer, example["segments"], block_size=size, overflow="truncate")
        if enc.dropped:
            raise DataError(f"an example does not fit this model's context of {size} tokens once re-tokenized")
        ids.append(enc.input_ids)
        labels.append(enc.labels)
    return ids, labels


def _teacher_forced_sft(label: str, model: Any, tokenizer: Any, data: EvalData, prompts: Sequence[generation.Prompt],
                        cfg: EvalConfig, *, device: str, progress: bool, notes: list[str]) -> tuple:
    """Instruction data: loss and perplexity on the response tokens only (prompts are context);
    bits-per-byte of the responses; per-example values for the paired comparison."""
    assert data.sft is not None
    ids, labels = sft_rows(data, tokenizer, model, notes)
    n = min(len(ids), cfg.loss.max_blocks) if cfg.loss.max_blocks else len(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else loss.document_prefix_id(tokenizer)
    rl = loss.response_losses(model, ids[:n], labels[:n], batch_size=cfg.loss.batch_size, device=device,
                              pad_id=int(pad), progress=progress, desc=f"{label} response loss")
    nbytes = data.sft.response_bytes()[:n]
    example_bpb = rl.example_nll / loss.LN2 / nbytes
    # The default prompt set is the split's first examples (same order): their response bits/byte
    # are the reference likelihoods; a --prompts file is scored like raw-text prompts.
    same = len(prompts) <= n and all(p.prompt == e["prompt"] for p, e in zip(prompts, data.sft.examples))
    prompt_bpb = ([float(v) for v in example_bpb[:len(prompts)]] if same else
                  generation.continuation_nll(model, tokenizer, prompts, device=device,
                                              batch_size=cfg.generation.batch_size))
    metrics: dict[str, float] = {
        "loss": rl.loss,
        "perplexity": rl.perplexity,
        "loss_tokens_per_s": rl.tokens_per_s,
        "bits_per_byte": float(rl.example_nll.sum() / loss.LN2 / max(int(nbytes.sum()), 1)),
        "num_examples": float(n),
        "num_response_tokens": float(rl.tokens),
        "num_prompts": float(len(prompts)),
        "reference_bits_per_byte": float(np.mean(prompt_bpb)) if prompt_bpb else float("nan"),
    }
    h = hashlib.sha256()
    for row, lab in zip(ids[:n], labels[:n]):
        h.update(np.asarray(row, dtype=np.int64).tobytes() + b"|" + np.asarray(lab, dtype=np.int64).tobytes())
    return metrics, rl, example_bpb, prompt_bpb, h.hexdigest()[:16]


def measure_model(label: str, uri: str, model_dir: Path, data: EvalData, prompts: Sequence[generation.Prompt],
                  suite: Sequence[checks_mod.Check], cfg: EvalConfig, *, device: str,
                  progress: bool = True) -> SideResult:
    """Run every measurement of one model; metric names without the ``eval/`` prefix."""
    from lifecycle.evaluate.predictor import Predictor

    notes: list[str] = []
    model, tokenizer = loss.load_lm(model_dir, device, loss.resolve_precision(cfg.precision, device))
    precision = precision_of(model, model_dir)
    if data.sft is not None:
        metrics, block, doc_bpb, prompt_bpb, blocks_digest = _teacher_forced_sft(
            label, model, tokenizer, data, prompts, cfg, device=device, progress=progress, notes=notes)
    else:
        metrics, block, doc_bpb, prompt_bpb, blocks_digest = _teacher_forced_lm(
            label, model, tokenizer, data, prompts, cfg, device=device, progress=progress, notes=notes)
    vdigest = vocab_digest(tokenizer)
    del model
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()

    predictor = Predictor(model_dir, device=None if cfg.device == "auto" else cfg.device)
    try:
        texts = _generate(predictor, prompts, cfg)
        refs = [p.reference for p in prompts]
        metrics.update(generation.generation_metrics(texts, refs))
        rouge = generation.per_prompt_rouge(texts, refs)
        results = checks_mod.run_suite(list(suite), predictor)
        metrics.update({f"check_{r.name}": 1.0 if r.passed else 0.0 for r in results})
        if cfg.latency.enabled:
            timed = [latency.measure(predictor, [p.prompt for p in prompts], batch_size=b,
                                     requests=cfg.latency.requests, warmup=cfg.latency.warmup,
                                     max_new_tokens=cfg.latency.max_new_tokens, sync=predictor.sync)
                     for b in cfg.latency.batch_sizes]
            metrics.update(latency.latency_metrics(timed))
        via, served_on = predictor.via, predictor.device
    finally:
        predictor.close()
    return SideResult(label=label, uri=uri, metrics=metrics, block_nll=block.block_nll, blocks_digest=blocks_digest,
                      doc_bpb=doc_bpb, prompt_bpb=prompt_bpb, generations=texts, prompt_rouge=rouge,
                      checks=results, vocab_digest=vdigest, served_via=via, served_device=served_on, notes=notes,
                      precision=precision)
