"""The routing model's temporary folder: one per server, removed when the server stops, swept when stale.

``lifecycle serve NAME --canary/--shadow ALIAS`` saves the routing pyfunc model (no weights: the
MLmodel and the ``lifecycle`` code) to a fresh folder under the temporary directory and serves it
with ``mlflow models serve``. Nothing of ours ran after that server stopped, so every start left a
folder behind. Now:

* :func:`claim` makes the folder (``lifecycle-router-*``) with an ``owner.lock`` file that stays
  locked while its server runs (the project's one lock primitive,
  :class:`~lifecycle.filelock.HolderLock`: the kernel drops it when the last holder exits, kill -9
  included). A sweeper that locks a fresh folder's file first wins it: the claim then starts over
  in another folder.
* :func:`run` (``python -m lifecycle.serving.router_folder FOLDER FD -- COMMAND...``, what
  ``lifecycle serve`` becomes) starts the server as its child, which inherits the lock, forwards
  SIGINT, SIGTERM and SIGHUP to it, removes the folder once it exited and exits as it did (its
  code, or the same signal). On Linux it is also the "subreaper" of the server's processes, so the
  folder goes only after the last of them (``uvicorn`` still finishing its requests, its workers)
  is gone: they import ``lifecycle`` from that folder. And the child gets SIGTERM when this
  supervisor dies (``PR_SET_PDEATHSIG``), so even a SIGKILL leaves only a folder nobody locks.
* :func:`sweep` removes such stale folders (this user's, whose lock nobody holds) before a new
  server claims its own; a locked folder is in use and stays. A folder without a lock file (left
  by an older lifecycle, or by a crash between making the folder and locking it) is not judged:
  every start claims a fresh folder, so no leftover can break it.

Only the standard library (and the lock) is imported: the supervisor waits as a small process
beside the server.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lifecycle.filelock import HolderLock

PREFIX = "lifecycle-router-"
LOCK = "owner.lock"
#: Signals a supervisor passes on to the server (what a terminal, a service manager or a test sends).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_CLAIM_TRIES = 8
#: Longest wait for the server's last processes once the child exited (they were sent SIGTERM too).
DESCENDANTS_WAIT_S = 60.0


@dataclass(frozen=True)
class Claim:
    """A routing model's folder and the lock that says it is in use."""

    folder: Path
    lock: HolderLock

    @property
    def fd(self) -> int:
        """The locked descriptor, to hand down to the supervisor and the server."""
        assert self.lock.fd is not None, "the claim was released"
        return self.lock.fd

    def release(self) -> None:
        """Remove the folder, then drop the lock (so no sweeper judges a half-removed folder stale)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.lock.release(unlink=True)


def _root(root: str | os.PathLike[str] | None) -> Path:
    return Path(root) if root is not None else Path(tempfile.gettempdir())


def claim(root: str | os.PathLike[str] | None = None) -> Claim:
    """A fresh ``lifecycle-router-*`` folder under ``root`` (default: the temporary directory), locked."""
    for _ in range(_CLAIM_TRIES):
        folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=_root(root)))
        lock = HolderLock(folder / LOCK)
        try:
            taken = lock.acquire() is not None
        except FileNotFoundError:  # a sweeper removed the fresh folder first
            taken = False
        if taken:
            lock.write({"pid": os.getpid(), "what": "routing model of lifecycle serve --canary/--shadow"})
            return Claim(folder, lock)
        shutil.rmtree(folder, ignore_errors=True)  # a sweeper holds it: it is removing it
    raise OSError(f"could not claim a routing model folder under {_root(root)} in {_CLAIM_TRIES} tries")


def sweep(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove this user's ``lifecycle-router-*`` folders under ``root`` whose lock nobody holds; the removed.

    Never raises: a folder it cannot judge (another user's, no lock file, unreadable) is left alone.
    """
    removed: list[Path] = []
    try:
        folders = sorted(_root(root).glob(f"{PREFIX}*"))
    except OSError:
        return removed
    for folder in folders:
        lock = HolderLock(folder / LOCK)
        try:
            if (folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid()
                    or not lock.path.is_file()):
                continue
            if lock.acquire() is None:
                continue  # held: a live server's folder
        except OSError:
            continue
        Claim(folder, lock).release()
        removed.append(folder)
    return removed


def _prctl(option: int, value: int) -> bool:
    """Linux's prctl(2); False where there is none."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent(parent: int) -> None:
    """In the child before it runs the server: SIGTERM when the supervisor dies (Linux; a no-op elsewhere)."""
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before the line above took effect


def _reap_descendants(timeout: float) -> None:
    """Wait (as their subreaper) until the server's orphaned processes are gone, at most ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:
            time.sleep(0.05)


def run(folder: str | os.PathLike[str], fd: int, command: Sequence[str]) -> int:
    """Run ``command`` holding the lock ``fd`` of ``folder``, forwarding signals; remove the folder after it.

    Returns the child's return code (negative: the signal that ended it).
    """
    child: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not child:
            pending.append(signum)  # arrived while the child was being started
            return
        try:
            child[0].send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    reaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    try:
        child.append(subprocess.Popen(list(command), pass_fds=(fd,),
                                      preexec_fn=functools.partial(_die_with_parent, os.getpid())))
        for signum in pending:
            child[0].send_signal(signum)
        code = child[0].wait()
        if reaper:
            _reap_descendants(DESCENDANTS_WAIT_S)
        return code
    finally:
        Claim(Path(folder), HolderLock.adopt(Path(folder) / LOCK, fd)).release()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lifecycle.serving.router_folder FOLDER FD -- COMMAND...``: :func:`run`, exit as the child did."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[2] != "--" or not args[1].isdigit():
        raise SystemExit("usage: python -m lifecycle.serving.router_folder FOLDER FD -- COMMAND...")
    code = run(args[0], int(args[1]), args[3:])
    if code < 0:
        # Ended by a signal: end the same way, so whoever waits on us sees what the server saw.
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    sys.exit(code)


if __name__ == "__main__":
    main()
