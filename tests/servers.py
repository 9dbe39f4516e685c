"""Real processes for the tests: `mlflow server` on loopback with sqlite or PostgreSQL backends.

Each kind of server starts once per test session (it takes ~18 s here); every test then uses its
own experiment or registered-model name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

POSTGRES_DSN = os.environ.get("LIFECYCLE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
#: CI sets this so that PostgreSQL-backed tests run or fail, never skip.


def fernet_key() -> str:
    """A fresh key for ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY`` (urlsafe base64 of 32 random bytes)."""
    import base64

    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200, the process dies, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001 - keep polling
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


@dataclass
class MlflowServer:
    """A running `mlflow server` and how to reach it."""

    url: str
    backend_uri: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        """Terminate the server (and its gunicorn/uvicorn workers)."""
        _stop_group(self.proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session, workers included (they would outlive it)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _spawn(what: str, cmd: list[str], workdir: Path, env: dict[str, str], log_path: Path, health_url: str,
           timeout: float) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, its output in ``log_path``, and wait for ``health_url``;
    on any failure stop the group and raise with the log's tail."""
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health_url, timeout=timeout, proc=proc)
    except Exception:  # noqa: BLE001 - any failure to start: stop the group, then say why
        _stop_group(proc)
        raise RuntimeError(f"{what} did not start; log:\n{log_path.read_text(errors='replace')[-3000:]}") from None
    return proc


def start_mlflow_server(backend_uri: str, workdir: Path, *, app_name: str | None = None,
                        extra_env: dict[str, str] | None = None, port: int | None = None) -> MlflowServer:
    """Start `mlflow server` on a free loopback port, serving artifacts through the server.

    ``port`` restarts a stopped server on the port it had (clients keep their URI).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("_MLFLOW_SERVER_ARTIFACT_ROOT", None)  # the server sets its own from --artifacts-destination
    env.update({
        # Let the server deliver registry webhooks to a receiver on loopback (the UI guard).
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        # The job runner adds ~7 worker processes per server that the tests never use; on two
        # cores under load they slowed startup until the server's workers died.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # Webhook secrets are stored encrypted; without a key each of the server's workers makes
        # its own, and a webhook created through one worker fails to decrypt (no delivery) in the
        # other: a guard that misses about half of the alias moves.
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": env.get("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY") or fernet_key(),
        # Each worker caches "which webhooks listen to this event" for 60 s: a guard installed on
        # a server that already saw alias moves would miss the moves of its first minute.
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        **(extra_env or {}),
    })
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "2"]
    if app_name:
        cmd += ["--app-name", app_name]
    log_path = workdir / "server.log"
    url = f"http://127.0.0.1:{port}"
    proc = _spawn("mlflow server", cmd, workdir, env, log_path, f"{url}/health", 120)
    return MlflowServer(url=url, backend_uri=backend_uri, proc=proc, log_path=log_path, env=env)


def postgres_available() -> str | None:
    """None when PostgreSQL answers at the test DSN, else the reason it does not."""
    try:
        import psycopg2
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[test]')"
    try:
        conn = psycopg2.connect(POSTGRES_DSN, connect_timeout=3)
        conn.close()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL not reachable at {POSTGRES_DSN}: {str(exc).strip().splitlines()[0]}"


def require(flag: str, missing: str | None) -> None:
    """Skip the calling test for ``missing`` (a service or tool that is not here, None: it is);
    fail instead where CI requires it by setting env ``flag`` (LIFECYCLE_REQUIRE_POSTGRES ...)."""
    import pytest

    if not missing:
        return
    if os.environ.get(flag, "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{flag} is set but {missing}")
    pytest.skip(missing)


def require_postgres() -> None:
    """Skip the calling test when PostgreSQL does not answer; fail instead where CI requires it."""
    require("LIFECYCLE_REQUIRE_POSTGRES", postgres_available())


def create_postgres_database() -> str:
    """Create a fresh database for one test session and return its SQLAlchemy URI."""
    import psycopg2

    name = f"lifecycle_test_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(POSTGRES_DSN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    base = POSTGRES_DSN.rsplit("/", 1)[0]
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (v3), which is not installed here.
    return f"{base}/{name}".replace("postgresql://", "postgresql+psycopg2://", 1)


def drop_postgres_database(uri: str) -> None:
    """Drop a database made by :func:`create_postgres_database` (best effort)."""
    import psycopg2

    name = uri.rsplit("/", 1)[1]
    try:
        conn = psycopg2.connect(POSTGRES_DSN)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
    except Exception:  # noqa: BLE001
        pass


ADMIN = ("admin", "admin-pass-1234")


def basic_auth_env(workdir: Path, *, default_permission: str = "READ") -> dict[str, str]:
    """Server environment for ``--app-name basic-auth``: an auth database in ``workdir`` and the
    admin user :data:`ADMIN` (clients pass MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
    ini = workdir / "basic_auth.ini"
    workdir.mkdir(parents=True, exist_ok=True)
    ini.write_text(
        f"[mlflow]\ndefault_permission = {default_permission}\n"
        f"database_uri = sqlite:///{workdir / 'auth.db'}\n"
        f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request otherwise re-hashes the password (PBKDF2): ~1 s per call on a busy machine.
        "auth_cache_ttl_seconds = 60\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "lifecycle-test-key"}


def start_guard(tracking_url: str, workdir: Path, secret: str, *, env: dict[str, str] | None = None,
                policy: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``lifecycle guard serve`` on a free loopback port; return (process, its base URL).

    ``env`` adds to this process's environment (credentials, ...); the guard's log is
    ``workdir/guard.log``.
    """
    port = free_port()
    full_env = {**os.environ, **(env or {}), "MLFLOW_TRACKING_URI": tracking_url, "LIFECYCLE_GUARD_SECRET": secret}
    cmd = [sys.executable, "-m", "lifecycle", "-v", "guard", "serve", "--port", str(port)]
    if policy:
        cmd += ["--policy", policy]
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    proc = _spawn("the guard", cmd, workdir, full_env, workdir / "guard.log", f"{url}/health", 90)
    return proc, url


#: PATH of a service manager (systemd's default is close): no virtualenv, no pyenv shims.
BARE_PATH = "/usr/bin:/bin"


def lifecycle_script() -> Path:
    """The installed ``lifecycle`` console script of this interpreter (absolute path)."""
    import sysconfig

    script = Path(sysconfig.get_path("scripts")) / "lifecycle"
    if not script.is_file():
        raise RuntimeError(f"the lifecycle console script is not installed at {script} (pip install -e .)")
    return script


def start_lifecycle_serve(name: str, workdir: Path, args: list[str] | None = None, *,
                          env: dict[str, str] | None = None, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """Start ``lifecycle serve NAME`` the way a service manager does: the console script by its
    absolute path, PATH=/usr/bin:/bin (the virtualenv's ``bin``, where ``uvicorn`` lives, is not on
    it). Returns (process, base URL); the server's output is ``workdir/serve.log``."""
    port = free_port()
    full_env = {**os.environ, **(env or {}), "PATH": BARE_PATH}
    cmd = [str(lifecycle_script()), "serve", name, "--port", str(port), *(args or [])]
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    proc = _spawn("lifecycle serve", cmd, workdir, full_env, workdir / "serve.log", f"{url}/ping", timeout)
    return proc, url


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a process started by this module (its whole session)."""
    _stop_group(proc)
