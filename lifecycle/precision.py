"""Numeric precision switches shared by training and evaluation (imports nothing of ours).

TF32 is a process-wide torch setting. Training wants it for the fp32 matmuls left outside bf16
autocast; evaluation in "fp32" must not silently run in TF32 because a training step ran earlier
in the same process (a pipeline). So nobody sets it globally: each stage scopes it with
:func:`tf32`, which restores the previous setting on exit.

torch 2.9 added per-backend ``fp32_precision`` settings next to the legacy ``allow_tf32`` flags.
Once anything in the process sets the new ones (transformers' ``TrainingArguments(tf32=...)``
does, on torch >= 2.9), *reading* a legacy flag raises "mix of the legacy and new APIs"; the new
ones stay readable whatever was set before. So everything here goes through the new settings where
they exist, and other code asks :func:`tf32_matmul_enabled` instead of reading ``allow_tf32``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


def _precision_settings(torch: Any) -> list[Any]:
    """The new-API objects whose ``fp32_precision`` governs TF32 (empty before torch 2.9)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return []
    return [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 matmuls and convolutions inside the block; restore the previous setting after."""
    import torch

    settings = _precision_settings(torch)
    if settings:
        before = [s.fp32_precision for s in settings]
        for s in settings:
            s.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            for s, value in zip(settings, before):
                s.fp32_precision = value
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def tf32_matmul_enabled() -> bool:
    """Whether fp32 CUDA matmuls may run in TF32 now, read without tripping torch's legacy/new API check."""
    import torch

    if _precision_settings(torch):
        value = torch.backends.cuda.matmul.fp32_precision
        if value == "none":  # "none" inherits the process-wide setting
            value = torch.backends.fp32_precision
        return value == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)
