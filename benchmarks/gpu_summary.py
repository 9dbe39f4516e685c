"""The GPU check's headline: the few figures a reader wants first, taken from every step's
figures (a missing step or figure shows as None, never as an error), and the Markdown table."""

from __future__ import annotations

from typing import Any


def _get(data: Any, *path: Any) -> Any:
    """``data[path[0]][path[1]]...``, or None where any part is missing."""
    for key in path:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data


def _ratio(a: Any, b: Any) -> float | None:
    """``a / b`` rounded, or None when either is missing or b is zero."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 3)
    return None


def _decode(fig: Any, batch: int) -> dict[str, Any] | None:
    """The decode row of ``batch`` in a serving step's figures."""
    return next((row for row in _get(fig, "decode") or [] if row.get("batch") == batch), None)


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a check summary, grouped by step."""
    fig = {name: step.get("figures") or {} for name, step in summary.get("steps", {}).items()}
    tps = {name: _get(fig, name, "tokens_per_s") for name in ("bench_train", "bench_train_vocab64",
                                                             "bench_train_compiled")}
    out: dict[str, Any] = {
        "machine": {k: _get(fig, "facts", k) for k in ("gpu", "gpu_memory_gib", "torch", "cuda_runtime",
                                                        "bf16_supported", "copy_bandwidth_tbps", "matmul_tflops")},
        "train": {k: _get(fig, "train", k) for k in ("tokens_per_s", "mfu_pct", "peak_memory_gib", "checkpoint_stall_s",
                                                      "checkpoint_gib",
                                                      "resume_identical", "resume_max_loss_diff",
                                                      "rerun_max_loss_diff_after_checkpoint", "resume_error")},
        "evaluate": {k: _get(fig, "evaluate", k) for k in ("loss_fp32", "loss_bf16_weights", "bf16_weights_minus_fp32",
                                                            "bf16_autocast_minus_fp32")},
        "serve": {
            **{f"decode_b{b}_tokens_per_s": _get(_decode(fig.get("serve"), b), "tokens_per_s") for b in (1, 32)},
            **{f"decode_b{b}_fraction_of_bound": _get(_decode(fig.get("serve"), b), "fraction_of_bound")
               for b in (1, 32)},
            "greedy_identical_fraction": _get(fig, "serve", "greedy", "identical_fraction"),
            "greedy_first_divergence_min": _get(fig, "serve", "greedy", "first_divergence_min"),
            "greedy_near_ties": _get(fig, "serve", "greedy", "near_ties"),
            "coalescing_on_vs_off_8_threads": _get(fig, "serve", "coalescing", "on_vs_off"),
            "coalescing_mean_batch": _get(fig, "serve", "coalescing", "on", "mean_batch"),
        },
        "bench_train": {
            "project_tokens_per_s": _get(tps, "bench_train", "project"),
            "bare_tokens_per_s": _get(tps, "bench_train", "bare"),
            "project_vs_bare": _ratio(_get(tps, "bench_train", "project"), _get(tps, "bench_train", "bare")),
            "mfu_pct": _get(fig, "bench_train", "mfu_pct"),
            "tracking": _get(fig, "bench_train", "tracking"),
            "vocab64_vs_vocab50257_bare": _ratio(_get(tps, "bench_train_vocab64", "bare"),
                                                 _get(tps, "bench_train", "bare")),
            "vocab64_mfu_pct": _get(fig, "bench_train_vocab64", "mfu_pct"),
            "compiled_vs_eager_project": _ratio(_get(tps, "bench_train_compiled", "project"),
                                                _get(tps, "bench_train", "project")),
        },
        "serve_compiled": {
            **{f"decode_b{b}_vs_eager": _ratio(_get(_decode(fig.get("serve_compiled"), b), "tokens_per_s"),
                                               _get(_decode(fig.get("serve"), b), "tokens_per_s")) for b in (1, 32)},
            "static_cache_compile": _get(fig, "serve_compiled", "static_cache_compile"),
        },
    }
    out["steps_ok"] = sum(1 for s in summary.get("steps", {}).values() if s.get("status") == "ok")
    out["steps"] = len(summary.get("steps", {}))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_shown(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_shown(v) for v in value)
    return "-" if value is None else str(value)


def markdown(summary: dict[str, Any]) -> str:
    """The check as Markdown: one row per step (status, time), then the headline figures."""
    head = summary.get("headline") or headline(summary)
    lines = [f"# GPU check ({summary.get('mode')} mode, started {summary.get('started')})", "",
             f"{head['steps_ok']} of {head['steps']} steps ok.", "",
             "| step | status | seconds | timeout |", "|---|---|---|---|"]
    for name, step in summary.get("steps", {}).items():
        lines.append(f"| {name} | {step.get('status')} | {_shown(step.get('seconds'))} "
                     f"| {_shown(step.get('timeout_s'))} |")
    lines += ["", "| group | figure | value |", "|---|---|---|"]
    for group, figures in head.items():
        if isinstance(figures, dict):
            lines += [f"| {group} | {key} | {_shown(value)} |" for key, value in figures.items()]
    lines += ["", "Every figure: summary.json (per step); every step's output: steps.log."]
    return "\n".join(lines) + "\n"
