"""Pack token ids into fixed-length blocks with EOS after every document.

A stream of documents becomes one long token stream ``doc1 EOS doc2 EOS ...`` cut into blocks of
exactly ``block_size`` ids; the last partial block is dropped (and counted), as in run_clm.py,
so every row has the same length and no padding enters the loss.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


class BlockPacker:
    """Accumulates token ids and yields full blocks as ``(n, block_size)`` int64 arrays."""

    def __init__(self, block_size: int, eos_id: int):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.eos_id = eos_id
        self._buffer: list[int] = []
        self.tokens = 0  # tokens fed, EOS included
        self.blocks = 0

    def add(self, docs: Iterable[list[int]]) -> np.ndarray:
        """Add the token ids of some documents; return the blocks that became full."""
        buf = self._buffer
        for ids in docs:
            buf.extend(ids)
            buf.append(self.eos_id)
            self.tokens += len(ids) + 1
        n = len(buf) // self.block_size
        if n == 0:
            return np.empty((0, self.block_size), dtype=np.int64)
        cut = n * self.block_size
        blocks = np.asarray(buf[:cut], dtype=np.int64).reshape(n, self.block_size)
        del buf[:cut]
        self.blocks += n
        return blocks

    @property
    def remainder(self) -> int:
        """Tokens left over that do not fill a block (dropped at the end)."""
        return len(self._buffer)


def pack_all(docs: Iterable[list[int]], block_size: int, eos_id: int) -> Iterator[np.ndarray]:
    """Convenience generator: the blocks of ``docs``, in order."""
    packer = BlockPacker(block_size, eos_id)
    for ids in docs:
        out = packer.add([ids])
        if len(out):
            yield from out
