"""An advisory file lock that names its holder: the one primitive under every output lock.

``flock`` on a lock file: the kernel drops it when its holder exits, however it exits (kill -9
included), so a dead holder never blocks anyone. The file holds a one-line JSON record of the
holder, which a refused contender quotes. The prepared-data lock (a file next to the output,
unlinked on release) and the checkpoint-folder lock (a file inside the folder, emptied on
release) are both thin users of :class:`HolderLock`.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


def read_record(path: Path) -> dict[str, Any]:
    """The holder record in a lock file ({} when empty, torn or unreadable)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
        record = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class HolderLock:
    """``flock`` on ``path`` with the holder's record in the file.

    :meth:`acquire` returns None when another process holds the lock (the caller raises its own
    error, quoting :func:`read_record`), else the record that a holder which died left behind
    ({} after a clean release).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    @property
    def fd(self) -> int | None:
        """The locked descriptor: a child process that inherits it holds the lock too, until all let go."""
        return self._fd

    @classmethod
    def adopt(cls, path: Path, fd: int) -> "HolderLock":
        """The lock on ``path`` held through ``fd``, a descriptor handed down by the process that took it."""
        lock = cls(path)
        lock._fd = fd
        return lock

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock without waiting: the record left in the file, or None when it is taken."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            # A holder that released with unlink=True removed the file it had locked: only the
            # file at the path counts, so lock again if ours was unlinked under us.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        self._fd = fd
        return read_record(self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Replace the holder record (fsynced: a refused contender reads it)."""
        assert self._fd is not None, "write() needs the lock"
        data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self, *, unlink: bool) -> None:
        """Drop the lock: remove its file (``unlink``) or empty its record (a clean exit)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if unlink:
                self.path.unlink(missing_ok=True)
            else:
                os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
