"""Prepared data for training: checked loading and a resumable, rank-aware sample order.

The order of training samples is a pure function of (seed, global sample index): epoch ``e`` is
a permutation drawn from ``seed + e``. The data position saved in a checkpoint is therefore just
the number of samples consumed, and a run on W processes with micro-batch b sees, step for step,
the same global batches as one process with micro-batch W*b.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.errors import DataError

SPLITS = ("train", "validation")


@dataclass
class PreparedData:
    """The parts of a prepared data folder the training loop needs."""

    root: Path
    train: Any  # torch.LongTensor [N, block_size]
    validation: Any  # torch.LongTensor [M, block_size]
    tokenizer: Any
    card: dict[str, Any]

    @property
    def block_size(self) -> int:
        """Tokens per packed block."""
        return int(self.train.shape[1])

    @property
    def digest(self) -> str:
        """The prepared content's digest from the data card ('' if the card has none)."""
        return str(self.card.get("digest", ""))


def _load_split(root: Path, split: str) -> Any:
    import numpy as np
    import torch
    from datasets import load_from_disk

    path = root / split
    if not path.is_dir():
        raise DataError(f"prepared data {root} has no {split}/ split; make it with `lifecycle prepare --output {root}`")
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises several types for a broken folder
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if "input_ids" not in ds.column_names:
        raise DataError(f"{path} has no input_ids column (columns: {', '.join(ds.column_names)}); "
                        "training needs LM-format prepared data")
    if len(ds) == 0:
        raise DataError(f"{path} is empty: prepare more documents (--max-documents) or a smaller --block-size")
    ds = ds.with_format("numpy", columns=["input_ids"])
    try:
        arr = np.stack(list(ds["input_ids"]))
    except ValueError:
        raise DataError(f"{path}: blocks have different lengths; expected packed blocks of block_size tokens") from None
    return torch.from_numpy(arr.astype(np.int64))


def load_prepared(root: str | Path) -> PreparedData:
    """Load train/validation blocks, tokenizer and data card, with one-line errors for gaps."""
    from transformers import AutoTokenizer

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"prepared data folder not found: {root}")
    card_path = root / "data_card.json"
    card: dict[str, Any] = {}
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{card_path}: invalid JSON ({exc.msg})") from None
    if card.get("format", "lm") != "lm":
        raise DataError(f"{root} holds {card.get('format')!r}-format data; training takes 'lm' data")
    tok_dir = root / "tokenizer"
    if not tok_dir.is_dir():
        raise DataError(f"prepared data {root} has no tokenizer/ folder; make it with `lifecycle prepare`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load the tokenizer in {tok_dir}: {str(exc).splitlines()[0]}") from None
    train, validation = (_load_split(root, s) for s in SPLITS)
    if train.shape[1] != validation.shape[1]:
        raise DataError(f"{root}: train blocks have {train.shape[1]} tokens but validation blocks {validation.shape[1]}")
    top = int(max(train.max(), validation.max()))
    if top >= len(tokenizer):
        raise DataError(f"{root}: token id {top} is outside the tokenizer's vocabulary ({len(tokenizer)}); "
                        "the data and tokenizer/ do not belong together")
    return PreparedData(root=root, train=train, validation=validation, tokenizer=tokenizer, card=card)


class SampleOrder:
    """Which training rows form each micro-batch, as a pure function of the step.

    One optimizer step consumes ``global_batch = micro_batch * grad_accum * world_size`` rows of
    an endless stream made of seeded permutations, one per epoch. Rank ``r`` takes, for
    accumulation slice ``a``, rows ``[(a * world + r) * micro, ... + micro)`` of the step's
    global batch.
    """

    def __init__(self, num_rows: int, *, seed: int, micro_batch: int, grad_accum: int = 1,
                 world_size: int = 1, rank: int = 0):
        if num_rows <= 0:
            raise DataError("no training rows")
        self.num_rows = num_rows
        self.seed = seed
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self._perms: dict[int, Any] = {}

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all processes."""
        return self.micro_batch * self.grad_accum * self.world_size

    def _perm(self, epoch: int) -> Any:
        import torch

        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_rows, generator=gen)
            # Two epochs are enough to serve any batch that straddles an epoch boundary.
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def rows(self, start: int, count: int) -> Any:
        """Row indices of stream positions ``start .. start+count``."""
        import torch

        out = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.num_rows)
            take = min(count - len(out), self.num_rows - offset)
            out.extend(self._perm(epoch)[offset: offset + take].tolist())
            pos += take
        return torch.tensor(out, dtype=torch.long)

    def micro_batch_rows(self, step: int, accum_index: int) -> Any:
        """This rank's rows for accumulation slice ``accum_index`` of optimizer step ``step`` (0-based)."""
        offset = step * self.global_batch + (accum_index * self.world_size + self.rank) * self.micro_batch
        return self.rows(offset, self.micro_batch)

    def samples_consumed(self, steps_done: int) -> int:
        """The data position after ``steps_done`` optimizer steps (stored in checkpoints)."""
        return steps_done * self.global_batch

    def epoch_at(self, steps_done: int) -> float:
        """Fractional epochs seen after ``steps_done`` steps."""
        return self.samples_consumed(steps_done) / self.num_rows
