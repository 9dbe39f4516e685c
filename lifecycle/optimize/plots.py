"""PNGs of the search and of the compression trade-off (matplotlib, Agg: no display needed).

Drawn here rather than with ``optuna.visualization.matplotlib`` (experimental, warns on every
call): the history marks pruned trials where they were stopped, which is what a reader of a
pruned study wants to see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from lifecycle.train.plots import pyplot, save_png


def plot_history(points: Sequence[tuple[int, float, str]], out: str | Path, *, title: str = "",
                 metric: str = "best val/loss") -> Path:
    """Objective per trial (``(number, value, state)``; pruned at their last reported value) and the best so far."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    styles = {"COMPLETE": ("o", "tab:blue", "complete"), "PRUNED": ("x", "tab:red", "pruned (last reported)"),
              "FAIL": ("s", "tab:gray", "failed")}
    for state, (marker, color, label) in styles.items():
        xs = [n for n, v, s in points if s == state and v is not None]
        ys = [v for n, v, s in points if s == state and v is not None]
        if xs:
            ax.scatter(xs, ys, marker=marker, color=color, label=label, zorder=3)
    complete = sorted((n, v) for n, v, s in points if s == "COMPLETE" and v is not None)
    if complete:
        best, xs, ys = float("inf"), [], []
        for n, v in complete:
            best = min(best, v)
            xs.append(n)
            ys.append(best)
        last = max(n for n, _, _ in points)
        if last > xs[-1]:  # carry the best to the last trial, pruned or failed ones included
            xs.append(last)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:green", label="best so far", linewidth=1.5)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.collections or ax.lines:
        ax.legend()
    ax.set_title(title or "optimisation history")
    return save_png(fig, out)


def plot_importances(importances: Mapping[str, float], out: str | Path, *, title: str = "") -> Path:
    """Horizontal bars of each parameter's importance (fANOVA share of the objective's variance)."""
    plt = pyplot()
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(len(items), 2) + 1.5))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f}", va="center")
    ax.set_xlabel("importance (share of the objective's variance)")
    ax.set_xlim(0, max([v for _, v in items] + [0.01]) * 1.2)
    ax.set_title(title or "hyperparameter importance")
    return save_png(fig, out)


def plot_tradeoff(rows: Sequence[Mapping[str, object]], out: str | Path, *, title: str = "") -> Path:
    """One panel per column of the trade-off table (parameters, MB, tokens/s at batch 1 and 8,
    bits-per-byte, seconds spent making the variant), one bar per model (a row per method).
    Panels with nothing measured (e.g. no batch-8 timing) are left out."""
    import math

    plt = pyplot()
    labels = [str(r["model"]) for r in rows]
    panels = [("params", "parameters"), ("size_mb", "weights (MB)"),
              ("tokens_per_s_bs1", "tokens/s, batch 1 (higher is better)"),
              ("tokens_per_s_bs8", "tokens/s, batch 8 (higher is better)"),
              ("bits_per_byte", "bits per byte (lower is better)"), ("time_s", "time to make (s)")]

    def value(r: Mapping[str, object], key: str) -> float:
        v = r.get(key)
        return float(v) if isinstance(v, (int, float)) else float("nan")  # type: ignore[arg-type]

    panels = [(k, t) for k, t in panels if any(math.isfinite(value(r, k)) and value(r, k) > 0 for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), squeeze=False)
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for ax, (key, label) in zip(axes[0], panels):
        values = [value(r, key) for r in rows]
        shown = [v if math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(labels, shown, color=[colors[i % len(colors)] for i in range(len(shown))])
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.4g}" if math.isfinite(v) else "n/a",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, max(shown + [1e-9]) * 1.18)
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    return save_png(fig, out, title=title)
