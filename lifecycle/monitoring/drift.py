"""Pure drift statistics on samples and categorical distributions (numpy only, no MLflow).

* :func:`psi` — population stability index of a numeric sample against a reference sample,
  over bins cut at the reference's quantiles (the usual credit-scoring convention: < 0.1 stable,
  0.1–0.25 moderate shift, > 0.25 major shift).
* :func:`ks_statistic` — two-sample Kolmogorov–Smirnov statistic: the largest gap between the
  two empirical CDFs (0 for identical samples, 1 for disjoint supports).
* :func:`js_divergence` — Jensen–Shannon divergence of two count/probability mappings, base 2,
  so it lies in [0, 1].
* :func:`total_variation` — half the L1 distance of two categorical distributions, in [0, 1].
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import numpy as np

#: Floor for empty bins: PSI has log(p/q) terms, and one empty bin must not make it infinite.
PSI_EPS = 1e-4


def _as_sample(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{what} sample is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} sample holds NaN or infinite values")
    return arr


def quantile_edges(reference: Sequence[float] | np.ndarray, bins: int = 10) -> np.ndarray:
    """Interior bin edges at the reference's quantiles (duplicates merged for discrete data)."""
    if bins < 2:
        raise ValueError("bins must be at least 2")
    ref = _as_sample(reference, "reference")
    inner = np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    edges = np.unique(inner)
    if edges.size == 0 or (edges.size == 1 and np.all(ref == edges[0])):
        # A constant reference: one bin for "the value", one for everything else above it.
        edges = np.array([ref[0]])
    return edges


def bin_fractions(values: Sequence[float] | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fraction of ``values`` in each of the ``len(edges) + 1`` bins ``(-inf, e0], (e0, e1], ...``."""
    arr = _as_sample(values, "binned")
    idx = np.searchsorted(edges, arr, side="left")
    counts = np.bincount(idx, minlength=edges.size + 1).astype(np.float64)
    return counts / counts.sum()


def psi(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray, *,
        bins: int = 10, eps: float = PSI_EPS) -> float:
    """Population stability index of ``current`` against ``reference`` (0 when they match)."""
    edges = quantile_edges(reference, bins)
    p = np.maximum(bin_fractions(reference, edges), eps)
    q = np.maximum(bin_fractions(current, edges), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_statistic(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic ``sup |F_ref(x) - F_cur(x)|`` in [0, 1]."""
    a = np.sort(_as_sample(reference, "reference"))
    b = np.sort(_as_sample(current, "current"))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _normalise(dist: Mapping[Hashable, float], keys: list[Hashable], what: str) -> np.ndarray:
    vec = np.array([float(dist.get(k, 0.0)) for k in keys], dtype=np.float64)
    if np.any(vec < 0) or not np.all(np.isfinite(vec)):
        raise ValueError(f"{what} distribution holds negative or non-finite weights")
    total = vec.sum()
    if total <= 0:
        raise ValueError(f"{what} distribution is empty")
    return vec / total


def js_divergence(p: Mapping[Hashable, float], q: Mapping[Hashable, float]) -> float:
    """Jensen–Shannon divergence (base 2, in [0, 1]) of two count or probability mappings."""
    keys = sorted(set(p) | set(q), key=repr)
    pv, qv = _normalise(p, keys, "first"), _normalise(q, keys, "second")
    m = 0.5 * (pv + qv)

    def kl(x: np.ndarray) -> float:
        mask = x > 0
        return float(np.sum(x[mask] * np.log2(x[mask] / m[mask])))

    # Clip float noise: the bound [0, 1] is part of the contract thresholds rely on.
    return min(1.0, max(0.0, 0.5 * kl(pv) + 0.5 * kl(qv)))


def total_variation(p: Mapping[Hashable, float], q: Mapping[Hashable, float]) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` of two categorical distributions, in [0, 1]."""
    keys = sorted(set(p) | set(q), key=repr)
    pv, qv = _normalise(p, keys, "first"), _normalise(q, keys, "second")
    return float(min(1.0, 0.5 * np.abs(pv - qv).sum()))


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (linear interpolation), NaN for an empty sample."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else math.nan
