"""One trainer per checkpoint folder: an advisory lock with the holder's name on it.

The lock is ``fcntl.flock`` on ``<folder>/.lock``: the kernel drops it when its holder exits,
however it exits (kill -9 included), so a dead holder never blocks the folder. The file also
holds a one-line JSON record of the holder (pid, host, run id, start time) that a refused trainer
quotes. A clean release empties the record; a record found under a free lock was left by a
holder that died, and taking it over says so in a warning.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from pathlib import Path
from typing import Any

from lifecycle.errors import ConcurrencyError
from lifecycle.filelock import HolderLock, read_record

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
__all__ = ["LOCK_FILE", "OutputLock", "read_record"]


def _describe(record: dict[str, Any]) -> str:
    return (f"pid {record.get('pid', '?')} on {record.get('host', '?')}, run {record.get('run_id') or '(starting)'}, "
            f"started {record.get('started', '?')}")


class OutputLock:
    """Exclusive use of one checkpoint folder by one training process (rank 0).

    ``with OutputLock(folder, run_id=...)``: the folder is created when missing, and removed again
    on release when this lock created it and nothing but the lock file was written there (a
    refused or failed start leaves no empty output folder behind).
    """

    def __init__(self, folder: str | Path, *, run_id: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.run_id = run_id
        self._lock = HolderLock(self.path)
        self._created: list[Path] = []  # folders this lock made, deepest first
        self._record: dict[str, Any] = {}

    def acquire(self) -> "OutputLock":
        """Take the lock or raise :class:`ConcurrencyError` naming the live holder."""
        missing, parent = [], self.folder
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing
        left = self._lock.acquire()
        if left is None:
            raise ConcurrencyError(f"{self.folder} is in use by another trainer ({_describe(read_record(self.path))}); "
                                   "wait for it to finish, or train into another --output")
        if left:
            log.warning("taking over the lock of %s from a trainer that is no longer running (%s)",
                        self.folder, _describe(left))
        self._record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        self._lock.write(self._record)
        return self

    def update(self, *, run_id: str) -> None:
        """Name the MLflow run in the record once it exists."""
        self.run_id = run_id
        if self._lock.held:
            self._record["run_id"] = run_id
            self._lock.write(self._record)

    def release(self) -> None:
        """Empty the record (a clean exit), drop the lock, and remove a folder this lock made in vain."""
        if not self._lock.held:
            return
        try:
            in_vain = bool(self._created) and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]
        except OSError as exc:
            log.debug("lock cleanup of %s: %s", self.folder, exc)
            in_vain = False
        # The file is unlinked while still locked, so no contender can be holding a removed file.
        self._lock.release(unlink=in_vain)
        if in_vain:
            for made in self._created:
                try:
                    made.rmdir()
                except OSError:  # not empty (someone wrote there since) or gone: leave it
                    break

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
