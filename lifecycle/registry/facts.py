"""Facts about registered model versions that gates need (read through the REST API)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lifecycle.errors import ConfigError, NotFoundError
from lifecycle.registry import TARGETS
from lifecycle.registry.client import call, error_code, fault_point, filter_literal, registry, translate
from lifecycle.registry.text import preview

log = logging.getLogger(__name__)

#: Legacy stage mirrored for each alias.
STAGE_OF = {"staging": "Staging", "production": "Production"}
#: The tag MLflow puts on registered prompts (``mlflow.prompt.constants.IS_PROMPT_TAG_KEY``).
PROMPT_TAG = "mlflow.prompt.is_prompt"


def check_target(target: str) -> str:
    """Validate a target name (``staging`` or ``production``)."""
    t = (target or "").strip().lower()
    if t not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; use one of: {', '.join(TARGETS)}")
    return t


def check_name(name: str) -> str:
    """Refuse a model name MLflow could never hold (:class:`ConfigError`, exit 2) before any request."""
    import posixpath

    if not isinstance(name, str) or not name.strip():
        raise ConfigError("the model name is empty")
    if "/" in name or ":" in name:
        raise ConfigError(f"model name {name!r} cannot contain '/' or ':'")
    norm = posixpath.normpath(name)
    if norm != name or norm in (".", "..") or norm.startswith(".."):
        raise ConfigError(f"{name!r} is not a valid model name")
    if "'" in name and '"' in name:
        raise ConfigError(f"model name {name!r} holds both ' and \", which MLflow's search cannot match; rename it")
    if len(name) > 200:
        raise ConfigError(f"model name is {len(name)} characters; at most 200 are supported")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("the model name is not valid UTF-8 text") from None
    return name


def get_model(client: Any, name: str) -> Any:
    """The registered model, or :class:`NotFoundError` listing what exists."""
    from mlflow.exceptions import MlflowException

    try:
        model = registry(client).get_registered_model(name)
        if PROMPT_TAG in (model.tags or {}):
            # MLflow keeps prompts in the registry too; they are not models (MLflow's own check).
            raise MlflowException(f"{name} is a prompt", error_code="RESOURCE_DOES_NOT_EXIST")
        return model
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            from lifecycle.registry.lock import is_lock_model

            try:
                found = client.search_registered_models(max_results=50)
                names = sorted(m.name for m in found if not is_lock_model(m.name))
            except MlflowException:
                names = []
            listing = f" (registered models: {', '.join(names)})" if names else " (the registry holds no models)"
            raise NotFoundError(f"no registered model named {name!r}{listing}") from None
        raise translate(exc, f"read registered model {name!r}") from None


def get_version(client: Any, name: str, version: str) -> Any:
    """A model version, or :class:`NotFoundError` listing the model's versions."""
    from mlflow.exceptions import MlflowException

    if not str(version).strip().isdigit():
        raise ConfigError(f"version must be a number, got {version!r}")
    try:
        return registry(client).get_model_version(name, str(int(version)))
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            get_model(client, name)  # a missing model gets its own message
            raise missing_version(name, version, list_versions(client, name)) from None
        raise translate(exc, f"read {name} version {version}") from None


def list_versions(client: Any, name: str) -> list[Any]:
    """Every version of ``name`` (tags and stages included) in one request, oldest first."""
    versions = call("list versions", registry(client).search_model_versions, f"name={filter_literal(name)}",
                    max_results=1000)
    return sorted(versions, key=lambda v: int(v.version))


def missing_version(name: str, version: str, versions: list[Any]) -> NotFoundError:
    """The error for a version that ``versions`` (the model's list) does not hold."""
    listing = ", ".join(str(v.version) for v in versions) or "none"
    return NotFoundError(f"{name} has no version {version} (versions: {listing})")


def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    """The version ``alias`` names (tags and stage included), or None when the alias is unset."""
    from mlflow.exceptions import MlflowException

    try:
        return registry(client).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # The server answers an unset alias with INVALID_PARAMETER_VALUE "... alias ... not found".
        code, text = error_code(exc), str(exc).lower()
        if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in text):
            return None
        raise translate(exc, f"read {name}@{alias}") from None


def mark(client: Any, name: str, text: str) -> None:
    """Tag the registered model with what is being done to it (``lifecycle.last_action``).

    A write the user may not make fails here, before anything else is written (basic-auth
    needs EDIT on the model): the tag doubles as the permission check of promote/rollback.
    """

    fault_point("mark the model")
    call(f"update registered model {name}", registry(client).set_registered_model_tag, name,
         "lifecycle.last_action", preview(text, 5000))


def alias_version(model: Any, alias: str) -> str | None:
    """The version ``alias`` names on a registered model entity, or None."""
    aliases = model.aliases or {}
    value = aliases.get(alias)
    return str(value) if value is not None else None


def model_size_bytes(client: Any, name: str, version: str) -> int | None:
    """Sum of the version's artifact sizes (None when they cannot be listed)."""
    import mlflow

    try:
        root = registry(client).get_model_version_download_uri(name, version)
    except Exception as exc:  # noqa: BLE001 - size is a gate fact; the gate reports "unknown"
        log.warning("cannot locate artifacts of %s v%s: %s", name, version, exc)
        return None
    total = 0
    pending = [""]
    try:
        while pending:
            sub = pending.pop()
            uri = f"{root.rstrip('/')}/{sub}" if sub else root
            for info in mlflow.artifacts.list_artifacts(artifact_uri=uri):
                rel = info.path.rsplit("/", 1)[-1]
                if info.is_dir:
                    pending.append(f"{sub}/{rel}" if sub else rel)
                else:
                    total += int(info.file_size or 0)
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot list artifacts of %s v%s: %s", name, version, exc)
        return None
    return total


def has_signature(name: str, version: str) -> bool | None:
    """Whether the version's MLmodel declares a signature (None when MLmodel is unreadable)."""
    from mlflow.models import get_model_info

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = get_model_info(f"models:/{name}/{version}")
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot read MLmodel of %s v%s: %s", name, version, exc)
        return None
    return info.signature is not None


def transition(client: Any, name: str, version: str, stage: str, *, archive: bool = False) -> None:
    """Set the legacy stage of a version (deprecated by MLflow, mirrored for the old UI and URIs)."""
    fault_point(f"mirror stage of v{version}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(f"mirror stage of {name} v{version}", registry(client).transition_model_version_stage, name, version,
             stage, archive_existing_versions=archive)


def mirror_jobs(client: Any, name: str, version: str, target: str, replaced: str | None, *,
                version_stage: str | None = None, replaced_stage: str | None = None) -> list[Any]:
    """The stage writes that mirror an alias move, as jobs for :func:`client.parallel`.

    ``version_stage`` / ``replaced_stage`` are the stages read under the lock (None: the job reads
    it first). The jobs touch different versions, so they run together, and together with the
    alias write: a replaced version that was in Production is archived by the new version's
    transition, and reads as Production or Archived to a job that checks it meanwhile, either
    of which leaves it to that transition.
    """
    reg = registry(client)

    def stage_of(v: str) -> str:
        return call(f"read {name} v{v}", reg.get_model_version, name, v).current_stage

    if target == "staging":
        def to_staging() -> None:
            # A legacy stage holds one value where aliases hold two: a version that is in
            # production and also gets @staging keeps its Production stage.
            if (version_stage or stage_of(version)) != "Production":
                transition(client, name, version, "Staging")
        return [to_staging]
    jobs = [lambda: transition(client, name, version, "Production", archive=True)]
    if replaced and replaced != version:
        def archive_replaced() -> None:
            # archive_existing_versions only archives versions whose *stage* was Production; the
            # alias may have pointed at one whose stage never was (a UI alias move).
            if (replaced_stage or stage_of(replaced)) not in ("Production", "Archived"):
                transition(client, name, replaced, "Archived")
        jobs.append(archive_replaced)
    return jobs


def mirror_stage(client: Any, name: str, version: str, target: str, replaced: str | None, *,
                 version_stage: str | None = None, replaced_stage: str | None = None) -> None:
    """Mirror an alias move onto the deprecated stages so ``models:/NAME/Production`` agrees."""
    from lifecycle.registry.client import parallel

    parallel(client, *mirror_jobs(client, name, version, target, replaced, version_stage=version_stage,
                                  replaced_stage=replaced_stage))
