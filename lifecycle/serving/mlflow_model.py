"""Logging the pyfunc model: signature with params, input example, code and pinned requirements.

The logged model is self-contained: it carries the ``lifecycle`` package as ``code_paths`` and an
explicit, pinned requirement list (letting MLflow infer requirements costs ~17 s per log and
guesses), so ``mlflow models serve -m models:/NAME@production`` works from any directory with
the registry alone.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from lifecycle.errors import NotFoundError
from lifecycle.serving.requests import PARAM_SPECS

#: Distributions the model needs at inference time, pinned to what is installed at log time.
RUNTIME_DISTRIBUTIONS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas",
                         "pyyaml", "cloudpickle")

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def pip_requirements() -> list[str]:
    """``name==version`` for each runtime distribution (local build tags such as +cpu dropped).

    Dropping ``+cpu`` lets an environment built from these requirements pick the CUDA wheel of
    the same torch release on a GPU machine.
    """
    reqs = []
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={version.split('+', 1)[0]}")
    return reqs


def signature(*, routing: bool = False) -> Any:
    """Outputs and the generation params schema; no input schema, on purpose.

    ``routing`` adds the canary router's optional ``routing_key`` param (a string).

    MLflow's schema enforcement turns a list of strings into a DataFrame with a column ``0`` and
    then drops every column the input schema does not name, so no single input schema admits
    both ``["a", "b"]`` and ``{"messages": [...]}``. The model validates its inputs itself
    (:func:`lifecycle.serving.requests.parse_inputs`) and refuses bad ones with a 400 that lists
    the accepted shapes.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = Schema([ColSpec("string", "text"), ColSpec("long", "prompt_tokens"),
                      ColSpec("long", "completion_tokens"), ColSpec("string", "finish_reason"),
                      ColSpec("boolean", "truncated")])
    specs = [ParamSpec(name, dtype, default, shape) for name, (dtype, default, shape) in PARAM_SPECS.items()]
    if routing:
        from lifecycle.serving.router import ROUTING_PARAM

        specs.append(ParamSpec(ROUTING_PARAM, "string", None))
    params = ParamSchema(specs)
    return ModelSignature(inputs=None, outputs=outputs, params=params)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage_code(dest: Path) -> Path:
    """A clean copy of the ``lifecycle`` package (no caches) for ``code_paths``."""
    target = dest / "lifecycle"
    shutil.copytree(_PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return target


def log_model(model_dir: str | Path, *, name: str = "model", registered_model_name: str | None = None,
              tags: Mapping[str, str] | None = None, await_registration_for: int = 300,
              model_config: Mapping[str, Any] | None = None, model_id: str | None = None,
              step: int = 0) -> Any:
    """Log ``model_dir`` (a Hugging Face folder) as the project's pyfunc model; the ModelInfo.

    ``model_id`` packages into an existing logged model (a training checkpoint) instead of a new one;
    ``step`` links the run's metrics of that step to the model, as MLflow does.

    Logs into the active run (or a new one, as MLflow does). ``tags`` go on the logged model and,
    when ``registered_model_name`` is given, on the new model version too (lineage tags such as
    ``data_digest`` belong to the version). ``model_config`` holds serving settings
    (:class:`~lifecycle.serving.settings.ServingConfig` keys) that ``SERVING_MODEL_CONFIG`` can
    override at serve time.
    """
    import mlflow
    import mlflow.pyfunc

    from lifecycle.serving.model import MODEL_ARTIFACT, LanguageModel
    from lifecycle.serving.settings import serving_config

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise NotFoundError(f"not a model folder (no config.json): {model_dir}")
    serving_config(model_config or {}, environ={})  # refuse a bad model_config now, not at serve time
    with tempfile.TemporaryDirectory(prefix="lifecycle-code-") as tmp:
        code = _stage_code(Path(tmp))
        # MLflow names the copied folder after the source folder, and the contract (and
        # resolve_model_dir) expects artifacts/model. MLflow refuses symlinks that leave the
        # folder, so stage hard links (no copy of the weights) where the filesystem allows.
        staged = Path(tmp) / MODEL_ARTIFACT
        shutil.copytree(model_dir, staged, copy_function=_link_or_copy)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=LanguageModel(),
            artifacts={MODEL_ARTIFACT: str(staged)},
            code_paths=[str(code)],
            pip_requirements=pip_requirements(),
            signature=signature(),
            input_example=(["Once upon a time"], {"max_new_tokens": 8}),
            model_config=dict(model_config or {}),
            registered_model_name=registered_model_name,
            await_registration_for=await_registration_for,
            tags=dict(tags) if tags else None,
            model_id=model_id,
            step=step,
        )
    if registered_model_name and tags and getattr(info, "registered_model_version", None) is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(registered_model_name, str(info.registered_model_version), key, str(value))
    return info


def save_router_model(path: str | Path, router: Mapping[str, Any], serving: Mapping[str, Any] | None = None) -> Path:
    """Save the canary/shadow routing pyfunc model to the local folder ``path``; the folder.

    It holds no weights: at load time it resolves the registry aliases named in ``router``
    (:class:`~lifecycle.serving.router_model.RouterConfig` keys) and loads both versions, so
    ``mlflow models serve -m PATH`` serves the registry's versions as they are then.
    ``serving`` holds :class:`~lifecycle.serving.settings.ServingConfig` keys for both arms.
    """
    import mlflow.pyfunc

    from lifecycle.serving.router_model import RouterModel, router_config
    from lifecycle.serving.settings import serving_config

    config = {**dict(serving or {}), "router": dict(router)}
    router_config(config)  # refuse a bad config now, not at serve time
    serving_config(dict(serving or {}), environ={})
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="lifecycle-code-") as tmp:
        code = _stage_code(Path(tmp))
        mlflow.pyfunc.save_model(path=str(path), python_model=RouterModel(), code_paths=[str(code)],
                                 pip_requirements=pip_requirements(), signature=signature(routing=True),
                                 model_config=config)
    return path
