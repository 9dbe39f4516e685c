"""Numeric precision switches shared by training and evaluation (imports nothing of ours).

TF32 is a process-wide torch setting. Training wants it for the fp32 matmuls left outside bf16
autocast; evaluation in "fp32" must not silently run in TF32 because a training step ran earlier
in the same process (a pipeline). So nobody sets it globally: each stage scopes it with
:func:`tf32`, which restores the previous setting on exit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 matmuls and convolutions inside the block; restore the previous setting after."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
