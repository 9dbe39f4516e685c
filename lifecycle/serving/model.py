"""The MLflow pyfunc model: what ``mlflow models serve``, ``mlflow.pyfunc.load_model`` and Spark
UDFs load. A thin adapter around :class:`~lifecycle.serving.engine.Engine`.

Refused requests raise ``MlflowException(error_code=INVALID_PARAMETER_VALUE)``, which the
scoring server answers with HTTP 400 and the message; an accelerator out of memory raises
``RESOURCE_EXHAUSTED`` (HTTP 429) so clients back off instead of treating it as their fault.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from lifecycle.serving.requests import PARAM_SPECS, InvalidRequest

log = logging.getLogger(__name__)

#: The artifact key (and folder under ``artifacts/``) of the Hugging Face model folder.
MODEL_ARTIFACT = "model"

#: Loaded engines by MLflow logged-model id, so that requests MLflow refuses before ``predict``
#: (bad param types, unknown params) still reach the right inference record sink.
_ENGINES: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


def _record_refusal(message: str) -> None:
    from mlflow.pyfunc.context import get_prediction_context

    ctx = get_prediction_context()
    engine = _ENGINES.get(ctx.model_id) if ctx is not None and ctx.model_id else None
    if engine is None and len(_ENGINES) == 1:
        engine = next(iter(_ENGINES.values()))
    if engine is not None:
        engine.record_refusal(message)


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

    original = getattr(pyfunc_module, "_enforce_params_schema", None)
    if original is None or getattr(original, "_lifecycle_strict", False):
        return
    ours = set(PARAM_SPECS)

    def strict(params: Any, schema: Any) -> Any:
        names = {p.name for p in getattr(schema, "params", [])} if schema is not None else set()
        if names != ours:
            return original(params, schema)
        try:
            if isinstance(params, dict):
                unknown = sorted(str(k) for k in params if str(k) not in names)
                if unknown:
                    raise MlflowException.invalid_parameter_value(
                        f"unknown param {unknown[0]!r}; allowed params: {', '.join(sorted(names))}")
            return original(params, schema)
        except MlflowException as exc:
            _record_refusal(exc.message)
            raise

    strict._lifecycle_strict = True  # type: ignore[attr-defined]
    pyfunc_module._enforce_params_schema = strict


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
        if config.warmup:
            self.engine.warmup()
        log.info("loaded %s on %s (coalesce=%s, max_batch=%d, wait=%.1f ms)", model_dir, self.engine.device,
                 config.coalesce, config.max_batch_size, config.batch_wait_ms)

    # model_input stays unannotated on purpose: MLflow 3 reads predict's type hints to build a
    # schema, and any hint that is not list[...] makes it warn; inputs are validated by the engine.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """Generate text; a DataFrame with text, prompt_tokens, completion_tokens, finish_reason, truncated."""
        from mlflow.exceptions import MlflowException

        try:
            return self.engine.predict(model_input, params)
        except InvalidRequest as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                raise MlflowException(f"accelerator out of memory; retry with fewer or shorter prompts: {exc}",
                                      error_code="RESOURCE_EXHAUSTED") from None
            raise

