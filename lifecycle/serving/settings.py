"""Serving settings: caps, batching knobs and identity, from model config and environment.

Precedence (lowest first): dataclass defaults < the ``model_config`` logged with the model
(``mlflow models serve`` lets an operator override it with ``SERVING_MODEL_CONFIG``) < the
``LIFECYCLE_*`` environment variables that ``lifecycle serve`` sets. Values are validated the
same way as every stage config (unknown keys refused, types coerced), so a typo in a deployment
fails at load time with the list of valid keys instead of being silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from lifecycle.config import from_mapping
from lifecycle.errors import ConfigError

#: Environment variable -> ServingConfig field. Documented in ``lifecycle serve --help``.
ENV_VARS: dict[str, str] = {
    "LIFECYCLE_DEVICE": "device",
    "LIFECYCLE_MAX_BATCH_SIZE": "max_batch_size",
    "LIFECYCLE_BATCH_WAIT_MS": "batch_wait_ms",
    "LIFECYCLE_COALESCE": "coalesce",
    "LIFECYCLE_MAX_PROMPT_TOKENS": "max_prompt_tokens",
    "LIFECYCLE_MAX_NEW_TOKENS_CAP": "max_new_tokens_cap",
    "LIFECYCLE_DEFAULT_MAX_NEW_TOKENS": "default_max_new_tokens",
    "LIFECYCLE_COMPILE": "compile",
    "LIFECYCLE_CPU_THREADS": "cpu_threads",
    "LIFECYCLE_WARMUP": "warmup",
    "LIFECYCLE_MAX_ROWS": "max_rows",
    "LIFECYCLE_MAX_BODY_BYTES": "max_body_bytes",
    "LIFECYCLE_MAX_STOP_CHARS": "max_stop_chars",
    "LIFECYCLE_MODEL_NAME": "model_name",
    "LIFECYCLE_MODEL_VERSION": "model_version",
}


@dataclass
class ServingConfig:
    """How the served model batches, what it refuses, and what it calls itself in records."""

    #: ``cuda``, ``cuda:1``, ``cpu``; None picks CUDA when available.
    device: str | None = None
    #: Most rows one ``generate`` call takes (a larger request is split into several calls).
    max_batch_size: int = 32
    #: Longest a starting batch waits for requests that are already being parsed (milliseconds).
    #: A lone request never waits: a batch starts at once when the engine is idle, and requests
    #: that arrive while one runs form the next.
    batch_wait_ms: float = 5.0
    #: Coalesce concurrent ``predict`` calls into one ``generate`` (mlflow#8007: the server never does).
    coalesce: bool = True
    #: Cap on prompt tokens; None means the model's context minus ``max_new_tokens``.
    max_prompt_tokens: int | None = None
    #: Largest ``max_new_tokens`` a request may ask for.
    max_new_tokens_cap: int = 512
    #: ``max_new_tokens`` when the request does not say (never above the cap).
    default_max_new_tokens: int = 64
    #: On CUDA: static KV cache + ``torch.compile`` of the decode step (slow first call, faster decode).
    compile: bool = False
    #: torch intra-op threads on CPU; None keeps torch's default. On a shared CPU, 1 per worker
    #: avoids OpenMP oversubscription (measured here: 10x slower decode with 2 threads under load).
    cpu_threads: int | None = None
    #: One short generation at load time so the first request does not pay for lazy initialisation.
    warmup: bool = True
    #: Most rows (prompts) one request may carry; more is refused with HTTP 400 naming the limit.
    max_rows: int = 256
    #: Largest request body ``mlflow models serve`` reads (bytes); larger gets HTTP 413 unread.
    max_body_bytes: int = 4 * 1024 * 1024
    #: Longest stop string (characters); every decoded token is matched against each one.
    max_stop_chars: int = 64
    #: Identity written into inference records; falls back to the run id of the logged model.
    model_name: str | None = None
    model_version: str | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.max_new_tokens_cap < 1:
            raise ConfigError(f"max_new_tokens_cap must be >= 1, got {self.max_new_tokens_cap}")
        if self.default_max_new_tokens < 1:
            raise ConfigError(f"default_max_new_tokens must be >= 1, got {self.default_max_new_tokens}")
        # Lowering the cap lowers the default with it: an operator who sets only the cap means it.
        self.default_max_new_tokens = min(self.default_max_new_tokens, self.max_new_tokens_cap)
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        for name in ("max_rows", "max_body_bytes", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


def serving_config(model_config: Mapping[str, Any] | None = None,
                   environ: Mapping[str, str] | None = None) -> ServingConfig:
    """Resolve the serving settings from the logged ``model_config`` and ``LIFECYCLE_*`` variables."""
    env = os.environ if environ is None else environ
    valid = {f.name for f in fields(ServingConfig)}
    # model_config may carry keys meant for others (MLflow passes the whole dict): keep ours only
    # when they are namespaced, refuse unknown ones under our namespace.
    data: dict[str, Any] = dict((model_config or {}).get("serving", {}) or {})
    for key, value in (model_config or {}).items():
        if key in valid:
            data[key] = value
    for var, key in ENV_VARS.items():
        value = env.get(var)
        if value is not None and value != "":
            data[key] = value
    return from_mapping(ServingConfig, data, prefix="serving.")
