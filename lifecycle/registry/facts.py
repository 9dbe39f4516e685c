"""Facts about registered model versions that gates need (read through the REST API)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lifecycle.errors import ConfigError, NotFoundError
from lifecycle.registry import TARGETS
from lifecycle.registry.client import call, error_code, translate

log = logging.getLogger(__name__)

#: Legacy stage mirrored for each alias.
STAGE_OF = {"staging": "Staging", "production": "Production"}


def check_target(target: str) -> str:
    """Validate a target name (``staging`` or ``production``)."""
    t = (target or "").strip().lower()
    if t not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; use one of: {', '.join(TARGETS)}")
    return t


def get_model(client: Any, name: str) -> Any:
    """The registered model, or :class:`NotFoundError` listing what exists."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            from lifecycle.registry.lock import is_lock_model

            try:
                names = sorted(m.name for m in client.search_registered_models(max_results=50) if not is_lock_model(m.name))
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
        return client.get_model_version(name, str(int(version)))
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            get_model(client, name)  # a missing model gets its own message
            versions = call("list versions", client.search_model_versions, f"name='{name}'", max_results=200)
            listing = ", ".join(sorted((str(v.version) for v in versions), key=int)) or "none"
            raise NotFoundError(f"{name} has no version {version} (versions: {listing})") from None
        raise translate(exc, f"read {name} version {version}") from None


def alias_version(model: Any, alias: str) -> str | None:
    """The version ``alias`` names on a registered model entity, or None."""
    aliases = model.aliases or {}
    value = aliases.get(alias)
    return str(value) if value is not None else None


def model_size_bytes(client: Any, name: str, version: str) -> int | None:
    """Sum of the version's artifact sizes (None when they cannot be listed)."""
    import mlflow

    try:
        root = client.get_model_version_download_uri(name, version)
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


def mirror_stage(client: Any, name: str, version: str, target: str, replaced: str | None) -> None:
    """Mirror an alias move onto the deprecated stages so ``models:/NAME/Production`` agrees."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if target == "staging":
            # A legacy stage holds one value where aliases hold two: a version that is in
            # production and also gets @staging keeps its Production stage.
            mv = call("read version", client.get_model_version, name, version)
            if mv.current_stage == "Production":
                return
        call(f"mirror stage of {name} v{version}", client.transition_model_version_stage,
             name, version, STAGE_OF[target], archive_existing_versions=(target == "production"))
        if target == "production" and replaced and replaced != version:
            # archive_existing_versions only archives versions whose *stage* was Production; the
            # alias may have pointed at one whose stage never was (a UI alias move).
            mv = call("read replaced version", client.get_model_version, name, replaced)
            if mv.current_stage != "Archived":
                call(f"archive {name} v{replaced}", client.transition_model_version_stage, name, replaced, "Archived")
