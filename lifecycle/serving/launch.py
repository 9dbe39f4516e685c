"""Starting ``mlflow models serve`` from wherever ``lifecycle`` runs.

``mlflow models serve`` starts its server as ``bash -c "exec uvicorn ..."``: it finds
``uvicorn`` on PATH, not next to the interpreter. A service manager (systemd, supervisord, cron)
runs ``/opt/venv/bin/lifecycle serve ...`` with PATH=/usr/bin:/bin and no activated virtualenv,
so the server died with exit 127 before loading anything. :func:`serve_env` puts the running
interpreter's own script folders first on PATH; :func:`check_port` refuses a port that is out of
range or already taken before anything starts.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import sysconfig
from typing import Mapping

from lifecycle.errors import AddressUnavailableError, ConfigError


def _script_dirs() -> list[str]:
    """Where this interpreter's console scripts live (the virtualenv's ``bin``), deduplicated."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        dirs.append(sysconfig.get_path("scripts"))
    except KeyError:  # an unusual install scheme without a scripts path
        pass
    out: list[str] = []
    for d in dirs:
        if d and d not in out:
            out.append(d)
    return out


def serve_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) with this interpreter's script folders first on PATH.

    So that ``mlflow models serve`` (which runs ``uvicorn`` by name) finds the ``uvicorn`` of the
    environment lifecycle itself runs in, activated or not. Entries already on PATH keep their
    order after ours; nothing else changes.
    """
    out = dict(os.environ if env is None else env)
    first = _script_dirs()
    rest = [p for p in out.get("PATH", "").split(os.pathsep) if p and p not in first]
    out["PATH"] = os.pathsep.join(first + rest)
    return out


def check_port(host: str, port: int) -> None:
    """Refuse a port outside 1..65535 or a host that does not resolve (ConfigError, exit 2), and a port in use
    or one this user may not bind (AddressUnavailableError, exit 15)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is out of range: give a TCP port between 1 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} does not resolve to an address to bind: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # The server binds with SO_REUSEADDR too: a port left in TIME_WAIT is free for it, a
        # listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressUnavailableError(f"port {port} on {host} is already in use: "
                                              "stop what listens there or pick another --port") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise AddressUnavailableError(f"port {port} on {host} needs privileges this user lacks: pick a port "
                                  "above 1023") from None
            raise AddressUnavailableError(f"cannot bind {host}:{port}: {exc.strerror}") from None
