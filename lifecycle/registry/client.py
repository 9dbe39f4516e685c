"""An MLflow client with a short retry budget and errors users can tell apart."""

from __future__ import annotations

import getpass
import os
from typing import Any, Callable, TypeVar

from lifecycle.errors import LifecycleError, NotFoundError, PermissionDeniedError, TrackingUnavailableError

T = TypeVar("T")

#: MLflow retries an unreachable server for minutes by default; a registry command should say
#: "cannot reach ..." within seconds. Users can still raise these through the environment.
_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # Ledger runs are written and finished by the hundred; their UI links are noise on stdout.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def get_client() -> Any:
    """An ``MlflowClient`` for the tracking URI in force, with bounded retries."""
    for key, value in _RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def actor() -> str:
    """Who acts: the tracking user name when credentials are set, else the OS user."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def error_code(exc: BaseException) -> str:
    """MLflow's error code of ``exc`` (``RESOURCE_ALREADY_EXISTS`` ...) or ``""``."""
    return str(getattr(exc, "error_code", "") or "")


def translate(exc: Exception, what: str) -> LifecycleError:
    """Map an MLflow/requests failure to a one-line lifecycle error naming ``what`` failed."""
    from lifecycle.tracking import tracking_uri, translate_mlflow_error

    code = error_code(exc)
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or "status code 401" in text or "status code 403" in text:
        return PermissionDeniedError(f"{what}: permission denied by {tracking_uri()} for user "
                                     f"{actor()!r}: {text}")
    err = translate_mlflow_error(exc, what)
    if isinstance(err, (NotFoundError, PermissionDeniedError, TrackingUnavailableError)):
        return err
    low = text.lower()
    if any(s in low for s in ("max retries exceeded", "connection refused", "failed to establish",
                              "read timed out", "name or service not known", "connectionerror")):
        return TrackingUnavailableError(f"{what}: cannot reach the tracking server at {tracking_uri()}: {text}")
    return err


def call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` and turn MLflow failures into lifecycle errors that name ``what``."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except LifecycleError:
        raise
    except (MlflowException, OSError, ConnectionError) as exc:
        raise translate(exc, what) from None
    except Exception as exc:  # requests' own exceptions do not subclass OSError uniformly
        if type(exc).__module__.startswith(("requests", "urllib3")):
            raise translate(exc, what) from None
        raise
