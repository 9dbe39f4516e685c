"""``lifecycle monitor`` settings (validated dataclass; YAML file and ``--set`` as every stage)."""

from __future__ import annotations

from dataclasses import dataclass

from lifecycle.errors import ConfigError


@dataclass
class MonitorConfig:
    """How a window is compared with its reference."""

    #: Time window start: ISO time or a duration before now (``30m``, ``24h``, ``7d``); ``all`` for every record.
    since: str = "24h"
    #: Records of other model versions in the window: ``refuse`` (error) or ``separate`` (left out, counted).
    version_mismatch: str = "refuse"
    #: Quantile bins of the population stability index.
    psi_bins: int = 10
    #: Split of the prepared reference data whose raw text is the reference.
    split: str = "test"
    #: Most reference segments kept (a fixed-seed sample).
    max_reference_segments: int = 2000
    #: Most texts scored on each side for the semantic (bits-per-byte) drift.
    max_loss_texts: int = 256
    #: Device of the semantic drift's forward passes (``auto`` picks CUDA when visible).
    device: str = "auto"
    #: Skip the model forward passes (semantic drift reported unavailable).
    semantic: bool = True
    #: MLflow experiment of the run (None: the active/default one).
    experiment: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.version_mismatch not in ("refuse", "separate"):
            raise ConfigError(f"version_mismatch must be refuse or separate, got {self.version_mismatch!r}")
        if self.psi_bins < 2:
            raise ConfigError(f"psi_bins must be >= 2, got {self.psi_bins}")
        if self.split not in ("train", "validation", "test"):
            raise ConfigError(f"split must be train, validation or test, got {self.split!r}")
        if self.max_reference_segments < 1 or self.max_loss_texts < 1:
            raise ConfigError("max_reference_segments and max_loss_texts must be >= 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
