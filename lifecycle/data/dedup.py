"""Exact and near-duplicate detection.

Exact: a 128-bit BLAKE2b of the text after casefolding and whitespace collapse. Near: MinHash
signatures over word n-gram shingles (each CJK character a word), banded the way ``datasketch``'s
``MinHashLSH`` bands them (its optimal bands x rows for the Jaccard threshold, default 0.8).

Signatures are computed with numpy (crc32 word hashes, a polynomial mix for shingles, and
multiply-shift universal hashing as the permutations: ``(a*h + b) mod 2**64 >> 32``) instead of
hashing every shingle with SHA-1 in Python: it is deterministic across processes, so the same
corpus always keeps the same documents. :meth:`MinHasher.signatures` does a whole batch of
documents in a few numpy passes (one Python call per batch, not per document), and
:func:`band_keys` turns signatures into one 64-bit key per band, so the index is a set of ints
that the single main process probes with C-level set operations. Signatures and band keys are
pure and run in worker processes; the index lives in one.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
import zlib
from itertools import chain
from typing import Iterable, Sequence

import numpy as np

from lifecycle.data.quality import words_of

_SHIFT = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)
# Punctuation does not make a document new: shingles are built from words without it.
_PUNCT = re.compile(r"[^\w\s]+")
# The same rule for ASCII text as a translation table (C speed): every ASCII character that is
# neither a word character nor whitespace becomes a space.
_ASCII_PUNCT = str.maketrans({c: " " for c in map(chr, range(128))
                              if not (c.isalnum() or c == "_" or c.isspace())})
# Shingles per numpy pass: big enough that per-call overhead vanishes, small enough for L2.
_CHUNK = 1 << 16


def normalize_for_hash(text: str) -> str:
    """Casefold, NFKC and collapse whitespace: what 'the same text' means for exact dedup."""
    if text.isascii():
        # ASCII is already NFKC, and casefold() of ASCII is lower(). split()/join() collapses
        # the same whitespace as r"\s+" (both use Python's Unicode whitespace) and strips.
        return " ".join(text.lower().split())
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_key(text: str, normalized: str | None = None) -> bytes:
    """A 16-byte digest of the normalised text (pass ``normalized`` if already computed)."""
    norm = normalize_for_hash(text) if normalized is None else normalized
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


def shingle_text(normalized: str) -> str:
    """The words shingles are built from, separated by spaces: punctuation out, each CJK
    character a word of its own."""
    if normalized.isascii():
        # No CJK in ASCII, so the words are the runs between spaces.
        return normalized.translate(_ASCII_PUNCT)
    return " ".join(words_of(_PUNCT.sub(" ", normalized)))


class _WordHashCache(dict):
    """crc32 of a word's UTF-8 bytes, remembered: words repeat (Zipf), and a dict hit is a C call."""

    LIMIT = 1 << 20

    def __missing__(self, word: str) -> int:
        h = self[word] = zlib.crc32(word.encode("utf-8"))
        return h


def word_hashes(normalized: Sequence[str], cache: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """crc32 hashes of the shingle words of each text (concatenated) and the word count of each.

    A text without words counts as one empty word, so that every text has a shingle. ``cache``
    (a :class:`_WordHashCache`) saves re-hashing words seen in earlier batches.
    """
    word_lists = [shingle_text(t).split() or [""] for t in normalized]
    counts = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(word_lists))
    words = chain.from_iterable(word_lists)
    if cache is None:
        # map() over C functions: no Python frame per word.
        hashes = map(zlib.crc32, map(str.encode, words))
    else:
        if len(cache) > _WordHashCache.LIMIT:
            cache.clear()  # a bound on memory; the next batches refill it with what is frequent
        hashes = map(cache.__getitem__, words)
    h = np.fromiter(hashes, dtype=np.uint64, count=int(counts.sum()))
    return h, counts


class MinHasher:
    """Computes MinHash signatures (uint32 arrays of length ``num_perm``) for texts."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 0):
        rng = np.random.RandomState(seed + 1)
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.seed = seed
        # Multiply-shift needs odd 64-bit multipliers; no modulo, so it is cheap in numpy.
        self._a = (rng.randint(0, 2**63 - 1, size=num_perm, dtype=np.int64).astype(np.uint64) * np.uint64(2)
                   + np.uint64(1))
        self._b = rng.randint(0, 2**63 - 1, size=num_perm, dtype=np.int64).astype(np.uint64)
        # Odd multipliers combine the word hashes of a shingle (order-sensitive).
        self._mix = (rng.randint(1, 2**31, size=shingle_size, dtype=np.uint64) * np.uint64(2) + np.uint64(1))
        self._words = _WordHashCache()

    def shingle_hashes(self, text: str, normalized: str | None = None) -> np.ndarray:
        """32-bit hashes of the distinct word n-grams of ``text``."""
        norm = normalize_for_hash(text) if normalized is None else normalized
        w, _ = word_hashes([norm])
        n = min(self.shingle_size, len(w))
        m = len(w) - n + 1
        with np.errstate(over="ignore"):
            h = w[:m] * self._mix[0]
            for k in range(1, n):
                h += w[k:k + m] * self._mix[k]
        return np.unique(h & _MASK32)

    def signature(self, text: str, normalized: str | None = None) -> np.ndarray:
        """The MinHash signature of ``text``."""
        norm = normalize_for_hash(text) if normalized is None else normalized
        return self.signatures([norm])[0]

    def signatures(self, normalized: Sequence[str]) -> np.ndarray:
        """Signatures of a batch of already normalised texts, one ``num_perm`` row each.

        Equal to :meth:`signature` row by row. All words of the batch are hashed in one pass,
        shingles are formed on the concatenated word array (masked at document ends), and the
        permutations run over chunks of shingles with a segmented minimum per document.
        Duplicate shingles are not removed: they cannot change a minimum.
        """
        n_docs = len(normalized)
        out = np.full((n_docs, self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        if n_docs == 0:
            return out.astype(np.uint32)
        words, lengths = word_hashes(normalized, self._words)
        total = len(words)
        s = self.shingle_size
        w = np.zeros(total + s, dtype=np.uint64)  # zero tail: windows never read past the end
        w[:total] = words
        doc_start = np.zeros(n_docs, dtype=np.int64)
        np.cumsum(lengths[:-1], out=doc_start[1:])
        # Position of each word inside its document, and how many words its document has.
        rel = np.arange(total, dtype=np.int64) - np.repeat(doc_start, lengths)
        doc_len = np.repeat(lengths, lengths)
        with np.errstate(over="ignore"):
            h = w[:total] * self._mix[0]
            for k in range(1, s):
                # A document shorter than the shingle size has one shingle of all its words.
                h += np.where(rel + k < doc_len, w[k:k + total] * self._mix[k], np.uint64(0))
        valid = rel <= np.maximum(doc_len - s, 0)
        shingles = h[valid] & _MASK32
        counts = np.maximum(lengths - s + 1, 1)
        owner = np.repeat(np.arange(n_docs), counts)
        first = np.zeros(n_docs, dtype=np.int64)
        np.cumsum(counts[:-1], out=first[1:])
        tmp = np.empty(min(len(shingles), _CHUNK), dtype=np.uint64)
        # One permutation at a time over a long 1-D run of shingles: array-times-scalar is a
        # vectorised loop (an outer product is not), and a 1-D segmented minimum is fast.
        for lo in range(0, len(shingles), _CHUNK):
            hi = min(lo + _CHUNK, len(shingles))
            chunk, values = shingles[lo:hi], tmp[:hi - lo]
            d0, d1 = int(owner[lo]), int(owner[hi - 1]) + 1  # documents (or parts) in this chunk
            starts = np.maximum(first[d0:d1] - lo, 0)
            rows = out[d0:d1]
            with np.errstate(over="ignore"):
                for j in range(self.num_perm):
                    np.multiply(chunk, self._a[j], out=values)
                    np.add(values, self._b[j], out=values)
                    mins = np.minimum.reduceat(values, starts)
                    np.minimum(rows[:, j], mins, out=rows[:, j])
        # The shift is monotonic, so the minimum of shifted values is the shifted minimum.
        return (out >> _SHIFT).astype(np.uint32)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return float(np.mean(sig_a == sig_b))


@functools.lru_cache(maxsize=None)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives at ``threshold``.

    The same choice as ``datasketch``'s ``MinHashLSH`` (equal weights), without its scipy
    quadrature: the collision curve ``1 - (1 - s**r)**b`` is a polynomial of degree ``b*r <=
    num_perm``, so Gauss-Legendre with ``num_perm // 2 + 1`` nodes integrates it exactly.
    """
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)
    # Nodes and weights mapped onto [0, threshold] and [threshold, 1].
    x_fp, w_fp = threshold / 2 * (nodes + 1), threshold / 2 * weights
    x_fn, w_fn = (1 - threshold) / 2 * nodes + (1 + threshold) / 2, (1 - threshold) / 2 * weights
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=float)[:, None]  # every row count for b bands
        fp = (1 - (1 - x_fp ** r) ** b) @ w_fp
        fn = ((1 - x_fn ** r) ** b) @ w_fn
        error = 0.5 * fp + 0.5 * fn
        i = int(np.argmin(error))  # the first minimum, as a loop over r with '<' would keep
        if error[i] < best:
            best, opt = float(error[i]), (b, i + 1)
    return opt


_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)
_K3 = np.uint64(0x94D049BB133111EB)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per LSH band: ``(n, bands)`` uint64 for ``(n, num_perm)`` signatures.

    Two documents share a band key when their signatures agree on all ``rows`` values of that
    band (up to a 64-bit hash collision). The band index is mixed in, so the keys of all bands
    can live in one set. The mix is a splitmix64-style xor-multiply-shift chain, not linear, so
    structured differences between signatures do not make keys collide.
    """
    sig = np.asarray(signatures, dtype=np.uint32)
    if sig.ndim == 1:
        sig = sig[None, :]
    x = sig[:, :bands * rows].astype(np.uint64).reshape(len(sig), bands, rows)
    with np.errstate(over="ignore"):
        h = np.broadcast_to((np.arange(bands, dtype=np.uint64) + np.uint64(1)) * _K1, (len(sig), bands)).copy()
        for k in range(rows):
            h ^= x[:, :, k]
            h *= _K2
            h ^= h >> np.uint64(31)
        h *= _K3
        h ^= h >> np.uint64(29)
    return h


class Deduplicator:
    """Keeps the exact-hash set and the LSH band index; decides whether a document is new.

    Memory grows with the number of kept documents (a 16-byte exact key and one 64-bit key per
    band each, as set entries), which is the price of global dedup; everything else in the pipeline
    streams. A document is a near duplicate when it shares any band with an earlier kept document
    (LSH candidates, as ``MinHashLSH.query`` returns them).
    """

    def __init__(self, *, exact: bool = True, near: bool = True, threshold: float = 0.8,
                 num_perm: int = 128, seed: int = 0):
        self.exact = exact
        self.near = near
        self.seed = seed
        self.bands, self.rows = lsh_params(threshold, num_perm) if near else (0, 0)
        self._seen: set[bytes] = set()
        self._reference: set[bytes] = set()
        self._band_seen: set[int] = set()
        self._band_reference: set[int] = set()
        self._n_reference = 0
        self._count = 0

    def keys_of(self, sig: np.ndarray) -> list[int]:
        """The band keys of one signature (what :meth:`check_and_add` indexes)."""
        return band_keys(sig, self.bands, self.rows)[0].tolist()

    def check_and_add(self, key: bytes | None, sig: np.ndarray | None,
                      bands: Sequence[int] | None = None) -> str | None:
        """Classify a document against everything kept so far, and remember it if it is new.

        ``bands`` (from :func:`band_keys`) may be given instead of ``sig``. Returns ``None`` for
        a new document, ``"exact"``/``"near"`` for a duplicate within the corpus,
        ``"exact_against"``/``"near_against"`` for a duplicate of the reference data.
        """
        if self.exact and key is not None:
            if key in self._reference:
                return "exact_against"
            if key in self._seen:
                return "exact"
        if self.near and bands is None and sig is not None:
            bands = self.keys_of(sig)
        if self.near and bands is not None:
            # Reference documents were indexed first, so a candidate among them is the oldest hit.
            if not self._band_reference.isdisjoint(bands):
                return "near_against"
            if not self._band_seen.isdisjoint(bands):
                return "near"
            self._band_seen.update(bands)
        if self.exact and key is not None:
            self._seen.add(key)
        self._count += 1
        return None

    def add_reference(self, items: Iterable[tuple]) -> int:
        """Index earlier data (continuous training) before any new document; return how many.

        Items are ``(key, signature)`` or ``(key, signature, band_keys)`` (signature may then be None).
        """
        if self._count != self._n_reference:
            raise RuntimeError("reference data must be added before the corpus")
        n = 0
        for item in items:
            key, sig = item[0], item[1]
            bands = item[2] if len(item) > 2 else None
            if self.exact and key is not None:
                self._reference.add(key)
            if self.near:
                if bands is None and sig is not None:
                    bands = self.keys_of(sig)
                if bands is not None:
                    self._band_reference.update(bands)
            self._count += 1
            n += 1
        self._n_reference = self._count
        return n
