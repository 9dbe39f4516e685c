"""Loss, perplexity and bits-per-byte of a causal LM: batched, under ``torch.inference_mode``.

Two measurements:

* :func:`block_losses` scores the split's packed blocks exactly as training saw them (every
  token after the first of a block is predicted from the ones before it); ``eval/loss`` is the
  mean negative log-likelihood per predicted token and ``eval/perplexity`` its exponential.
* :func:`document_nll` scores raw documents for bits-per-byte, independent of the tokenizer.
  EOS handling: each document is tokenized on its own without special tokens and preceded by one
  EOS token (the separator the model saw between documents in the packed training blocks, so the
  first token is predicted "at the start of a document"). That EOS is context only; the
  document's own tokens are all scored and no closing EOS is scored, so the count of bits covers
  the document's bytes and nothing else. Documents longer than the model's context are split
  into disjoint windows of ``window`` tokens; each window's first token is context only, so
  every token of the document is scored exactly once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from lifecycle.errors import DataError

LN2 = math.log(2.0)


def resolve_device(name: str = "auto") -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from lifecycle.errors import ConfigError

        raise ConfigError("device: cuda was asked for but no GPU is visible")
    return name


def resolve_precision(name: str, device: str) -> str:
    """``auto`` becomes bf16 on CUDA (what serving runs) and fp32 elsewhere; bf16 needs CUDA."""
    if name == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if name == "bf16" and not device.startswith("cuda"):
        from lifecycle.errors import ConfigError

        raise ConfigError("precision: bf16 evaluation needs CUDA (serving runs bf16 only on a GPU); use fp32 on a CPU")
    return name


def load_lm(model_dir: Any, device: str = "cpu", precision: str = "fp32") -> tuple[Any, Any]:
    """Load the model (eval mode, on ``device``, in ``precision``) and its tokenizer from one Hugging Face folder.

    A compressed variant keeps the dtype it is served in, whatever ``precision`` says.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lifecycle.serving.variant import load_variant

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # A compressed variant is measured as it is served (lifecycle.serving.variant).
    model = load_variant(model_dir, torch.device(device))
    if model is None:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        model.to(device).eval()
    return model, tokenizer


def context_length(model: Any) -> int:
    """The model's maximum sequence length (``n_positions`` / ``max_position_embeddings``)."""
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def _token_nll(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """Per-position negative log-likelihood (nats) of tokens 1..L-1 given the ones before: [B, L-1]."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :]
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape)


@dataclass
class BlockLoss:
    """Loss over packed blocks: per-block mean NLL (nats/token) and the totals."""

    block_nll: np.ndarray
    total_nll: float
    tokens: int
    seconds: float

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per predicted token (nats)."""
        return self.total_nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        """exp(loss), capped so a random model does not log inf."""
        return math.exp(min(self.loss, 700.0))

    @property
    def tokens_per_s(self) -> float:
        """Tokens scored per second of wall time (input tokens of every block)."""
        return (self.tokens + len(self.block_nll)) / max(self.seconds, 1e-9)


def block_losses(model: Any, blocks: Any, *, batch_size: int = 16, device: str = "cpu",
                 progress: bool = True, desc: str = "loss") -> BlockLoss:
    """Score packed blocks (``[N, T]`` token ids, all the same length) in batches."""
    import torch
    from tqdm.auto import tqdm

    arr = np.asarray(blocks, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise DataError("no blocks to evaluate (the split is empty)")
    if arr.shape[1] < 2:
        raise DataError(f"blocks of {arr.shape[1]} token(s) leave nothing to predict")
    ctx = context_length(model)
    if arr.shape[1] > ctx:
        raise DataError(f"blocks of {arr.shape[1]} tokens exceed the model's context of {ctx} tokens")
    per_block = np.empty(arr.shape[0], dtype=np.float64)
    total = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in tqdm(range(0, arr.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            ids = torch.from_numpy(arr[lo:lo + batch_size]).to(device)
            nll = _token_nll(model, ids, torch.ones_like(ids)).double()
            sums = nll.sum(dim=1).cpu().numpy()
            per_block[lo:lo + len(sums)] = sums / nll.shape[1]
            total += float(sums.sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return BlockLoss(block_nll=per_block, total_nll=total, tokens=arr.shape[0] * (arr.shape[1] - 1), seconds=seconds)


def document_windows(token_ids: Sequence[int], prefix_id: int, window: int) -> list[list[int]]:
    """Split ``[prefix] + token_ids`` into windows of at most ``window`` tokens.

    Window ``k`` starts where window ``k-1``'s scored tokens ended, minus one token of context,
    so that, scoring every position but the first of each window, each document token is scored
    exactly once and the prefix is never scored.
    """
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    seq = [int(prefix_id), *map(int, token_ids)]
    step = window - 1
    return [seq[lo:lo + window] for lo in range(0, len(token_ids), step)]


@dataclass
class DocumentNLL:
    """Per-document negative log-likelihood (nats), UTF-8 bytes and scored tokens."""

    nll: np.ndarray
    num_bytes: np.ndarray
    num_tokens: np.ndarray
    seconds: float

    @property
    def bits_per_byte(self) -> float:
        """Total bits over total bytes."""
        return float(self.nll.sum() / LN2 / max(int(self.num_bytes.sum()), 1))

    @property
    def per_document_bpb(self) -> np.ndarray:
        """Bits per byte of each document (the unit of paired comparisons across tokenizers)."""
        return self.nll / LN2 / np.maximum(self.num_bytes, 1)


def document_prefix_id(tokenizer: Any) -> int:
    """The context token placed before each document: EOS (the training separator), else BOS."""
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise DataError("the model's tokenizer has no EOS/BOS token to start documents with")


def document_nll(model: Any, tokenizer: Any, documents: Sequence[str], *, window: int | None = None,
                 batch_size: int = 16, device: str = "cpu", progress: bool = True,
                 desc: str = "bits/byte") -> DocumentNLL:
    """Score each document's tokens (see the module docstring for EOS and window handling)."""
    import torch
    from tqdm.auto import tqdm

    if not documents:
        raise DataError("no documents to evaluate (the split is empty)")
    window = min(window or context_length(model), context_length(model))
    prefix = document_prefix_id(tokenizer)
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    windows: list[tuple[int, list[int]]] = []
    for doc_index, ids in enumerate(encoded):
        windows += [(doc_index, w) for w in document_windows(ids, prefix, window)]
    # Longest first: batches of similar lengths waste little on padding.
    windows.sort(key=lambda item: -len(item[1]))
    nll = np.zeros(len(documents), dtype=np.float64)
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = windows[lo:lo + batch_size]
            width = max(len(w) for _, w in chunk)
            ids = torch.full((len(chunk), width), prefix, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (_, w) in enumerate(chunk):
                ids[row, :len(w)] = torch.tensor(w, dtype=torch.long)
                mask[row, :len(w)] = 1
            ids, mask = ids.to(device), mask.to(device)
            token_nll = _token_nll(model, ids, mask).double() * mask[:, 1:]
            sums = token_nll.sum(dim=1).cpu().numpy()
            for row, (doc_index, _) in enumerate(chunk):
                nll[doc_index] += sums[row]
    seconds = time.perf_counter() - start
    return DocumentNLL(
        nll=nll,
        num_bytes=np.array([len(d.encode("utf-8")) for d in documents], dtype=np.int64),
        num_tokens=np.array([len(ids) for ids in encoded], dtype=np.int64),
        seconds=seconds,
    )


def pack_documents(tokenizer: Any, documents: Sequence[str], block_size: int) -> np.ndarray:
    """Pack documents into blocks of ``block_size`` ids with EOS after each document, with the
    prepare stage's own packer (the layout training saw), for text evaluated with a model's own
    tokenizer; the last partial block is dropped as in preparation."""
    from lifecycle.data.pack import BlockPacker
    from lifecycle.data.tokenizer import encode_batch

    packer = BlockPacker(block_size, document_prefix_id(tokenizer))
    blocks = packer.add(encode_batch(tokenizer, list(documents)))
    if len(blocks) == 0:
        raise DataError(f"the text holds {packer.tokens} tokens: fewer than one block of {block_size}")
    return blocks


@dataclass
class ResponseLoss(BlockLoss):
    """Loss of instruction examples on their response tokens only (prompts are context).

    ``block_nll`` holds each example's mean NLL per response token; ``example_nll`` its sum (nats).
    """

    example_nll: np.ndarray = None  # type: ignore[assignment]
    example_tokens: np.ndarray = None  # type: ignore[assignment]


def response_losses(model: Any, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *,
                    batch_size: int = 16, device: str = "cpu", pad_id: int = 0, progress: bool = True,
                    desc: str = "response loss") -> ResponseLoss:
    """Score each example's labelled tokens (labels != -100), each from the tokens before it."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from lifecycle.data.encode import IGNORE_INDEX
    from lifecycle.train.collate import pad_rows

    n = len(input_ids)
    if n == 0:
        raise DataError("no examples to evaluate (the split is empty)")
    ctx = context_length(model)
    longest = max(len(r) for r in input_ids)
    if longest > ctx:
        raise DataError(f"an example of {longest} tokens exceeds the model's context of {ctx} tokens")
    # Similar lengths batched together waste little on padding.
    order = sorted(range(n), key=lambda i: -len(input_ids[i]))
    sums = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[lo:lo + batch_size]
            x, y, m = pad_rows([input_ids[i] for i in idx], [labels[i] for i in idx], pad_id)
            x, y, m = x.to(device), y.to(device), m.to(device)
            logits = model(input_ids=x, attention_mask=m).logits[:, :-1, :].float()
            target = y[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="none").view(target.shape).double()
            sums[idx] = nll.sum(dim=1).cpu().numpy()
            counts[idx] = (target != IGNORE_INDEX).sum(dim=1).cpu().numpy()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return ResponseLoss(block_nll=sums / np.maximum(counts, 1), total_nll=float(sums.sum()), tokens=int(counts.sum()),
                        seconds=seconds, example_nll=sums, example_tokens=counts)
