"""PNG plots of a monitor run: drift histograms and latency over time (matplotlib, Agg backend)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: schedulers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def histogram(path: Path, reference: np.ndarray | None, current: np.ndarray, *, title: str, xlabel: str,
              labels: tuple[str, str] = ("reference", "window")) -> Path:
    """Overlaid density histograms of ``reference`` and ``current`` on shared bins."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    data = [x for x in (reference, current) if x is not None and x.size]
    if data:
        lo = min(float(x.min()) for x in data)
        hi = max(float(x.max()) for x in data)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        if reference is not None and reference.size:
            ax.hist(reference, bins=bins, density=True, alpha=0.5, label=f"{labels[0]} (n={reference.size})")
        if current.size:
            ax.hist(current, bins=bins, density=True, alpha=0.5, label=f"{labels[1]} (n={current.size})")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_over_time(path: Path, times: Sequence[datetime], latency_ms: Sequence[float],
                      errors: Sequence[bool]) -> Path:
    """Latency of each request against its time; refused/failed requests marked in red."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    t = np.asarray(times, dtype="datetime64[ms]") if len(times) else np.asarray([], dtype="datetime64[ms]")
    lat = np.asarray(latency_ms, dtype=np.float64)
    err = np.asarray(errors, dtype=bool)
    if lat.size:
        ax.plot(t[~err], lat[~err], ".", markersize=3, label="ok")
        if err.any():
            ax.plot(t[err], lat[err], "x", color="tab:red", markersize=4, label="error")
        ax.legend()
    ax.set_title("request latency over time")
    ax.set_ylabel("latency (ms)")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
