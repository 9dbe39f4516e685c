"""Serving: the MLflow pyfunc model that generates text, on a GPU when there is one.

* :func:`log_model` logs a model folder as the project's pyfunc model (code + pinned
  requirements + signature with generation params);
* :class:`LanguageModel` is the ``PythonModel`` (``load_context`` / ``predict``);
* :class:`Engine` is the MLflow-free core: limits, cross-request batching
  (:mod:`~lifecycle.serving.batching`), generation (:mod:`~lifecycle.serving.generate`) and
  inference records (:mod:`~lifecycle.serving.records`).

Names are imported on first use so that importing this package stays cheap and side-effect free.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "log_model": "lifecycle.serving.mlflow_model",
    "signature": "lifecycle.serving.mlflow_model",
    "pip_requirements": "lifecycle.serving.mlflow_model",
    "LanguageModel": "lifecycle.serving.model",
    "Engine": "lifecycle.serving.engine",
    "ServingConfig": "lifecycle.serving.settings",
    "InvalidRequest": "lifecycle.serving.requests",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lifecycle.serving' has no attribute {name!r}")
