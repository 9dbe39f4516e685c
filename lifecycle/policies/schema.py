"""The policy schema: one frozen dataclass per gate kind, and the metric-name contract."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["disabled", "dry_run", "enabled"]
MODES = ("disabled", "dry_run", "enabled")
TARGETS = ("staging", "production")
COMPARATORS = ("<", "<=", ">", ">=", "==", "!=")

#: ``eval/<name>`` metrics written by the evaluation stage (the contract; see DESIGN.md).
KNOWN_EVAL_METRICS = (
    "loss", "perplexity", "bits_per_byte", "rougeL", "bleu", "exact_match",
    "latency_p50_ms", "latency_p95_ms", "tokens_per_s",
)
_KNOWN_COMPARE = ("loss_delta_ci_low", "loss_delta_ci_high", "win_rate")
_CHECK_RE = re.compile(r"^eval/check_[A-Za-z0-9_.-]+$")
#: Metrics where a smaller value is better; everything else is "higher is better".
_LOWER_BETTER = {"loss", "perplexity", "bits_per_byte", "latency_p50_ms", "latency_p95_ms"}


def is_known_metric(name: str) -> bool:
    """True for the ``eval/`` and ``compare/`` names of the contract (and ``eval/check_<x>``)."""
    if _CHECK_RE.match(name):
        return True
    kind, _, metric = name.partition("/")
    if kind == "eval":
        return metric in KNOWN_EVAL_METRICS
    if kind == "compare":
        if metric in _KNOWN_COMPARE:
            return True
        return metric.endswith("_delta") and metric[: -len("_delta")] in KNOWN_EVAL_METRICS
    return False


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``eval/<metric>`` (or the bare name) is an improvement."""
    return metric.rpartition("/")[2] in _LOWER_BETTER


@dataclass(frozen=True)
class ThresholdGate:
    """``eval/bits_per_byte <= 2.0``: a bound on one evaluation/comparison tag of the version."""

    metric: str
    op: str
    value: float
    mode: Mode = "enabled"


@dataclass(frozen=True)
class BaselineGate:
    """Relative to the current production version, measured on the same evaluation data.

    ``min_improvement`` / ``max_regression`` are fractions of the production value (0.02 = 2 %),
    in the metric's own direction (lower is better for loss-like metrics).
    """

    metric: str = "eval/loss"
    min_improvement: float | None = None
    max_regression: float | None = None
    require_same_data: bool = True
    require_ci_excludes_zero: bool = False
    mode: Mode = "enabled"


@dataclass(frozen=True)
class LatencyGate:
    """``eval/latency_p95_ms`` at most ``max_p95_ms``."""

    max_p95_ms: float
    mode: Mode = "enabled"


@dataclass(frozen=True)
class ModelSizeGate:
    """Model size (``model_size_bytes`` tag, or the sum of the version's artifacts) at most this."""

    max_bytes: int
    mode: Mode = "enabled"


@dataclass(frozen=True)
class SignatureGate:
    """The version's MLmodel declares a signature."""

    mode: Mode = "enabled"


@dataclass(frozen=True)
class RequiredTagsGate:
    """Tags that must be present and non-empty on the version (``approved_by``: manual approval)."""

    tags: tuple[str, ...] = ()
    mode: Mode = "enabled"


@dataclass(frozen=True)
class ChecksGate:
    """Every ``eval/check_*`` tag equals 1 (and at least ``min_checks`` of them exist)."""

    min_checks: int = 1
    mode: Mode = "enabled"


@dataclass(frozen=True)
class CooldownGate:
    """At least ``min_seconds`` since the last production change recorded in the ledger."""

    min_seconds: float
    mode: Mode = "enabled"


@dataclass(frozen=True)
class CompressionGate:
    """A compressed variant (tag ``compressed_from``) may lose at most this much against its parent.

    The parent's value is the one ``lifecycle compress`` measured beside the variant, on the same
    data (``compress/parent_<metric>``). ``max_regression`` is a fraction of the parent's value
    (0.02 = 2 % worse), ``max_delta`` an absolute amount in the metric's unit, both in the metric's
    own direction. Versions that are not compressed variants pass.
    """

    metric: str = "eval/bits_per_byte"
    max_regression: float | None = None
    max_delta: float | None = None
    mode: Mode = "enabled"


@dataclass(frozen=True)
class CanaryPolicy:
    """Live-traffic comparison of a challenger with production (``lifecycle canary``).

    Deltas are "how much worse the challenger may be": ``max_error_rate_delta`` in absolute
    error rate, the latency increases and the completion-length change as fractions of
    production's value, ``max_finish_reason_shift`` as the total variation distance of the
    finish-reason mixes. Shadow agreement must reach ``min_shadow_exact_match`` /
    ``min_shadow_token_overlap``. With at least ``min_requests`` per arm a bootstrap interval at
    ``confidence`` decides. ``share_steps`` are the canary's shares, smallest first. When
    ``mode`` is ``enabled``, promotion to production needs a passing canary verdict and
    ``lifecycle canary --act`` acts; ``dry_run`` reports the gate and what ``--act`` would do.
    """

    min_requests: int = 100
    max_error_rate_delta: float = 0.01
    max_latency_p50_increase: float = 0.2
    max_latency_p95_increase: float = 0.25
    max_completion_length_change: float = 0.2
    max_finish_reason_shift: float = 0.1
    min_shadow_exact_match: float = 0.0
    min_shadow_token_overlap: float = 0.0
    confidence: float = 0.95
    bootstrap_resamples: int = 1000
    share_steps: tuple[float, ...] = (0.1, 0.5, 1.0)
    mode: Mode = "dry_run"


@dataclass(frozen=True)
class TargetPolicy:
    """The gates of one target; ``None`` means the gate is not configured."""

    thresholds: tuple[ThresholdGate, ...] = ()
    baseline: BaselineGate | None = None
    latency: LatencyGate | None = None
    model_size: ModelSizeGate | None = None
    signature: SignatureGate | None = None
    required_tags: RequiredTagsGate | None = None
    checks: ChecksGate | None = None
    cooldown: CooldownGate | None = None
    compression: CompressionGate | None = None
    #: The policy's top-level ``canary`` section, checked for production (set by the loader).
    canary: CanaryPolicy | None = None


@dataclass(frozen=True)
class MonitorThreshold:
    """A monitoring metric's warn and retrain levels (used by the monitoring stage)."""

    warn: float | None = None
    retrain: float | None = None


@dataclass(frozen=True)
class Policy:
    """A loaded, validated policy file."""

    path: str
    digest: str
    staging: TargetPolicy = field(default_factory=TargetPolicy)
    production: TargetPolicy = field(default_factory=TargetPolicy)
    monitoring: dict[str, MonitorThreshold] = field(default_factory=dict)
    description: str = ""
    canary: CanaryPolicy | None = None

    def target(self, name: str) -> TargetPolicy:
        """The gates for ``staging`` or ``production``."""
        return self.staging if name == "staging" else self.production
