"""Hash-based train/validation/test assignment.

The split of a document depends only on its own (normalised) text and the seed, never on its
position or on the rest of the corpus: when the corpus grows, every old document keeps its split
and no test document leaks into a later train split.
"""

from __future__ import annotations

import hashlib

from lifecycle.data.dedup import normalize_for_hash

SPLITS = ("train", "validation", "test")


def assign_split(text: str, *, validation: float, test: float, seed: int = 0,
                 normalized: str | None = None) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` for ``text``, stable across corpus growth."""
    norm = normalize_for_hash(text) if normalized is None else normalized
    digest = hashlib.blake2b(norm.encode("utf-8"), digest_size=8,
                             key=str(seed).encode()).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < validation:
        return "validation"
    if u < validation + test:
        return "test"
    return "train"
