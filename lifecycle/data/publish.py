"""Publishing a prepared folder: one writer per output, built aside, flushed, swapped in whole.

A prepare holds an exclusive lock on its output for its whole run: ``.<name>.lock`` next to the
output, locked with ``flock`` (the kernel releases it when the holder dies, even by SIGKILL) and
naming the holder, so a second prepare into the same output refuses at once instead of silently
replacing the first one's result. The folder is built in a temporary sibling (``.<name>.tmp-*``),
every file and folder of it is fsynced, and it is then exchanged with the old output in one atomic
``renameat2(RENAME_EXCHANGE)``: at any instant the output is the old complete result or the new
one. Temporaries that a killed run left behind are removed by the next run that takes the lock
(nobody else can be using them then).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from lifecycle.errors import ConcurrencyError, ConfigError, OutputExistsError
from lifecycle.filelock import HolderLock, read_record

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def lock_path(output: Path) -> Path:
    """The lock file of ``output``."""
    return output.with_name(f".{output.name}.lock")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; refuse a file in the way in any case."""
    try:
        exists, is_dir = output.exists(), output.is_dir()
    except OSError as exc:  # e.g. a parent folder this user may not enter
        raise ConfigError(f"cannot use the output {output}: {exc.strerror or exc}") from None
    if exists and not overwrite:
        raise OutputExistsError(f"output {output} already exists; use --overwrite to replace it")
    if exists and not is_dir:
        raise OutputExistsError(f"output {output} exists and is not a folder; remove it first")


class OutputLock:
    """The exclusive right to write ``output``, for one prepare: ``with OutputLock(output): ...``."""

    def __init__(self, output: Path, what: str = "lifecycle prepare"):
        self.output = output
        self.path = lock_path(output)
        self.what = what
        self._lock = HolderLock(self.path)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`ConcurrencyError` naming its holder."""
        try:
            taken = self._lock.acquire() is None
        except OSError as exc:
            raise ConfigError(f"cannot write next to the output {self.output}: {exc.strerror or exc}") from None
        if taken:
            raise ConcurrencyError(f"output {self.output} is being written by {_holder(self.path)} "
                                   f"(lock file {self.path}); wait for it to finish or choose another --output")
        self._lock.write({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def release(self) -> None:
        """Give the lock up and remove its file."""
        self._lock.release(unlink=True)


def _holder(path: Path) -> str:
    """Who holds a lock, as its file says (a holder may not have written it yet)."""
    info = read_record(path)
    try:
        return f"{info['what']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except KeyError:
        return "another process"


def clean_stale(output: Path) -> None:
    """Remove the temporaries of ``output`` that killed runs left (call with the lock held).

    Should a run have died between the two renames of the fallback publish, the old output is
    put back first.
    """
    parent = output.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{output.name}.old-*"))
    if not output.exists() and olds and (olds[-1] / "data_card.json").is_file():
        log.warning("restoring %s from %s (a prepare was interrupted while replacing it)", output, olds[-1])
        os.rename(olds[-1], output)
    for stale in [*parent.glob(f".{output.name}.tmp-*"), *parent.glob(f".{output.name}.old-*")]:
        log.warning("removing %s, left by an interrupted prepare", stale)
        shutil.rmtree(stale, ignore_errors=True)


def temp_folder(output: Path) -> Path:
    """A new empty temporary sibling of ``output`` to build into."""
    path = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:12]}")
    path.mkdir()
    return path


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (``root`` included) to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    """Make the names in a folder durable (a crash right after a rename must not undo it).

    Best effort: some filesystems cannot fsync a folder, and then there is nothing more to do.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(work: Path, output: Path) -> None:
    """Put the finished folder ``work`` in place of ``output``, durably and atomically."""
    fsync_tree(work)
    if output.exists():
        if not _exchange(work, output):
            # No atomic exchange here: move the old one aside first (clean_stale restores it
            # should the run die between the two renames).
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(output, old)
            os.rename(work, output)
            work = old
        fsync_dir(output.parent)
        shutil.rmtree(work, ignore_errors=True)
    else:
        os.rename(work, output)
        fsync_dir(output.parent)
