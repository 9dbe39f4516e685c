"""Training-time collation of instruction data: padding rows, and the mask that keeps packed examples apart."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from lifecycle.data.encode import IGNORE_INDEX


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
