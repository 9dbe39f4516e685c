"""The evaluation stage's configuration: ``EvalConfig`` and its sections.

Loaded with :func:`lifecycle.config.load_config` (defaults < ``--config`` YAML < flags <
``--set key=value``). Defaults keep a run on the ``tiny`` preset in seconds: 32 prompts of 32 new
tokens, a handful of timed requests per batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from lifecycle.errors import ConfigError


@dataclass
class LossConfig:
    """Loss / perplexity over packed blocks and bits-per-byte over raw documents."""

    batch_size: int = 32
    #: Evaluate only the first N blocks of the split (None: all of them).
    max_blocks: Optional[int] = None
    #: Bits-per-byte on only the first N documents of the split (None: all of them).
    max_documents: Optional[int] = None
    #: Window length for bits-per-byte (None: the model's context, n_positions).
    window: Optional[int] = None
    #: Block length when DATA is a raw source packed here (None: min(model context, 256)).
    block_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError("loss.batch_size must be positive")
        for key in ("max_blocks", "max_documents"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"loss.{key} must be positive (or null for all)")
        for key in ("window", "block_size"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ConfigError(f"loss.{key} must be at least 2 tokens (or null for the model's context)")


@dataclass
class GenerationConfig:
    """The prompt set and how each prompt is answered."""

    #: Prompts in the default set (cut from the split's documents) and the cap on a --prompts file.
    num_prompts: int = 32
    max_new_tokens: int = 32
    #: Default set: documents are cut at this fraction of their length (at a word boundary).
    cut_fraction: float = 0.5
    #: Default set: prompts keep at most this many characters before the cut (the end of the text).
    max_prompt_chars: int = 400
    #: Default set: documents shorter than this are skipped (too short to cut in two).
    min_document_chars: int = 40
    #: Generated text is compared with this many words of the reference (None: all of it).
    reference_words: Optional[int] = 24
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.num_prompts <= 0:
            raise ConfigError("generation.num_prompts must be positive")
        if self.max_new_tokens <= 0:
            raise ConfigError("generation.max_new_tokens must be positive")
        if not 0.0 < self.cut_fraction < 1.0:
            raise ConfigError("generation.cut_fraction must lie strictly between 0 and 1")
        if self.max_prompt_chars <= 0 or self.min_document_chars <= 1:
            raise ConfigError("generation.max_prompt_chars and min_document_chars must be positive")
        if self.reference_words is not None and self.reference_words <= 0:
            raise ConfigError("generation.reference_words must be positive (or null for all)")
        if self.batch_size <= 0:
            raise ConfigError("generation.batch_size must be positive")


@dataclass
class LatencyConfig:
    """Timed generation requests through the pyfunc model, per batch size."""

    enabled: bool = True
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    #: Timed requests per batch size (after the warm-up requests).
    requests: int = 8
    warmup: int = 1
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise ConfigError("latency.batch_sizes must be a non-empty list of positive integers")
        if self.requests <= 0 or self.warmup < 0 or self.max_new_tokens <= 0:
            raise ConfigError("latency.requests and latency.max_new_tokens must be positive, latency.warmup >= 0")


@dataclass
class CompareConfig:
    """Champion against challenger."""

    bootstrap_samples: int = 2000
    confidence: float = 0.95
    #: Compare with the registered model's @production version when --baseline is not given.
    default_to_production: bool = True

    def __post_init__(self) -> None:
        if self.bootstrap_samples < 100:
            raise ConfigError("compare.bootstrap_samples must be at least 100")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError("compare.confidence must lie between 0.5 and 1")


@dataclass
class EvalConfig:
    """Everything `lifecycle evaluate` reads; see the section classes for each key."""

    split: str = "test"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Weights and activations of the measurements: ``auto`` is fp32 on a CPU and bf16 on CUDA (as
    #: serving runs); ``fp32`` is true fp32 everywhere (TF32 off); ``bf16`` needs CUDA.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    #: Behavioural suite (YAML); None: the packaged ``lifecycle/evaluate/checks.yaml``.
    checks: Optional[str] = None
    #: Write eval/... tags on the registered version named by --model (when it names one).
    write_tags: bool = True
    #: MLflow experiment for the run (None: MLflow's current/default experiment).
    experiment: Optional[str] = None
    loss: LossConfig = field(default_factory=LossConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation", "test"):
            raise ConfigError(f"split: {self.split!r} is not one of train, validation, test")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision: {self.precision!r} is not one of auto, fp32, bf16")
