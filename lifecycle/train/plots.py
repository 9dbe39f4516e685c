"""Training curves as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, out: str | Path, *, title: str = "") -> Path:
    """Lay out ``fig`` (``title`` above all its panels, when given), write it as a PNG at ``out`` and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(history: Mapping[str, Sequence[tuple[int, float]]], out: str | Path, *, title: str = "") -> Path:
    """Plot loss curves (train and validation) and the learning rate side by side into ``out``."""
    plt = pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        points = sorted(history.get(key, ()))
        if points:
            steps, values = zip(*points)
            ax_loss.plot(steps, values, style, label=key, markersize=3, linewidth=1.2)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend()
    lr = sorted(history.get("train/lr", ()))
    if lr:
        steps, values = zip(*lr)
        ax_lr.plot(steps, values, color="tab:green", linewidth=1.2)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    return save_png(fig, out, title=title)
