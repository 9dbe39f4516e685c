"""Champion against challenger: paired bootstrap, win rate, the comparison table and chart.

Pure functions (numpy, pandas, matplotlib with the Agg backend); nothing here talks to MLflow.
Deltas are always challenger minus baseline, so for a loss a negative delta is an improvement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

#: Metrics where lower is better (a negative delta is an improvement).
LOWER_IS_BETTER = {"loss", "perplexity", "bits_per_byte", "latency_p50_ms", "latency_p95_ms"}


@dataclass(frozen=True)
class BootstrapResult:
    """Mean paired difference and its percentile interval."""

    mean: float
    low: float
    high: float
    samples: int
    n: int


def paired_bootstrap(challenger: Sequence[float], baseline: Sequence[float], *, samples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> BootstrapResult:
    """Percentile bootstrap interval of mean(challenger - baseline) over paired units.

    Units (blocks or documents) are resampled with replacement as pairs, so the interval reflects
    the variation between units that both models share, not each model's variance separately.
    """
    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired bootstrap needs at least one pair")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    # Resample in chunks so a large split does not need a samples x n index matrix at once.
    chunk = max(1, min(samples, 2_000_000 // max(diff.size, 1)))
    for lo in range(0, samples, chunk):
        k = min(chunk, samples - lo)
        idx = rng.integers(0, diff.size, size=(k, diff.size))
        means[lo:lo + k] = diff[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return BootstrapResult(mean=float(diff.mean()), low=float(low), high=float(high), samples=samples, n=int(diff.size))


def win_rate(challenger: Sequence[float], baseline: Sequence[float], *, lower_is_better: bool = True,
             tol: float = 1e-12) -> float:
    """Fraction of paired items where the challenger is better; ties count one half."""
    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("win rate needs two non-empty sequences of one length")
    better = (a < b - tol) if lower_is_better else (a > b + tol)
    ties = np.abs(a - b) <= tol
    return float((better.sum() + 0.5 * ties.sum()) / a.size)


def deltas(challenger: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """``{metric: challenger - baseline}`` for the metrics both sides have."""
    return {k: float(challenger[k]) - float(baseline[k]) for k in challenger if k in baseline}


def comparison_table(challenger: Mapping[str, float], baseline: Mapping[str, float]) -> "pd.DataFrame":  # noqa: F821
    """One row per shared metric: challenger, baseline, delta and which side is better."""
    import pandas as pd

    rows = []
    for key in sorted(k for k in challenger if k in baseline):
        c, b = float(challenger[key]), float(baseline[key])
        if c == b:
            better = "tie"
        elif key.split("_bs")[0] in LOWER_IS_BETTER:
            better = "challenger" if c < b else "baseline"
        else:
            better = "challenger" if c > b else "baseline"
        rows.append({"metric": key, "challenger": c, "baseline": b, "delta": c - b, "better": better})
    return pd.DataFrame(rows, columns=["metric", "challenger", "baseline", "delta", "better"])


def comparison_chart(table: "pd.DataFrame", boot: BootstrapResult | None, path: str | Path, *,  # noqa: F821
                     title: str = "challenger vs baseline", boot_label: str = "loss") -> Path:
    """A PNG: side-by-side bars per metric (each normalised to the baseline) and the bootstrap
    interval of the paired difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    if len(table):
        x = np.arange(len(table))
        base = table["baseline"].to_numpy(dtype=float)
        scale = np.where(np.abs(base) > 0, np.abs(base), 1.0)
        ax.bar(x - 0.2, table["baseline"].to_numpy(dtype=float) / scale, 0.4, label="baseline", color="#999999")
        ax.bar(x + 0.2, table["challenger"].to_numpy(dtype=float) / scale, 0.4, label="challenger", color="#1f77b4")
        ax.set_xticks(x)
        ax.set_xticklabels(table["metric"], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("value / |baseline|")
        ax.legend()
    ax.set_title(title)
    ax2 = axes[1]
    if boot is not None:
        ax2.errorbar([0], [boot.mean], yerr=[[boot.mean - boot.low], [boot.high - boot.mean]], fmt="o", capsize=8)
        ax2.axhline(0.0, color="black", linewidth=0.8)
        ax2.set_xticks([0])
        ax2.set_xticklabels([f"{boot_label} delta"])
        ax2.set_title(f"paired bootstrap (n={boot.n})")
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
