"""Evaluation results on the registered model version: ``eval/...`` and ``compare/...`` tags.

Policies read these tags from the version itself (not from whichever run is newest). Tags are
written last, after every metric has been computed and logged, so a failed evaluation leaves the
version untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from lifecycle.errors import NotFoundError

TAG_EVAL_RUN = "eval_run_id"
TAG_EVAL_DIGEST = "eval_data_digest"
TAG_COMPARE_BASELINE = "compare_baseline"


@dataclass(frozen=True)
class VersionRef:
    """A registered model version (the alias it was named by, if any, and its MLflow 3 logged model)."""

    name: str
    version: str
    alias: str | None = None
    model_id: str | None = None

    @property
    def uri(self) -> str:
        """``models:/NAME/VERSION``."""
        return f"models:/{self.name}/{self.version}"


def registered_version(uri: str | os.PathLike[str]) -> VersionRef | None:
    """The version a ``models:/NAME/VERSION``, ``@alias`` or legacy-stage URI names (None for
    paths, ``runs:/`` URIs and MLflow 3 logged-model ids ``models:/m-...``)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lifecycle.tracking import parse_model_uri, translate_mlflow_error, version_model_id

    text = os.fspath(uri)
    if not text.startswith("models:/"):
        return None
    name, version, alias = parse_model_uri(text)
    if name.startswith("m-"):
        return None
    client = MlflowClient()
    try:
        if version:
            mv = client.get_model_version(name, version)
            return VersionRef(name, str(mv.version), model_id=version_model_id(mv))
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
            return VersionRef(name, str(mv.version), alias, version_model_id(mv))
        stage = text[len("models:/"):].split("/", 2)[1] if text.count("/") >= 2 else ""
        latest = client.get_latest_versions(name, stages=[stage] if stage else None)
    except MlflowException as exc:
        raise translate_mlflow_error(exc, f"cannot resolve {text}") from None
    if not latest:
        raise NotFoundError(f"{text}: no version in that stage")
    mv = max(latest, key=lambda v: int(v.version))
    return VersionRef(name, str(mv.version), model_id=version_model_id(mv))


def logged_model_id(uri: str | os.PathLike[str], version: VersionRef | None) -> str | None:
    """The logged-model id of what ``uri`` names: ``models:/m-...`` itself, else the resolved
    ``version``'s (None for paths, ``runs:/`` URIs and versions registered before MLflow 3)."""
    text = os.fspath(uri)
    if text.startswith("models:/m-"):
        return text[len("models:/"):].split("/", 1)[0]
    return version.model_id if version else None


def production_version(name: str) -> VersionRef | None:
    """The version behind ``models:/NAME@production``, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        mv = MlflowClient().get_model_version_by_alias(name, "production")
    except MlflowException:
        return None
    return VersionRef(name, str(mv.version), "production")


def format_value(value: float) -> str:
    """A tag value policies parse back with ``float()`` without losing precision."""
    return repr(float(value))


def version_tags(metrics: Mapping[str, float], *, run_id: str, data_digest: str,
                 compare: Mapping[str, float] | None = None, baseline: str | None = None,
                 extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags for a version: ``eval/<m>`` (and ``compare/<m>``), run id, digest, baseline."""
    tags = {f"eval/{k}": format_value(v) for k, v in metrics.items()}
    tags[TAG_EVAL_RUN] = run_id
    tags[TAG_EVAL_DIGEST] = data_digest
    if compare:
        tags.update({f"compare/{k}": format_value(v) for k, v in compare.items()})
        if baseline:
            tags[TAG_COMPARE_BASELINE] = baseline
    tags.update(extra or {})
    return tags


def write_version_tags(ref: VersionRef, tags: Mapping[str, str]) -> None:
    """Set every tag on the version (one call each: the registry has no batch tag call).

    ``eval/``/``compare/`` tags of an earlier evaluation that this one did not produce are
    removed, so a policy never reads a comparison or metric from a different run.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lifecycle.tracking import translate_mlflow_error

    client = MlflowClient()
    try:
        current = client.get_model_version(ref.name, ref.version).tags or {}
        stale = [k for k in current if k not in tags
                 and (k.startswith(("eval/", "compare/", "eval_", "compare_")))]
        for key in stale:
            client.delete_model_version_tag(ref.name, ref.version, key)
        for key, value in tags.items():
            client.set_model_version_tag(ref.name, ref.version, key, value)
    except MlflowException as exc:
        raise translate_mlflow_error(exc, f"cannot tag {ref.uri}") from None
