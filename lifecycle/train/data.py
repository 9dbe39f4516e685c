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

from lifecycle.data.card import read_card
from lifecycle.errors import DataError

SPLITS = ("train", "validation")


@dataclass
class PreparedData:
    """The parts of a prepared data folder the training loop needs."""

    root: Path
    train: Any  # torch.LongTensor [N, block_size] (sft: [N, longest example], right-padded)
    validation: Any  # torch.LongTensor [M, block_size]
    tokenizer: Any
    card: dict[str, Any]
    #: sft data only: labels (-100 on prompts and padding) and attention masks, shaped like the ids.
    train_labels: Any = None
    validation_labels: Any = None
    train_mask: Any = None
    validation_mask: Any = None
    #: packed sft data only: position ids that restart at 0 for each example of a row.
    train_positions: Any = None
    validation_positions: Any = None

    @property
    def sft(self) -> bool:
        """Whether this is instruction data (one example per row, loss on responses only)."""
        return self.train_labels is not None

    @property
    def block_size(self) -> int:
        """Tokens per packed block (sft: the longest an example may be)."""
        if self.sft:
            return int(self.card.get("block_size") or self.train.shape[1])
        return int(self.train.shape[1])

    def batch(self, split: str, rows: Any) -> dict[str, Any]:
        """Model inputs for ``rows`` of ``split``: ``input_ids`` and ``labels`` (sft adds the
        ``attention_mask``, cut to the longest example of the batch so padding costs little)."""
        x = getattr(self, split)[rows]
        if not self.sft:
            return {"input_ids": x, "labels": x}
        mask = getattr(self, f"{split}_mask")[rows]
        width = max(int(mask.sum(dim=1).max()), 1)
        batch = {"input_ids": x[:, :width], "attention_mask": mask[:, :width],
                 "labels": getattr(self, f"{split}_labels")[rows][:, :width]}
        positions = getattr(self, f"{split}_positions")
        if positions is not None:
            from lifecycle.train.collate import block_diagonal_mask

            # Packed rows: each example attends only to itself, at the positions it has alone.
            batch["position_ids"] = positions[rows][:, :width]
            batch["attention_mask"] = block_diagonal_mask(batch["position_ids"])
        return batch

    def real_tokens(self, split: str, rows: Any) -> int:
        """Tokens of ``rows`` that are not padding."""
        if not self.sft:
            return int(len(rows) * self.train.shape[1])
        return int(getattr(self, f"{split}_mask")[rows].sum())

    @property
    def digest(self) -> str:
        """The prepared content's digest from the data card ('' if the card has none)."""
        return str(self.card.get("digest", ""))


def _no_data_files(path: Path) -> bool:
    """Whether a ``save_to_disk`` folder lists no data files (a split of zero blocks)."""
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: load_from_disk says why


def _load_split(root: Path, split: str) -> Any:
    import numpy as np
    import torch
    from datasets import load_from_disk

    path = root / split
    if not path.is_dir():
        raise DataError(f"prepared data {root} has no {split}/ split; make it with `lifecycle prepare --output {root}`")
    empty = f"{path} is empty: prepare more documents (--max-documents) or a smaller --block-size"
    if _no_data_files(path):  # saved with no rows: datasets itself fails on it with an IndexError
        raise DataError(empty)
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises several types for a broken folder
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if "input_ids" not in ds.column_names:
        raise DataError(f"{path} has no input_ids column (columns: {', '.join(ds.column_names)}); "
                        "training needs LM-format prepared data")
    if len(ds) == 0:
        raise DataError(empty)
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
    card = read_card(root, required=False)
    fmt = card.get("format", "lm")
    if fmt not in ("lm", "sft"):
        raise DataError(f"{root} holds {fmt!r}-format data; training takes 'lm' or 'sft' data")
    tok_dir = root / "tokenizer"
    if not tok_dir.is_dir():
        raise DataError(f"prepared data {root} has no tokenizer/ folder; make it with `lifecycle prepare`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load the tokenizer in {tok_dir}: {str(exc).splitlines()[0]}") from None
    if fmt == "sft":
        return _load_sft(root, tokenizer, card)
    train, validation = (_load_split(root, s) for s in SPLITS)
    if train.shape[1] != validation.shape[1]:
        raise DataError(f"{root}: train blocks have {train.shape[1]} tokens "
                        f"but validation blocks {validation.shape[1]}")
    top = int(max(train.max(), validation.max()))
    if top >= len(tokenizer):
        raise DataError(f"{root}: token id {top} is outside the tokenizer's vocabulary ({len(tokenizer)}); "
                        "the data and tokenizer/ do not belong together")
    return PreparedData(root=root, train=train, validation=validation, tokenizer=tokenizer, card=card)


def _load_sft(root: Path, tokenizer: Any, card: dict[str, Any]) -> PreparedData:
    """Instruction data: every example its own right-padded row with labels and a mask."""
    from lifecycle.data.encode import load_rows
    from lifecycle.train.collate import pad_positions, pad_rows

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    parts: dict[str, Any] = {}
    for split in SPLITS:
        path = root / split
        if not path.is_dir():
            raise DataError(f"prepared data {root} has no {split}/ split; "
                            f"make it with `lifecycle prepare --output {root}`")
        try:
            ids, labels, positions = load_rows(path)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets raises several types for a broken folder
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot read {path}: {reason}") from None
        if not ids:
            raise DataError(f"{path} holds no example: prepare more examples (or larger split fractions)")
        parts[split] = (*pad_rows(ids, labels, int(pad)), pad_positions(positions) if positions is not None else None)
    train, train_labels, train_mask, train_pos = parts["train"]
    val, val_labels, val_mask, val_pos = parts["validation"]
    top = int(max(train.max(), val.max()))
    if top >= len(tokenizer):
        raise DataError(f"{root}: token id {top} is outside the tokenizer's vocabulary ({len(tokenizer)}); "
                        "the data and tokenizer/ do not belong together")
    return PreparedData(root=root, train=train, validation=val, tokenizer=tokenizer, card=card,
                        train_labels=train_labels, validation_labels=val_labels, train_mask=train_mask,
                        validation_mask=val_mask, train_positions=train_pos, validation_positions=val_pos)


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
