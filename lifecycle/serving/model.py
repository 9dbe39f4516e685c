"""The MLflow pyfunc model: what ``mlflow models serve``, ``mlflow.pyfunc.load_model`` and Spark
UDFs load. A thin adapter around :class:`~lifecycle.serving.engine.Engine`.

Refused requests raise ``MlflowException(error_code=INVALID_PARAMETER_VALUE)``, which the
scoring server answers with HTTP 400 and the message; an accelerator out of memory raises
``RESOURCE_EXHAUSTED`` (HTTP 429) so clients back off instead of treating it as their fault.
"""

from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from lifecycle.errors import AcceleratorOutOfMemoryError
from lifecycle.serving import body_limit
from lifecycle.serving.requests import PARAM_SPECS, InvalidRequest

log = logging.getLogger(__name__)

#: The artifact key (and folder under ``artifacts/``) of the Hugging Face model folder.
MODEL_ARTIFACT = "model"

#: Loaded engines by MLflow logged-model id, so that requests MLflow refuses before ``predict``
#: (bad param types, unknown params) still reach the right inference record sink.
_ENGINES: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


def _record_refusal(message: str, *, start: float | None = None, params: Any = None) -> None:
    from mlflow.pyfunc.context import get_prediction_context

    ctx = get_prediction_context()
    engine = _ENGINES.get(ctx.model_id) if ctx is not None and ctx.model_id else None
    if engine is None and len(_ENGINES) == 1:
        engine = next(iter(_ENGINES.values()))
    if engine is not None:
        engine.record_refusal(message, start=start, params=params)


def _model_identity(model_dir: Path) -> tuple[str | None, str | None]:
    """(run id, logged-model id) from the MLmodel file above the artifact folder, if any."""
    import yaml

    for parent in list(model_dir.parents)[:3]:
        mlmodel = parent / "MLmodel"
        if mlmodel.is_file():
            meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
            return meta.get("run_id"), meta.get("model_id")
    return None, None


def _install_strict_params() -> None:
    """Make MLflow refuse unknown params for *our* models instead of dropping them silently.

    MLflow's ``_enforce_params_schema`` drops params the signature does not declare with only a
    log warning, before ``predict`` ever sees them, so a misspelt ``max_tokens`` would silently
    generate 64 tokens. The issue requires a 400 that lists what is allowed. We wrap the one
    function ``PyFuncModel._predict`` calls, and only for a params schema that is exactly ours;
    every other model in the process keeps MLflow's behaviour.
    """
    import mlflow.pyfunc as pyfunc_module
    from mlflow.exceptions import MlflowException

    from lifecycle.serving.router import ROUTING_PARAM

    original = getattr(pyfunc_module, "_enforce_params_schema", None)
    if original is None or getattr(original, "_lifecycle_strict", False):
        return
    # Ours: the model's params, and the canary router's (the same plus routing_key).
    ours = (set(PARAM_SPECS), set(PARAM_SPECS) | {ROUTING_PARAM})

    def strict(params: Any, schema: Any) -> Any:
        names = {p.name for p in getattr(schema, "params", [])} if schema is not None else set()
        if names not in ours:
            return original(params, schema)
        start = time.perf_counter()
        try:
            if isinstance(params, dict):
                unknown = sorted(str(k) for k in params if str(k) not in names)
                if unknown:
                    raise MlflowException.invalid_parameter_value(
                        f"unknown param {unknown[0]!r}; allowed params: {', '.join(sorted(names))}")
            return original(params, schema)
        except MlflowException as exc:
            _record_refusal(exc.message, start=start, params=params)
            raise

    strict._lifecycle_strict = True  # type: ignore[attr-defined]
    pyfunc_module._enforce_params_schema = strict


_SCORING_SERVER_ENV = body_limit.SCORING_SERVER_ENV


class _ServerAsyncio:
    """``asyncio`` as MLflow's scoring server sees it, with ``to_thread`` on a pool of our size."""

    def __init__(self, real: Any, pool: Any, workers: int):
        self._real = real
        self._lifecycle_pool = pool
        self._lifecycle_workers = workers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def to_thread(self, func: Any, /, *args: Any, **kwargs: Any) -> Any:
        """What ``asyncio.to_thread`` does, on our pool instead of the loop's default one."""
        import contextvars
        import functools

        loop = self._real.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return await loop.run_in_executor(self._lifecycle_pool, call)


def _widen_scoring_server_threads(max_batch: int) -> int | None:
    """Let ``mlflow models serve`` run enough ``predict`` calls at once to fill a batch.

    The scoring server hands each request to ``asyncio.to_thread``, i.e. to the event loop's
    default pool of ``min(32, cores + 4)`` threads: 6 on a 2-core machine, so 16 concurrent
    clients never formed a batch of more than 5 (one running, five queued) and the rest waited in
    the event loop instead of in the coalescer's queue; even 20 threads on a 16-core GPU host
    cannot fill a batch of 32. The model loads before uvicorn starts its loop, so the loop's
    default pool cannot be set from here; instead the scoring server module (and only it, only
    inside ``mlflow models serve``, only with coalescing on) gets an ``asyncio`` whose
    ``to_thread`` uses a pool of ``2 * max_batch`` threads: one full batch running, the next one
    queueing. Returns the pool size, or None where nothing was changed.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    if _SCORING_SERVER_ENV not in os.environ:
        return None
    from mlflow.pyfunc import scoring_server

    current = getattr(scoring_server, "asyncio", None)
    if current is None or not hasattr(current, "to_thread"):
        return None  # a future MLflow that serves differently: leave it alone
    existing = getattr(current, "_lifecycle_workers", None)
    if existing is not None:
        return existing
    workers = max(2 * max_batch, min(32, (os.cpu_count() or 1) + 4))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lifecycle-predict")
    scoring_server.asyncio = _ServerAsyncio(current, pool, workers)
    return workers


class LanguageModel(mlflow.pyfunc.PythonModel):
    """Causal LM text generation as an MLflow pyfunc model (see :mod:`lifecycle.serving`)."""

    def __init__(self) -> None:
        self.engine: Any = None

    def load_context(self, context: Any) -> None:
        """Load tokenizer + safetensors weights once, pick the device, warm up."""
        from lifecycle.serving.engine import Engine
        from lifecycle.serving.records import InferenceRecorder
        from lifecycle.serving.settings import serving_config

        model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        config = serving_config(getattr(context, "model_config", None) or {})
        run_id, model_id = _model_identity(model_dir)
        name = config.model_name or (f"run-{run_id}" if run_id else model_id)
        version = config.model_version or run_id
        recorder = InferenceRecorder.from_env(model_name=name, model_version=version)
        self.engine = Engine(model_dir, config, recorder=recorder)
        if model_id:
            _ENGINES[model_id] = self.engine
        _install_strict_params()
        body_limit.install(config.max_body_bytes)
        if config.coalesce:
            threads = _widen_scoring_server_threads(config.max_batch_size)
            if threads:
                log.info("scoring server: %d request threads so that batches of %d can form", threads,
                         config.max_batch_size)
        if config.warmup:
            self.engine.warmup()
        log.info("loaded %s on %s (coalesce=%s, max_batch=%d, wait=%.1f ms)", model_dir, self.engine.device,
                 config.coalesce, config.max_batch_size, config.batch_wait_ms)

    # model_input stays unannotated on purpose: MLflow 3 reads predict's type hints to build a
    # schema, and any hint that is not list[...] makes it warn; inputs are validated by the engine.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """Generate text; a DataFrame with text, prompt_tokens, completion_tokens, finish_reason, truncated."""
        return answer(self.engine, model_input, params)


def answer(engine: Any, model_input: Any, params: Any, **kwargs: Any) -> Any:
    """``engine.predict`` with its refusals as the MLflow errors the scoring server answers (400 / 429)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_EXHAUSTED

    try:
        return engine.predict(model_input, params, **kwargs)
    except InvalidRequest as exc:
        raise MlflowException.invalid_parameter_value(str(exc)) from None
    except AcceleratorOutOfMemoryError as exc:
        # Every spelling of CUDA OOM (the engine classifies them): 429 so clients back off.
        raise MlflowException(str(exc), error_code=RESOURCE_EXHAUSTED) from None

