"""The report's pictures: matplotlib PNGs (as bytes, embedded as data URIs) and the lineage SVG.

Nothing here fetches anything: the HTML must open without a network, so every chart is either
an inline SVG or a base64 PNG inside the page.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime
from html import escape
from typing import Any, Sequence

#: One colour per version, cycling (matplotlib's default cycle, so PNGs and SVG agree).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def colour(i: int) -> str:
    """Colour of the ``i``-th version."""
    return PALETTE[i % len(PALETTE)]


def _pyplot():
    # Imported here: the backend must be chosen before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI for an ``<img>`` (no file, no network)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def training_curves(versions: Sequence[Any]) -> bytes | None:
    """train/loss and val/loss of every version's training run, one colour per version."""
    drawn = [(i, v) for i, v in enumerate(versions) if any(v.curves.get(k) for k in ("train/loss", "val/loss"))]
    if not drawn:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, key in zip(axes, ("train/loss", "val/loss")):
        for i, v in drawn:
            points = v.curves.get(key) or []
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, "-" if key == "train/loss" else "o-", color=colour(i), markersize=3,
                        linewidth=1.2, label=f"v{v.version}")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (nats/token)")
    return _png(fig)


def evaluation_bars(versions: Sequence[Any], champion: str | None,
                    metrics: Sequence[str] = ("eval/perplexity", "eval/bits_per_byte")) -> bytes | None:
    """Each version's evaluation metrics as bars; the champion (production) outlined in black."""
    rows = [v for v in versions if any(_num(v.tags.get(m)) is not None for m in metrics)]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.4))
    axes = list(axes) if len(metrics) > 1 else [axes]
    for ax, metric in zip(axes, metrics):
        labels = [f"v{v.version}" for v in rows]
        values = [_num(v.tags.get(metric)) or 0.0 for v in rows]
        bars = ax.bar(labels, values, color=[colour(versions.index(v)) for v in rows])
        for bar, v in zip(bars, rows):
            if v.version == champion:
                bar.set_edgecolor("black")
                bar.set_linewidth(2.5)
        ax.set_title(f"{metric} (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def ledger_timeline(events: Sequence[Any]) -> bytes | None:
    """Which version held staging and production over time; rejections and rollbacks marked."""
    if not events:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.4))
    styles = {"staging": ("tab:blue", 0.15), "production": ("tab:green", -0.15)}
    versions_seen: set[int] = set()
    for target, (col, offset) in styles.items():
        pts = [(datetime.fromtimestamp(e.timestamp), e.to_version) for e in events
               if e.target == target and e.effective and e.to_version]
        if pts:
            times = [p[0] for p in pts] + [datetime.fromtimestamp(max(e.timestamp for e in events))]
            ys = [int(p[1]) + offset for p in pts]
            versions_seen.update(int(p[1]) for p in pts)
            ax.step(times, ys + ys[-1:], where="post", color=col, linewidth=2, label=f"@{target}")
    for action, marker, col, label in (("reject", "x", "tab:red", "refused"),
                                       ("rollback", "v", "tab:purple", "rollback"),
                                       ("guard_revert", "s", "tab:orange", "guard revert")):
        pts = [(datetime.fromtimestamp(e.timestamp), int(e.to_version)) for e in events
               if e.action == action and e.to_version and str(e.to_version).isdigit()]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=col, markersize=9, label=label,
                    linestyle="none")
            versions_seen.update(p[1] for p in pts)
    if versions_seen:
        ax.set_yticks(sorted(versions_seen))
        ax.set_yticklabels([f"v{v}" for v in sorted(versions_seen)])
    ax.set_ylabel("version")
    ax.set_title("registry over time (ledger)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left")
    fig.autofmt_xdate()
    return _png(fig)


def canary_arms(events: Sequence[Any]) -> bytes | None:
    """Production and challenger side by side over time, from the ``canary_verdict`` events' figures."""
    verdicts = [e for e in events if e.action == "canary_verdict"]
    if not verdicts:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (metric, title) in zip(axes, (("error_rate", "error rate"), ("latency_p95", "latency p95 (ms)"),
                                          ("completion_length", "mean completion tokens"))):
        for arm, style in (("production", "o-"), ("challenger", "s--")):
            pts = [(datetime.fromtimestamp(e.timestamp), _num(g.get(arm))) for e in verdicts for g in e.gates
                   if g.get("gate") == metric]
            pts = [(t, v) for t, v in pts if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=4, label=arm,
                        color="tab:green" if arm == "production" else "tab:orange")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return _png(fig)


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if x != x else x


def lineage_svg(versions: Sequence[Any], data_runs: dict[str, Any], events_by_version: dict[str, list[Any]]) -> str:
    """Data runs -> training run -> version -> promotions and rollbacks, as an inline SVG.

    Four columns of boxes joined by lines; a fine-tuned version also points back to the version
    it started from (dashed), so a chain of retrainings reads top to bottom.
    """
    box_w, box_h, gap_y, col_x = 190, 46, 14, (10, 250, 490, 730)
    order = list(dict.fromkeys(r for v in versions for r in v.data_runs))
    rows = max(len(order), len(versions), 1)
    height = rows * (box_h + gap_y) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{col_x[3] + box_w + 20}" '
           f'height="{height}" role="img" aria-label="lineage graph">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>']
    for x, title in zip(col_x, ("data runs", "training runs", "versions", "registry events")):
        out.append(f'<text x="{x}" y="14" class="coltitle">{title}</text>')

    def y_of(i: int) -> int:
        return 24 + i * (box_h + gap_y)

    def box(x: int, y: int, line1: str, line2: str, fill: str, stroke: str = "#888") -> None:
        out.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="{fill}" '
                   f'stroke="{stroke}"/>')
        out.append(f'<text x="{x + 8}" y="{y + 19}" class="b1">{escape(line1[:30])}</text>')
        out.append(f'<text x="{x + 8}" y="{y + 36}" class="b2">{escape(line2[:34])}</text>')

    def edge(x1: int, y1: int, x2: int, y2: int, dashed: bool = False) -> None:
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        out.append(f'<path d="M{x1},{y1} C{(x1 + x2) // 2},{y1} {(x1 + x2) // 2},{y2} {x2},{y2}" fill="none" '
                   f'stroke="#555" stroke-width="1.3"{dash} marker-end="url(#arrow)"/>')

    for i, run_id in enumerate(order):
        run = data_runs.get(run_id)
        kept = run.metrics.get("data/documents_kept") if run is not None and not run.missing else None
        line2 = "run missing" if run is None or run.missing else (
            f"{int(kept)} docs kept" if kept is not None else (run.name or "data"))
        box(col_x[0], y_of(i), f"data {run_id[:8]}", line2, "#eef5ff")
    index = {v.version: i for i, v in enumerate(versions)}
    for i, v in enumerate(versions):
        y = y_of(i)
        tr = v.train_run
        base = v.tags.get("base_model", "")
        box(col_x[1], y, f"train {tr.run_id[:8] if tr else '?'}",
            "fine-tune of v" + v.tags.get("base_model_version", "?") if v.tags.get("base_model_version")
            else (base or "unknown origin")[:34], "#fff7e6")
        box(col_x[2], y, f"v{v.version}" + (f"  @{', @'.join(v.aliases)}" if v.aliases else ""),
            f"ppl {v.tags.get('eval/perplexity', '-')[:8]}", "#eaf7ea" if "production" in v.aliases else "#f4f4f4",
            colour(i))
        evs = events_by_version.get(v.version, [])
        counts: dict[str, int] = {}
        for e in evs:
            counts[e.action] = counts.get(e.action, 0) + 1
        summary = ", ".join(f"{n} {a}" for a, n in counts.items()) or "no events"
        box(col_x[3], y, f"{len(evs)} event(s)", summary, "#fbeff2" if any(e.action == "rollback" for e in evs)
            else "#f7f7f7")
        for run_id in ([v.tags["data_run_id"]] if v.tags.get("data_run_id") else []) + (
                [v.tags["base_data_run_id"]] if v.tags.get("base_data_run_id") else []):
            j = order.index(run_id)
            edge(col_x[0] + box_w, y_of(j) + box_h // 2, col_x[1], y + box_h // 2,
                 dashed=run_id == v.tags.get("base_data_run_id"))
        edge(col_x[1] + box_w, y + box_h // 2, col_x[2], y + box_h // 2)
        edge(col_x[2] + box_w, y + box_h // 2, col_x[3], y + box_h // 2)
        parent = v.tags.get("base_model_version")
        if parent in index:
            py = y_of(index[parent])
            edge(col_x[2] + 40, py + box_h, col_x[1] + box_w - 30, y, dashed=True)
    out.append("</svg>")
    return "\n".join(out)
