"""All monitor metrics of one window against its reference, as ``monitor/...`` values (pure).

NaN marks a metric the window cannot support (no recorded text, no earlier records, no
successful request); :mod:`~lifecycle.monitoring.verdict` reports those as unavailable.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from lifecycle.monitoring import drift, service
from lifecycle.monitoring import reference as ref_mod
from lifecycle.monitoring.records import Window

NAN = float("nan")
PREFIX = "monitor/"


@dataclass
class Analysis:
    """Metrics (full ``monitor/...`` names), the samples behind the plots, and notes."""

    metrics: dict[str, float]
    prompt_lengths: np.ndarray
    reference_lengths: np.ndarray
    completion_lengths: np.ndarray
    baseline_completion_lengths: np.ndarray
    notes: list[str] = field(default_factory=list)


def window_prompts(records: Sequence[dict[str, Any]]) -> list[str] | None:
    """Recorded prompt texts of the window, or None when text was not recorded."""
    if not any("prompts" in r for r in records):
        return None
    return [p for r in records for p in r.get("prompts") or [] if isinstance(p, str) and p.strip()]


def _guarded(fn: Callable[[], float]) -> float:
    try:
        return float(fn())
    except ValueError:  # an empty side: the statistic is undefined, not zero
        return NAN


def analyse(window: Window, segments: Sequence[str], tokenizer: Any, *, psi_bins: int = 10,
            bits_per_byte: Callable[[Sequence[str]], float] | None = None, max_loss_texts: int = 256,
            seed: int = 0) -> Analysis:
    """Service, input, semantic and output metrics of ``window`` against reference ``segments``.

    ``bits_per_byte(texts)`` scores texts under the served model (None skips semantic drift).
    """
    notes: list[str] = []
    m: dict[str, float] = {PREFIX + k: v for k, v in service.service_metrics(window.records).items()}
    m[PREFIX + "other_version_records"] = float(sum(window.others.values()))
    m[PREFIX + "baseline_request_count"] = float(len(window.baseline))
    if m[PREFIX + "shadow_dropped"]:
        notes.append(f"{m[PREFIX + 'shadow_dropped']:.0f} shadow copies were dropped under load (queue full): counted "
                     "in monitor/shadow_dropped, not as requests or errors")

    ref_ids = ref_mod.token_ids(tokenizer, list(segments))
    ref_len = ref_mod.lengths(ref_ids)
    cur_len = service.row_values(window.records, "prompt_tokens")
    m[PREFIX + "input_drift_psi"] = _guarded(lambda: drift.psi(ref_len, cur_len, bins=psi_bins))
    m[PREFIX + "input_drift_ks"] = _guarded(lambda: drift.ks_statistic(ref_len, cur_len))
    if cur_len.size == 0:
        notes.append("no successful request in the window: input drift unavailable")

    prompts = window_prompts(window.records)
    fallback = ref_mod.fallback_token_ids(tokenizer)
    m[PREFIX + "reference_unknown_token_rate"] = ref_mod.unknown_rate(ref_ids, fallback)
    if prompts:
        cur_ids = ref_mod.token_ids(tokenizer, prompts)
        m[PREFIX + "token_js"] = _guarded(lambda: drift.js_divergence(ref_mod.token_counts(ref_ids),
                                                                      ref_mod.token_counts(cur_ids)))
        m[PREFIX + "unknown_token_rate"] = ref_mod.unknown_rate(cur_ids, fallback)
    else:
        m[PREFIX + "token_js"] = NAN
        m[PREFIX + "unknown_token_rate"] = NAN
        notes.append("prompt text was not recorded (serve with LIFECYCLE_INFERENCE_LOG_TEXT=1): "
                     "token_js, unknown_token_rate and semantic drift unavailable")

    if prompts and bits_per_byte is not None:
        rng = random.Random(seed)
        cur = prompts if len(prompts) <= max_loss_texts else rng.sample(prompts, max_loss_texts)
        base = list(segments) if len(segments) <= max_loss_texts else rng.sample(list(segments), max_loss_texts)
        cur_bpb, ref_bpb = bits_per_byte(cur), bits_per_byte(base)
        m[PREFIX + "semantic_bpb"] = cur_bpb
        m[PREFIX + "reference_bpb"] = ref_bpb
        m[PREFIX + "semantic_drift_bpb_delta"] = cur_bpb - ref_bpb
    else:
        for k in ("semantic_bpb", "reference_bpb", "semantic_drift_bpb_delta"):
            m[PREFIX + k] = NAN
        if prompts and bits_per_byte is None:
            notes.append("semantic drift skipped (semantic=false)")

    comp = service.row_values(window.records, "completion_tokens")
    base_comp = service.row_values(window.baseline, "completion_tokens")
    m[PREFIX + "completion_length_psi"] = _guarded(lambda: drift.psi(base_comp, comp, bins=psi_bins))
    m[PREFIX + "completion_length_ks"] = _guarded(lambda: drift.ks_statistic(base_comp, comp))
    m[PREFIX + "finish_reason_shift"] = (
        drift.total_variation(service.outcome_mix(window.baseline), service.outcome_mix(window.records))
        if window.baseline else NAN)
    if not window.baseline:
        notes.append("no earlier records of this version: output drift (completion length, finish reasons) "
                     "unavailable until a previous window exists")
    return Analysis(metrics=m, prompt_lengths=cur_len, reference_lengths=ref_len, completion_lengths=comp,
                    baseline_completion_lengths=base_comp, notes=notes)


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that have a value (NaN ones are reported as unavailable, not logged)."""
    return {k: v for k, v in metrics.items() if not math.isnan(v)}
