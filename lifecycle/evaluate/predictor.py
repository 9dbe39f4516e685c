"""Generation through the project's pyfunc model, so evaluation measures what is served.

A model folder inside a logged pyfunc model (``.../artifacts/model`` next to ``MLmodel``) is
loaded with ``mlflow.pyfunc.load_model`` (signature and params enforcement included); a bare
Hugging Face folder is wrapped in the same :class:`lifecycle.serving.LanguageModel` directly.
Evaluation traffic is not production traffic: inference records are switched off while loading.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

#: Environment variable that turns on inference records in the serving engine.
_RECORDS_ENV = "LIFECYCLE_INFERENCE_LOG"


@contextlib.contextmanager
def _loading_env(device: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (_RECORDS_ENV, "LIFECYCLE_DEVICE")}
    saved_path = list(sys.path)
    os.environ.pop(_RECORDS_ENV, None)
    if device:
        os.environ["LIFECYCLE_DEVICE"] = device
    try:
        yield
    finally:
        # mlflow.pyfunc.load_model prepends the model's code path to sys.path; the package is
        # already imported from this checkout, so the copy is not needed afterwards.
        sys.path[:] = saved_path
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pyfunc_root(model_dir: Path) -> Path | None:
    """The logged pyfunc model folder that holds ``model_dir`` as its model artifact, if any."""
    for cand in (model_dir.parent.parent, model_dir.parent):
        if (cand / "MLmodel").is_file():
            return cand
    return None


class Predictor:
    """``predict(prompts, params) -> DataFrame`` (text, prompt_tokens, completion_tokens, ...)."""

    def __init__(self, model_dir: str | Path, *, device: str | None = None):
        model_dir = Path(model_dir)
        root = pyfunc_root(model_dir)
        self.via = "mlflow.pyfunc.load_model" if root else "lifecycle.serving.LanguageModel"
        with _loading_env(device):
            if root is not None:
                import mlflow.pyfunc

                self._pyfunc = mlflow.pyfunc.load_model(str(root))
                self._python_model = self._pyfunc.unwrap_python_model()
            else:
                import mlflow.pyfunc

                from lifecycle.serving import LanguageModel

                self._pyfunc = None
                self._python_model = LanguageModel()
                ctx = mlflow.pyfunc.PythonModelContext(artifacts={"model": str(model_dir)}, model_config={})
                self._python_model.load_context(ctx)

    @property
    def device(self) -> str:
        """The device the served model runs on."""
        engine = getattr(self._python_model, "engine", None)
        return str(getattr(engine, "device", "unknown"))

    def __call__(self, prompts: list[str], params: Mapping[str, Any]) -> Any:
        """Generate for ``prompts`` with generation ``params``."""
        if self._pyfunc is not None:
            return self._pyfunc.predict(list(prompts), params=dict(params))
        return self._python_model.predict(None, list(prompts), dict(params))

    def sync(self) -> None:
        """Wait for queued accelerator work (so timings include it)."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def close(self) -> None:
        """Close the engine (its coalescer and record sink) and free the weights."""
        engine = getattr(self._python_model, "engine", None)
        if engine is not None and hasattr(engine, "close"):
            engine.close()
        self._python_model = None
        self._pyfunc = None
