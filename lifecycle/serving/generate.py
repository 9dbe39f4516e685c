"""Loading the model folder and batched generation with left padding.

One ``generate`` call serves a whole batch: prompts are left-padded with an attention mask, so a
row's greedy output is the same whether it runs alone or beside others (tested). On CUDA the
weights are bf16 and decoding uses the KV cache under ``torch.inference_mode``; the optional
static cache lets transformers compile the decode step.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lifecycle.serving.requests import GenParams, InvalidRequest


@dataclass
class Completion:
    """One output row."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (hit max_new_tokens)
    truncated: bool = False  # the prompt was left-truncated to fit (only when the caller asked)


def pick_device(requested: str | None = None, model_dir: str | Path | None = None) -> Any:
    """The torch device: ``requested`` (or ``LIFECYCLE_DEVICE``), else CUDA when available.

    With ``model_dir`` a CPU-only variant in it falls back to CPU when no device was asked for
    (:func:`lifecycle.serving.variant.choose_device`).
    """
    import torch

    from lifecycle.serving.variant import choose_device, variant_device

    name = requested or os.environ.get("LIFECYCLE_DEVICE")
    return torch.device(variant_device(model_dir, name) if model_dir is not None else choose_device(name))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the accelerator running out of memory, in any of torch's spellings.

    ``torch.OutOfMemoryError`` for the caching allocator, and plain ``RuntimeError``s such as
    ``CUDA error: out of memory`` (raised by kernels and cuBLAS) or ``CUBLAS_STATUS_ALLOC_FAILED``.
    """
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return "out of memory" in text or "alloc_failed" in text


def free_accelerator_memory(device: Any) -> None:
    """Give cached CUDA blocks back after an out-of-memory, so the next batch starts from a clean pool."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a compiled decode step is built for: powers of two up to ``max_batch``, and it."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def load_model(model_dir: str | Path, device: Any) -> tuple[Any, Any]:
    """Model (bf16 on CUDA, fp32 on CPU, eval mode) and left-padding tokenizer from one folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lifecycle.serving.variant import load_variant

    # A compressed variant (int8 / half precision, see lifecycle.serving.variant) brings its own loader.
    model = load_variant(model_dir, device)
    if model is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        model.to(device)
        model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # Left padding keeps every prompt's last token at the end of the row, where decoding continues.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def context_length(model: Any) -> int:
    """The most positions the model attends over (prompt + completion)."""
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def encode_prompt(tokenizer: Any, text: str, *, max_prompt_tokens: int, truncate: bool) -> tuple[list[int], bool]:
    """Token ids of ``text``; over ``max_prompt_tokens`` it is refused, or left-truncated if asked."""
    return _fit(tokenizer(text)["input_ids"], max_prompt_tokens=max_prompt_tokens, truncate=truncate)


def encode_prompts(tokenizer: Any, texts: Sequence[str], *, max_prompt_tokens: int,
                   truncate: bool) -> list[tuple[list[int], bool]]:
    """:func:`encode_prompt` for many prompts in one tokenizer call (half the cost of one by one)."""
    encoded = tokenizer(list(texts), return_attention_mask=False)["input_ids"]
    return [_fit(ids, max_prompt_tokens=max_prompt_tokens, truncate=truncate) for ids in encoded]


def _fit(ids: list[int], *, max_prompt_tokens: int, truncate: bool) -> tuple[list[int], bool]:
    if not ids:
        raise InvalidRequest("prompt is empty after tokenization: give a non-empty prompt string")
    if len(ids) <= max_prompt_tokens:
        return ids, False
    if not truncate:
        raise InvalidRequest(
            f"prompt has {len(ids)} tokens; at most {max_prompt_tokens} fit (the context minus max_new_tokens, "
            "or the server's cap). Shorten it, lower max_new_tokens, or pass params {\"truncate\": true} "
            "to keep its last tokens"
        )
    # Keep the end: the tokens nearest the completion matter most for what comes next.
    return ids[-max_prompt_tokens:], True


# Sampling with a seed uses the global RNG: one generate at a time keeps a seeded request
# reproducible even when several threads call predict without the coalescer.
_GENERATE_LOCK = threading.Lock()


def generate_batch(model: Any, tokenizer: Any, batch_ids: Sequence[Sequence[int]], max_new: Sequence[int],
                   params: GenParams, *, static_cache: bool = False, threads: int | None = None,
                   buckets: Sequence[int] | None = None) -> list[Completion]:
    """Generate for a batch of tokenized prompts that share ``params`` (except ``max_new_tokens``).

    The batch runs to the largest ``max_new`` and each row is cut to its own, which is exactly
    what the row would have produced alone: decoding is causal and left padding is masked.
    ``threads`` sets torch's CPU threads for the calling thread: OpenMP settings are per thread,
    so the server's request threads (which lead batches) would otherwise use the default.

    ``static_cache`` compiles the decode step (``torch.compile`` through transformers). A compiled
    step is specialised to its shapes, so the cache always spans the whole context and the batch
    is padded up to the next of ``buckets`` (the padding rows are dropped): every request reuses
    one of a few graphs that :meth:`~lifecycle.serving.engine.Engine.warmup` built at load time,
    instead of recompiling on a request thread for each new batch size and length.
    """
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    rows = len(batch_ids)
    if static_cache and buckets:
        size = next((b for b in sorted(buckets) if b >= rows), rows)
        batch_ids = list(batch_ids) + [batch_ids[0]] * (size - rows)
        max_new = list(max_new) + [max_new[0]] * (size - rows)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = max(len(ids) for ids in batch_ids)
    # Padded rows built as lists and turned into tensors in one call each (not one per row).
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in batch_ids], dtype=torch.long)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids], dtype=torch.long)
    kwargs: dict[str, Any] = {"max_new_tokens": int(max(max_new)), "do_sample": params.do_sample,
                              "pad_token_id": pad, "eos_token_id": eos, "use_cache": True}
    if params.do_sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if static_cache:
        from transformers import CompileConfig

        kwargs["cache_implementation"] = "static"
        kwargs["max_cache_len"] = context_length(model)
        # CUDA graphs ("reduce-overhead") on a GPU; elsewhere transformers compiles only when told to.
        compile_config = CompileConfig(fullgraph=False, mode="reduce-overhead" if device.type == "cuda" else "default")
        compile_config._compile_all_devices = device.type != "cuda" or None
        kwargs["compile_config"] = compile_config
    config = GenerationConfig(**kwargs)
    extra: dict[str, Any] = {}
    if params.stop:
        extra = {"stop_strings": list(params.stop), "tokenizer": tokenizer}
    if threads and device.type == "cpu" and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with _GENERATE_LOCK, torch.inference_mode():
        if params.do_sample and params.seed is not None:
            torch.manual_seed(params.seed)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             generation_config=config, **extra)
    new_tokens = out[:rows, width:].tolist()
    return [_finish(tokenizer, ids, toks[:n], n, eos, pad, params.stop)
            for ids, toks, n in zip(batch_ids[:rows], new_tokens, max_new[:rows])]


def _finish(tokenizer: Any, prompt_ids: Sequence[int], tokens: list[int], limit: int, eos: int, pad: int,
            stop: Sequence[str]) -> Completion:
    """Cut one row at EOS / a stop string and say why it ended."""
    # A row that finished is filled with pad: with a pad distinct from EOS, pad also ends it.
    ends = [tokens.index(t) for t in {eos, pad} if t in tokens]
    end = min(ends) if ends else None
    kept = tokens if end is None else tokens[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    cut = min((p for p in (text.find(s) for s in stop) if p >= 0), default=-1)
    if cut >= 0:
        # After a stop string, transformers pads the finished row (pad may equal EOS): the tokens
        # up to there are the completion; the EOS that follows is padding, not generated.
        return Completion(text=text[:cut], prompt_tokens=len(prompt_ids), completion_tokens=len(kept),
                          finish_reason="stop")
    if end is not None:
        # The EOS the model chose counts as generated; pad filling after it does not.
        generated = end + 1 if tokens[end] == eos else end
        return Completion(text=text, prompt_tokens=len(prompt_ids), completion_tokens=generated, finish_reason="stop")
    # A batch that ended early because every row stopped cannot leave a row short of its
    # limit without EOS, so no EOS here means the row used its whole budget.
    return Completion(text=text, prompt_tokens=len(prompt_ids), completion_tokens=len(kept),
                      finish_reason="length" if len(kept) >= limit else "stop")
