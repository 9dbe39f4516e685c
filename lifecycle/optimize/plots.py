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
    """Three panels (size MB, tokens/s, bits-per-byte), one bar per model of the trade-off table."""
    plt = pyplot()
    labels = [str(r["model"]) for r in rows]
    panels = (("size_mb", "weights (MB)"), ("tokens_per_s", "tokens/s (higher is better)"),
              ("bits_per_byte", "bits per byte (lower is better)"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
    for ax, (key, label) in zip(axes, panels):
        values = [float(r[key]) for r in rows]  # type: ignore[arg-type]
        bars = ax.bar(labels, values, color=colors[: len(values)])
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.4g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
        ax.set_title(label)
        ax.set_ylim(0, max(values + [1e-9]) * 1.18)
        ax.tick_params(axis="x", labelrotation=15)
        ax.grid(axis="y", alpha=0.3)
    return save_png(fig, out, title=title)
