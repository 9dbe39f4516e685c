"""The training stage's configuration: one validated dataclass tree.

Everyday options are top-level keys (they also have CLI flags: ``--preset``, ``--max-steps``,
``--batch-size``, ``--learning-rate``, ``--seed``, ``--output``); LoRA lives in its own section
(``--set lora.r=8``). Values are checked in ``__post_init__`` so a bad value fails before any
model is built, with a message that says what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

from lifecycle.errors import ConfigError
from lifecycle.train.budget import parse_duration
from lifecycle.train.model import PRESETS

#: The registered model name used when ``--model-name`` is not given.
DEFAULT_MODEL_NAME = "lifecycle-lm"

#: Where runs without an explicit ``output`` keep their checkpoints: one folder per MLflow run,
#: ``checkpoints/<run_id>/``, so that training twice in one folder starts two independent runs.
DEFAULT_CHECKPOINT_ROOT = "checkpoints"


@dataclass
class LoraConfig:
    """Low-rank adapters through ``peft``; ``r > 0`` turns them on."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    #: Module names to adapt; empty means "the attention/MLP projections of this architecture".
    target_modules: list[str] = field(default_factory=list)
    #: Merge the adapters into the logged weights (a plain model every stage can load).
    merge: bool = True

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError("lora.r must be >= 0 (0 turns LoRA off)")
        if self.alpha <= 0:
            raise ConfigError("lora.alpha must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("lora.dropout must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        """Whether LoRA adapters are trained instead of the full model."""
        return self.r > 0


@dataclass
class ModelShape:
    """Shape overrides over the preset (``--set model.n_layer=6``); unset keys keep the preset's."""

    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    #: Context length (position embeddings); at least the data's block size in any case.
    n_positions: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "n_positions"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value}")
        if self.n_embd is not None and self.n_head is not None and self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")

    @property
    def given(self) -> bool:
        """Whether any key is set."""
        return any(v is not None for v in (self.n_layer, self.n_head, self.n_embd, self.n_positions))


@dataclass
class TrainConfig:
    """Everything that decides what is trained and how (logged as the run's params)."""

    # What to train ("auto": a shape sized for the data and the time budget, lifecycle.train.auto).
    preset: str = "tiny"
    base_model: Optional[str] = None
    model: ModelShape = field(default_factory=ModelShape)
    dropout: float = 0.0
    # Optimisation (batch_size is the micro-batch per process; the global batch per optimizer
    # step is batch_size * grad_accum * world_size).
    #: Optimizer steps; unset: 200, or as many as ``time_budget`` allows (with both, the first limit wins).
    max_steps: Optional[int] = None
    #: Wall-clock budget of the training loop, evaluations and checkpoints included: 90s, 10m, 1h or seconds.
    time_budget: Optional[str] = None
    batch_size: int = 8
    grad_accum: int = 1
    #: Peak LR; unset: 1e-3, or with ``--preset auto`` the auto rule's for the chosen width.
    learning_rate: Optional[float] = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    #: ``cosine``: warmup then cosine decay to min_lr_ratio; ``wsd``: warmup, constant, then a linear
    #: decay over the last ``decay_fraction`` of the steps.
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2
    max_grad_norm: float = 1.0
    seed: int = 42
    # Validation, early stopping and checkpoints.
    eval_every: int = 50
    eval_batches: int = 0
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    checkpoint_every: int = 100
    #: Also save when this many seconds passed since the last save (0: by steps only).
    checkpoint_every_s: float = 0.0
    #: Copy the states to host memory and write them on a background thread (one save in flight).
    checkpoint_background: bool = True
    keep_checkpoints: int = 2
    #: Checkpoint folder; None: ``checkpoints/<run_id>/`` (a folder of its own for each run).
    output: Optional[str] = None
    # Hardware.
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    #: Fused AdamW (one kernel per step on CUDA and CPU); unset: on (see benchmarks/bench_train.py).
    fused_adamw: Optional[bool] = None
    #: torch intra-op threads for this process; 0: torch's default (one per core).
    threads: int = 0
    # Tracking and registration.
    log_every: int = 1
    experiment: Optional[str] = None
    system_metrics: bool = True
    log_model: bool = True
    #: Log each evaluated checkpoint's weights as an MLflow logged model of the run, with its val/ metrics.
    log_checkpoints: bool = True
    #: Which checkpoint becomes the registered version: the best val/loss, or the last step.
    register_checkpoint: Literal["best", "last"] = "best"
    model_name: str = DEFAULT_MODEL_NAME
    progress: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.base_model is None and self.preset not in PRESETS and self.preset != "auto":
            raise ConfigError(f"preset: {self.preset!r} is not one of {', '.join(PRESETS)}, auto")
        if self.base_model is not None and self.model.given:
            raise ConfigError("model.* shapes a model trained from scratch; a --base-model has its own shape")
        if self.base_model is None and self.preset in PRESETS:
            # Checked against the named preset here, before any data is read (auto: once the shape is chosen).
            base = PRESETS[self.preset]
            n_embd, n_head = self.model.n_embd or base.n_embd, self.model.n_head or base.n_head
            if n_embd % n_head:
                raise ConfigError(f"model.n_embd ({n_embd}) must be a multiple of model.n_head ({n_head}) "
                                  f"(unset keys are the {self.preset} preset's); set both")
        # A float field takes no infinity or NaN (--set learning_rate=inf would train to NaN at step 1).
        for name, value in _floats(self):
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        if self.learning_rate is None and not (self.preset == "auto" and self.base_model is None):
            self.learning_rate = 1e-3
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        elif self.max_steps is None:
            self.max_steps = 200
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.lora.enabled and self.base_model is None:
            raise ConfigError("LoRA fine-tunes an existing model: give --base-model (or set lora.r=0)")
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_every": self.eval_every, "checkpoint_every": self.checkpoint_every,
                    "keep_checkpoints": self.keep_checkpoints, "log_every": self.log_every}
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        if not (self.checkpoint_every_s >= 0 and self.checkpoint_every_s != float("inf")):
            raise ConfigError("checkpoint_every_s must be a number of seconds >= 0 (0: off), "
                              f"got {self.checkpoint_every_s}")
        if self.output is not None and not str(self.output).strip():
            raise ConfigError("output must not be empty (leave it unset for checkpoints/<run_id>/)")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("warmup_steps", "eval_batches", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_grad_norm < 0:
            raise ConfigError("max_grad_norm must be >= 0 (0 turns clipping off)")
        # torch's AdamW refuses a negative decay only once the run exists: refused here, before it.
        for name in ("weight_decay", "early_stopping_min_delta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise ConfigError("adam_beta1 and adam_beta2 must be in [0, 1)")
        if not self.model_name.strip():
            raise ConfigError("model_name must not be empty")
        if self.register_checkpoint not in ("best", "last"):
            raise ConfigError(f"register_checkpoint must be best or last, got {self.register_checkpoint!r}")
        if self.register_checkpoint == "last" and not self.log_checkpoints:
            raise ConfigError("register_checkpoint=last registers the last logged checkpoint: "
                              "it needs log_checkpoints=true")


def _floats(cfg: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """The float values of a config tree, with their dotted names."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value


#: Keys a resumed run may change (everything else must match the checkpoint's config).
#: Where and how checkpoints are written does not change the numbers.
RESUME_MUTABLE_KEYS = frozenset({"max_steps", "progress", "log_model", "model_name", "experiment",
                                 "log_checkpoints", "register_checkpoint",
                                 "eval_batches", "keep_checkpoints", "system_metrics", "output",
                                 "checkpoint_every", "checkpoint_every_s", "checkpoint_background",
                                 "threads", "time_budget"})
