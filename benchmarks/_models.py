"""Models and text for the benchmarks, built locally (no download, no ``datasets``, no MLflow).

One place for what several benchmarks need: the built-in corpus (CPython's documentation
topics, through the prepare stage's own reader), a byte-level BPE trained on it with the
project's own trainer, and a preset-shaped model folder the serving engine can load. A
vocabulary can be topped up with filler tokens to a given size (GPT-2's 50,257) so that the
embedding, and with it the bytes a decode step reads, has the real model's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: GPT-2's vocabulary size; 50,304 is the next multiple of 64 (what nanoGPT pads to).
GPT2_VOCAB = 50257
#: Dense bf16 peak of an H100/H200 SXM (TFLOP/s), for MFU.
PEAK_BF16_TFLOPS = 989.0


def corpus() -> list[str]:
    """The built-in corpus, one document per section of CPython's doc topics."""
    from lifecycle.data.sources import pydoc_documents

    return list(pydoc_documents())


def corpus_tokenizer(vocab_size: int, *, fill_to: int | None = None, documents: int | None = None) -> Any:
    """A byte-level BPE of ``vocab_size`` trained on :func:`corpus` (its first ``documents`` when
    given; the whole corpus takes a second or two), topped up with ``<filler_i>`` tokens to
    ``fill_to`` entries when given (fillers never occur in text)."""
    from lifecycle.data.tokenizer import train_tokenizer

    tok = train_tokenizer([corpus()[:documents]], vocab_size=vocab_size)
    missing = (fill_to or 0) - len(tok)
    if missing > 0:
        tok.add_tokens([f"<filler_{i}>" for i in range(missing)])
    return tok


def model_dir(out: Path, preset: str, tokenizer: Any, *, seed: int = 0, device: Any = "cpu") -> Path:
    """A freshly initialised ``preset`` model with ``tokenizer``, saved as the folder every stage
    (and the serving engine) loads; built on ``device`` (see :func:`build_on`)."""
    from lifecycle.train.model import save_model_dir

    return save_model_dir(build_on(device, preset, tokenizer, seed=seed), tokenizer, out)


def build_on(device: Any, preset: str, tokenizer: Any, **kwargs: Any) -> Any:
    """``build_model`` with the weights created on ``device``: initialising GPT-2's 124M
    parameters takes seconds on a CPU (12 s on a busy 2-core machine) and nothing on a GPU."""
    import torch

    from lifecycle.train.model import build_model

    with torch.device(device):
        return build_model(preset, tokenizer, **kwargs)


def prompts(n: int, *, min_words: int = 4, spread: int = 24) -> list[str]:
    """``n`` prompts of varied length (``min_words`` to ``min_words + spread - 1`` words) from the
    corpus: different lengths mean padded rows when they are batched."""
    words = " ".join(corpus()).split()
    return [" ".join(words[i * 37:i * 37 + min_words + (i * 7) % spread]) for i in range(n)]


class Vocab:
    """What ``build_model`` needs of a tokenizer: a size and special ids (for random-token data,
    where no text is tokenized)."""

    def __init__(self, size: int):
        self.size = size
        self.eos_token_id = self.bos_token_id = self.pad_token_id = size - 1

    def __len__(self) -> int:
        return self.size


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights (position embeddings left out) plus
    attention, 12 * layers * width * sequence (PaLM appendix B)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len
