"""An MLflow client with a short retry budget and errors users can tell apart."""

from __future__ import annotations

import getpass
import itertools
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from lifecycle.errors import LifecycleError, NotFoundError, PermissionDeniedError, TrackingUnavailableError
from lifecycle.tracking import filter_literal  # noqa: F401 - the registry's modules import it from here

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


#: Test hook (inert unless set): ``LIFECYCLE_FAULT_KILL_AT=N`` kills this process with SIGKILL right
#: before its N-th registry or ledger write, so tests can prove that a kill at any point of a
#: promote or rollback leaves a state that ``lifecycle status`` names and ``lifecycle repair`` settles.
FAULT_ENV = "LIFECYCLE_FAULT_KILL_AT"
_WRITES = itertools.count(1)
_WRITES_LOCK = threading.Lock()


def fault_point(what: str) -> None:
    """Mark the place right before a write (see :data:`FAULT_ENV`); does nothing unless the hook is set."""
    target = os.environ.get(FAULT_ENV)
    if not target:
        return
    with _WRITES_LOCK:
        n = next(_WRITES)
    if str(n) == target.strip():
        os.write(2, f"{FAULT_ENV}: killed before write {n} ({what})\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def get_client() -> Any:
    """An ``MlflowClient`` for the tracking URI in force, with bounded retries."""
    for key, value in _RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    registry(client)  # built once here, not raced for by the first parallel round
    return client


def registry(client: Any) -> Any:
    """The registry client under ``client``: the same REST calls without MLflow's extra read.

    ``MlflowClient`` reads the registered model before each registry write (and some reads) to
    refuse prompts; that doubles the round trips of a promotion. We check the prompt tag once,
    on the model read under the lock (:func:`lifecycle.registry.facts.get_model`), and talk to
    the registry client directly. Any other client (a test double, a future MLflow without the
    private accessor) is used as it is.
    """
    get = getattr(client, "_get_registry_client", None)
    return get() if callable(get) else client


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


_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's thread pool. A forked child (the CLI forked by a test or a benchmark) inherits
    the parent's pool object but none of its threads: it would queue jobs forever, so each
    process makes its own (and its own lock, which a parent thread may have held at the fork)."""
    global _POOL, _POOL_PID, _POOL_LOCK
    if _POOL_PID != os.getpid():
        _POOL_LOCK = threading.Lock()
        _POOL, _POOL_PID = None, os.getpid()
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lifecycle-registry")
        return _POOL


def remote(client: Any) -> bool:
    """Whether ``client`` talks to a tracking server (each call a round trip) rather than a file."""
    return str(getattr(client, "tracking_uri", "")).startswith(("http://", "https://"))


def parallel(client: Any, *jobs: Callable[[], Any]) -> list[Any]:
    """Run independent calls to ``client``'s server at once; their results in order.

    Each call to a tracking server is a round trip of ~50 ms here, mostly waiting: calls that do
    not depend on each other overlap instead of queueing. Every job finishes before this returns
    (nothing keeps writing behind the caller's back); then the first failure *in argument order*
    is raised, so the caller decides which error wins (a missing version before a refused write).
    A local store (sqlite file) has no round trip to hide and would only contend for its file
    lock: there the jobs run one after another. Jobs must not call :func:`parallel` themselves
    (the pool is shared and bounded).
    """
    if len(jobs) <= 1 or not remote(client):
        return [job() for job in jobs]
    futures: list[Future] = [_pool().submit(job) for job in jobs]
    errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
    return [f.result() for f in futures]
