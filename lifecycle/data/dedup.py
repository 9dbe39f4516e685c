"""Exact and near-duplicate detection.

Exact: a 128-bit BLAKE2b of the text after casefolding and whitespace collapse. Near: MinHash
signatures over word n-gram shingles (each CJK character a word) in a ``datasketch`` LSH index
at a Jaccard threshold (default 0.8).

Signatures are computed with numpy (crc32 word hashes, a polynomial mix for shingles, and
multiply-shift universal hashing as the permutations: ``(a*h + b) mod 2**64 >> 32``) instead of hashing every shingle with SHA-1 in Python: it is
several times faster and deterministic across processes, so the same corpus always keeps the same
documents. Signature computation is pure and runs in worker processes; the index lives in one.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from typing import Iterable

import numpy as np

from lifecycle.data.quality import words_of

_SHIFT = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)
_WS = re.compile(r"\s+")
# Punctuation does not make a document new: shingles are built from words without it.
_PUNCT = re.compile(r"[^\w\s]+")
#: the datasketch scheme name recorded on our signatures (affine permutations, 32-bit values).
SCHEME = "affine32"


def normalize_for_hash(text: str) -> str:
    """Casefold, NFKC and collapse whitespace: what 'the same text' means for exact dedup."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(text: str, normalized: str | None = None) -> bytes:
    """A 16-byte digest of the normalised text (pass ``normalized`` if already computed)."""
    norm = normalize_for_hash(text) if normalized is None else normalized
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


class MinHasher:
    """Computes MinHash signatures (uint32 arrays of length ``num_perm``) for texts."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 0):
        rng = np.random.RandomState(seed + 1)
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.seed = seed
        # Multiply-shift needs odd 64-bit multipliers; no modulo, so it is cheap in numpy.
        self._a = rng.randint(0, 2**63 - 1, size=num_perm, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.randint(0, 2**63 - 1, size=num_perm, dtype=np.int64).astype(np.uint64)
        # Odd multipliers combine the word hashes of a shingle (order-sensitive).
        self._mix = (rng.randint(1, 2**31, size=shingle_size, dtype=np.uint64) * np.uint64(2) + np.uint64(1))

    def shingle_hashes(self, text: str, normalized: str | None = None) -> np.ndarray:
        """32-bit hashes of the distinct word n-grams of ``text``."""
        norm = normalize_for_hash(text) if normalized is None else normalized
        words = words_of(_PUNCT.sub(" ", norm)) or [""]
        # map() over C functions: no Python frame per word.
        w = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
        n = min(self.shingle_size, len(w))
        m = len(w) - n + 1
        with np.errstate(over="ignore"):
            h = w[:m] * self._mix[0]
            for k in range(1, n):
                h += w[k:k + m] * self._mix[k]
        return np.unique(h & _MASK32)

    def signature(self, text: str, normalized: str | None = None) -> np.ndarray:
        """The MinHash signature of ``text``."""
        h = self.shingle_hashes(text, normalized)
        out = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        # Chunks bound the (shingles x permutations) temporary for very long documents.
        for start in range(0, len(h), 4096):
            chunk = h[start:start + 4096]
            with np.errstate(over="ignore"):
                values = (np.outer(self._a, chunk) + self._b[:, None]) >> _SHIFT
            np.minimum(out, values.min(axis=1), out=out)
        return out.astype(np.uint32)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return float(np.mean(sig_a == sig_b))


class Deduplicator:
    """Keeps the exact-hash set and the LSH index; decides whether a document is new.

    Memory grows with the number of kept documents (16 bytes + the LSH band keys each), which is
    the price of global dedup; everything else in the pipeline streams.
    """

    def __init__(self, *, exact: bool = True, near: bool = True, threshold: float = 0.8,
                 num_perm: int = 128, seed: int = 0):
        from datasketch import MinHashLSH

        self.exact = exact
        self.near = near
        self.seed = seed
        self._seen: set[bytes] = set()
        self._reference: set[bytes] = set()
        self._n_reference = 0
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if near else None
        self._count = 0

    def _lean(self, sig: np.ndarray):
        from datasketch import LeanMinHash

        return LeanMinHash(seed=self.seed, hashvalues=sig, scheme=SCHEME)

    def check_and_add(self, key: bytes | None, sig: np.ndarray | None) -> str | None:
        """Classify a document against everything kept so far, and remember it if it is new.

        Returns ``None`` for a new document, ``"exact"``/``"near"`` for a duplicate within the
        corpus, ``"exact_against"``/``"near_against"`` for a duplicate of the reference data.
        """
        if self.exact and key is not None:
            if key in self._reference:
                return "exact_against"
            if key in self._seen:
                return "exact"
        lean = None
        if self._lsh is not None and sig is not None:
            lean = self._lean(sig)
            hits = self._lsh.query(lean)
            if hits:
                return "near_against" if min(hits) < self._n_reference else "near"
            self._lsh.insert(self._count, lean, check_duplication=False)
        if self.exact and key is not None:
            self._seen.add(key)
        self._count += 1
        return None

    def add_reference(self, items: Iterable[tuple[bytes | None, np.ndarray | None]]) -> int:
        """Index earlier data (continuous training) before any new document; return how many."""
        if self._count != self._n_reference:
            raise RuntimeError("reference data must be added before the corpus")
        n = 0
        for key, sig in items:
            if self.exact and key is not None:
                self._reference.add(key)
            if self._lsh is not None and sig is not None:
                self._lsh.insert(self._count, self._lean(sig), check_duplication=False)
            self._count += 1
            n += 1
        self._n_reference = self._count
        return n
