"""MLflow helpers shared by every stage: runs, lineage tags, asynchronous metrics, URI resolution.

Tracking follows MLflow's own default (``sqlite:///mlflow.db`` in the working directory in
MLflow 3.x) unless ``MLFLOW_TRACKING_URI`` is set; nothing here ever calls
``set_tracking_uri``. With a database URI and no server, MLflow puts artifacts under ``./mlruns``
of whatever directory the process runs in; the CLI keeps MLflow's layout (``mlruns`` beside
``mlflow.db``, as ``mlflow run`` makes it) but pins it to the database's folder, so a command run
from another directory does not scatter artifacts (:func:`use_local_artifact_root`).

MLflow is imported inside the functions that talk to it: the CLI imports this module for every
command (``lifecycle --help`` included) and must answer without paying MLflow's import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from lifecycle.errors import (
    ConfigError,
    DataError,
    LifecycleError,
    NotFoundError,
    PermissionDeniedError,
    TrackingUnavailableError,
)
from lifecycle.secrets import MASK, mask_mapping, mask_secrets  # noqa: F401 - re-exported for callers

log = logging.getLogger(__name__)

#: Tag names shared by all stages (the lineage contract).
TAG_STAGE = "lifecycle.stage"
TAG_CODE_VERSION = "lifecycle.code_version"
TAG_DATA_DIGEST = "data_digest"
TAG_DATA_RUN = "data_run_id"
TAG_TRAIN_RUN = "train_run_id"
TAG_BASE_MODEL = "base_model"

_PACKAGE_ROOT = Path(__file__).resolve().parent

def code_version() -> str:
    """A version string for the code that runs: git commit (+dirty) or a hash of the package.

    The pipeline's step cache keys on it, so it must change whenever the library's code changes,
    also in an installed copy without git (where we hash the package's source files).
    """
    try:
        root = _PACKAGE_ROOT.parent
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--", "lifecycle"],
                capture_output=True, text=True, timeout=5,
            )
            suffix = f"+dirty.{source_digest()[:8]}" if dirty.stdout.strip() else ""
            return sha.stdout.strip()[:12] + suffix
    except (OSError, subprocess.SubprocessError):
        pass
    return "src." + source_digest()[:12]


def source_digest() -> str:
    """SHA-256 over the library's Python sources, in a stable order."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE_ROOT.rglob("*.py")):
        h.update(str(path.relative_to(_PACKAGE_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


#: MLflow's private variable for the artifact root of a database-backed store that has no server.
#: It is what ``mlflow server --default-artifact-root`` sets for its own process; MLflow reads it
#: whenever it builds a sqlite/PostgreSQL store, including the one behind ``MlflowClient``.
_ARTIFACT_ROOT_ENV = "_MLFLOW_SERVER_ARTIFACT_ROOT"
#: MLflow's default artifact folder for a local store (``mlflow.store.tracking.DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH``).
ARTIFACT_DIR = "mlruns"


def local_artifact_root(uri: str | None = None) -> Path | None:
    """Where artifacts of a database-backed store with no server belong: ``mlruns`` beside the sqlite
    file (MLflow's own default folder, so ``lifecycle`` and ``mlflow run`` give one layout whichever
    created the database), or in the working directory for another database (as MLflow does).
    ``None`` for a tracking server (it decides) or a file store.
    """
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        db = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not db or db == ":memory:":
            return Path.cwd() / ARTIFACT_DIR
        return Path(db).expanduser().resolve().parent / ARTIFACT_DIR
    if scheme in ("postgresql", "mysql", "mssql"):
        return Path.cwd() / ARTIFACT_DIR
    return None


def use_local_artifact_root() -> None:
    """Pin artifacts to MLflow's ``mlruns`` beside the database when tracking to one without a server.

    Called once by the CLI before any store is built. Experiments created afterwards (and the
    Default experiment of a database created afterwards) keep their artifacts in
    :func:`local_artifact_root`. A caller's own setting of the variable wins.
    """
    if os.environ.get(_ARTIFACT_ROOT_ENV):
        return
    root = local_artifact_root()
    if root is not None:
        os.environ[_ARTIFACT_ROOT_ENV] = root.as_uri()


def tracking_uri() -> str:
    """The tracking URI in force (MLflow's default unless ``MLFLOW_TRACKING_URI`` is set), credentials masked.

    For messages and pages: a ``user:password@`` in it never reaches a user's screen or a log.
    """
    import mlflow

    return mask_secrets(mlflow.get_tracking_uri())


def translate_mlflow_error(exc: Exception, what: str = "") -> LifecycleError:
    """Map an MLflow/requests exception to the error type a user must tell apart."""
    from mlflow.exceptions import MlflowException

    text = mask_secrets(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
    prefix = f"{what}: " if what else ""
    if isinstance(exc, MlflowException):
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return NotFoundError(prefix + text)
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            return PermissionDeniedError(prefix + text)
        if "Max retries exceeded" in text or "Connection refused" in text or "API request to" in text:
            return TrackingUnavailableError(f"{prefix}cannot reach the tracking server at {tracking_uri()}: {text}")
    if isinstance(exc, (ConnectionError, OSError)) and not isinstance(exc, FileNotFoundError):
        return TrackingUnavailableError(f"{prefix}cannot reach the tracking server at {tracking_uri()}: {text}")
    return LifecycleError(prefix + text)


@contextlib.contextmanager
def stage_run(stage: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
              nested: bool = False, experiment: str | None = None) -> Iterator[Any]:
    """Start (or join) the MLflow run of one stage and tag it with the stage and code version.

    Under ``mlflow run`` the ``MLFLOW_RUN_ID`` environment variable makes ``start_run`` join the
    run that the project created, so the CLI and the MLproject entry point record one run each.
    An error inside the block marks the run FAILED (mlflow does this on exception).
    """
    import mlflow

    experiment_id = None
    if experiment and not os.environ.get("MLFLOW_RUN_ID") and not nested:
        experiment_id = get_or_create_experiment(experiment)
    all_tags = mask_mapping({TAG_STAGE: stage, TAG_CODE_VERSION: code_version(), **(tags or {})})
    active = mlflow.active_run()
    if active is not None and not nested:
        mlflow.set_tags(all_tags)
        yield active
        return
    with mlflow.start_run(run_name=run_name, nested=nested, tags=all_tags, experiment_id=experiment_id) as run:
        yield run


def get_or_create_experiment(name: str) -> str:
    """The id of experiment ``name``, created if needed.

    Not ``mlflow.set_experiment``: it also exports MLFLOW_EXPERIMENT_ID into os.environ and keeps
    a process-wide active experiment, which would leak into every later run and child process of
    a long-lived caller (a notebook, a scheduler, the pipeline).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently by another process: use theirs
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class AsyncMetricLogger:
    """Log metrics from a hot loop without waiting on the tracking server.

    ``log`` only appends to a queue; a background thread sends ``log_batch`` calls of up to 1000
    metrics. When the server is unreachable the thread keeps the metrics and retries with
    backoff, so a short outage loses nothing; ``close`` waits (bounded) for the backlog and raises
    :class:`TrackingUnavailableError` if metrics could not be delivered: never a silent loss.
    """

    def __init__(self, run_id: str, *, flush_interval: float = 1.0, max_wait_on_close: float = 120.0):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient()
        self._run_id = run_id
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._interval = flush_interval
        self._max_wait = max_wait_on_close
        self._pending: list[Any] = []
        self._stop = threading.Event()
        self._failures = 0
        self._last_error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="lifecycle-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], step: int, model_id: str | None = None) -> None:
        """Queue ``metrics`` at ``step`` (also the metrics of logged model ``model_id``); returns immediately."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            self._queue.put(Metric(key, float(value), ts, int(step), model_id=model_id))

    def _drain(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _send(self) -> bool:
        self._drain()
        while self._pending:
            batch = self._pending[:1000]
            try:
                self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
            except Exception as exc:  # noqa: BLE001 - any failure is retried, then surfaced on close
                self._failures += 1
                self._last_error = exc
                log.warning("metric logging failed (%s); will retry, %d metrics kept", exc, len(self._pending))
                return False
            del self._pending[: len(batch)]
            self._failures = 0
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            ok = self._send()
            wait = self._interval if ok else min(30.0, self._interval * 2 ** min(self._failures, 5))
            self._stop.wait(wait)

    @property
    def backlog(self) -> int:
        """Metrics not yet confirmed by the tracking server."""
        return len(self._pending) + self._queue.qsize()

    def close(self) -> None:
        """Flush everything; raise if the server stayed unreachable for ``max_wait_on_close``."""
        self._stop.set()
        self._thread.join()
        deadline = time.monotonic() + self._max_wait
        delay = 0.5
        while not self._send():
            if time.monotonic() > deadline:
                raise TrackingUnavailableError(
                    f"could not deliver {self.backlog} metrics to {tracking_uri()}: {self._last_error}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def __enter__(self) -> "AsyncMetricLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def filter_literal(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter, matching it exactly.

    MLflow's filter parser has no working escape: ``\\'`` inside single quotes matches nothing.
    A value without ``'`` goes in single quotes, one with ``'`` but no ``"`` in double quotes,
    both as they are; a value holding both quote kinds cannot be searched for (ConfigError).
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"{value!r} holds both kinds of quotes, which MLflow's search filters cannot match")


def _describe_registered(client: Any, name: str) -> str:
    """A short listing of what the registry holds, for 'no such model' messages."""
    try:
        # Ask for the model itself: a listing of the first models may not reach it in a big registry.
        model = client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not there (or unreachable): list what is there instead
        model = None
    try:
        if model is not None:
            versions = client.search_model_versions(f"name={filter_literal(name)}", max_results=50)
            listing = ", ".join(sorted((str(v.version) for v in versions), key=int))
            alias_text = ", ".join(f"@{a}->v{v}" for a, v in sorted((model.aliases or {}).items()))
            return f" (versions of {name}: {listing or 'none'}{'; aliases ' + alias_text if alias_text else ''})"
        models = client.search_registered_models(max_results=20)
    except Exception:  # noqa: BLE001 - best effort: the message must still come out
        return ""
    if not models:
        return " (the registry holds no models)"
    more = ", ..." if len(models) == 20 else ""
    return f" (registered models: {', '.join(sorted(m.name for m in models))}{more})"


def resolve_artifact(uri: str | os.PathLike[str], *, what: str = "input") -> Path:
    """Return a local path for a local path, ``runs:/<id>/<path>`` or ``models:/...`` URI.

    Remote URIs are downloaded with MLflow's own resolution (so artifact proxies, S3 and the
    like work as in MLflow). Unknown runs, models and versions give :class:`NotFoundError` naming
    what exists.
    """
    text = os.fspath(uri)
    if "://" not in text and not text.startswith(("runs:/", "models:/")):
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"{what} not found: {path}") if what != "model" else NotFoundError(
                f"model not found: {path} (give a local folder, runs:/<run_id>/<path> or models:/<name>@<alias>)"
            )
        return path
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if text.startswith("models:/"):
        _check_model_uri(MlflowClient(), text)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    except MlflowException as exc:
        err = translate_mlflow_error(exc, f"cannot resolve {text}")
        if isinstance(err, (NotFoundError, TrackingUnavailableError, PermissionDeniedError)):
            raise err from None
        raise NotFoundError(f"cannot resolve {text}: {str(exc).splitlines()[0]}") from None


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` into (name, version, alias)."""
    body = uri[len("models:/"):]
    body = body.split("/", 1)[0] if "@" in body else body
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, None, alias
    name, _, rest = body.partition("/")
    rest = rest.split("/", 1)[0]
    if rest.isdigit():
        return name, rest, None
    # Legacy stage names (Production, Staging) resolve through MLflow itself.
    return name, None, None


def _check_model_uri(client: Any, uri: str) -> None:
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    if name.startswith("m-"):  # MLflow 3 logged-model id, not a registered name
        return
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        elif version:
            client.get_model_version(name, version)
        else:
            client.get_registered_model(name)
    except MlflowException as exc:
        err = translate_mlflow_error(exc)
        if isinstance(err, (TrackingUnavailableError, PermissionDeniedError)):
            raise err from None
        target = f"alias @{alias}" if alias else f"version {version}" if version else "model"
        raise NotFoundError(f"{uri}: no such {target}{_describe_registered(client, name)}") from None


#: Inside a logged pyfunc model, the Hugging Face folder (weights + tokenizer) lives here.
PYFUNC_MODEL_ARTIFACT = "model"


def find_hf_model_dir(path: Path) -> Path:
    """Find the Hugging Face model folder (``config.json``) in a local model path.

    Accepts the folder itself, a logged pyfunc model (``MLmodel`` + ``artifacts/model``), or a
    parent folder holding exactly one of those.
    """
    if (path / "config.json").is_file():
        return path
    candidates = [path / "artifacts" / PYFUNC_MODEL_ARTIFACT, path / PYFUNC_MODEL_ARTIFACT]
    for cand in candidates:
        if (cand / "config.json").is_file():
            return cand
    found = sorted({p.parent for p in path.rglob("config.json") if (p.parent / "model.safetensors").exists()
                    or any(p.parent.glob("*.safetensors")) or any(p.parent.glob("*.bin"))})
    if len(found) == 1:
        return found[0]
    raise NotFoundError(f"no Hugging Face model (config.json + weights) found in {path}")


def resolve_model_dir(uri: str | os.PathLike[str]) -> Path:
    """Local Hugging Face model folder for a path, ``runs:/`` or ``models:/`` URI.

    A plain name that is not a local path (``gpt2``, ``org/model``) is returned unchanged as a
    ``Path`` so that ``from_pretrained`` can fetch it from a hub where the user has one.
    """
    text = os.fspath(uri)
    if text.startswith(("runs:/", "models:/")) or "://" in text:
        return find_hf_model_dir(resolve_artifact(text, what="model"))
    path = Path(text).expanduser()
    if path.exists():
        return find_hf_model_dir(path)
    if text.count("/") <= 1 and not text.startswith((".", "/", "~")):
        return Path(text)  # hub id: resolved by transformers
    raise NotFoundError(f"model not found: {text} "
                        "(give a local folder, runs:/<run_id>/<path> or models:/<name>@<alias>)")


def version_model_id(version: Any) -> str | None:
    """The MLflow 3 logged-model id behind a registered version.

    SQL registries do not store ``model_id`` (MLflow 3.17 returns None for it); the version's
    ``source`` is ``models:/<model_id>`` for every version made from a logged model.
    """
    model_id = getattr(version, "model_id", None)
    if model_id:
        return str(model_id)
    source = str(getattr(version, "source", "") or "")
    rest = source[len("models:/"):] if source.startswith("models:/") else ""
    return rest if rest.startswith("m-") and "/" not in rest else None
