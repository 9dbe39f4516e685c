"""One error type per failure a user must tell apart.

Library code raises these; only :mod:`lifecycle.cli` turns them into one-line messages and exit
codes. Exit codes are part of the public contract (schedulers and CI scripts branch on them), so
they never change once released:

====  ==========================================================
code  meaning
====  ==========================================================
1     unexpected crash (a bug: a traceback is printed)
2     bad usage or configuration (unknown key, bad value, bad flag)
3     a promotion gate refused the change (not a crash)
4     bad input data (missing file, bad encoding, empty corpus ...)
5     something named does not exist (model, version, run, alias)
6     the output already exists (use --overwrite)
7     the tracking server cannot be reached
8     permission denied by the tracking server
9     a concurrent change held the lock or won the race
10    monitor verdict ``warn``            (used by ``lifecycle monitor``);
      canary verdict "not enough evidence yet" (``lifecycle canary``)
11    monitor verdict ``retrain``         (used by ``lifecycle monitor``);
      canary verdict "the challenger is worse: roll back" (``lifecycle canary``)
12    training diverged (loss became NaN/inf)
13    out of memory on the accelerator
14    the operating system refused a file operation: an output folder cannot be written
      (permission, read-only or full disk, a parent that is a file), an input cannot be read
15    a network address cannot be used (port in use, out of range, address not available)
====  ==========================================================
"""

from __future__ import annotations

import errno


class LifecycleError(Exception):
    """Base class of every error the CLI reports as a one-line message."""

    exit_code = 1


class ConfigError(LifecycleError):
    """A configuration file, ``--set`` override or flag is invalid."""

    exit_code = 2


class GateRejected(LifecycleError):
    """A promotion policy refused the requested change; the registry is unchanged."""

    exit_code = 3


class DataError(LifecycleError):
    """Input data is missing, unreadable, malformed or empty."""

    exit_code = 4


class NotFoundError(LifecycleError):
    """A named model, version, run, alias or artifact does not exist."""

    exit_code = 5


class OutputExistsError(LifecycleError):
    """The output location exists and ``--overwrite`` was not given."""

    exit_code = 6


class TrackingUnavailableError(LifecycleError):
    """The MLflow tracking server could not be reached after bounded retries."""

    exit_code = 7


class PermissionDeniedError(LifecycleError):
    """The tracking server refused the operation for these credentials."""

    exit_code = 8


class ConcurrencyError(LifecycleError):
    """Another process holds the lock, or changed the state we meant to change."""

    exit_code = 9


class TrainingDivergedError(LifecycleError):
    """The training loss became NaN or infinite."""

    exit_code = 12


class AcceleratorOutOfMemoryError(LifecycleError):
    """The accelerator ran out of memory."""

    exit_code = 13


class FileSystemError(LifecycleError):
    """The operating system refused to read or write a file or folder (permission, disk full ...)."""

    exit_code = 14


class AddressUnavailableError(LifecycleError):
    """A network address cannot be bound or used: port in use, out of range, address not available."""

    exit_code = 15


#: errno values that mean "this address or port cannot be used".
_ADDRESS_ERRNOS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL}
#: errno values that mean "nothing can be written here".
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def from_os_error(exc: OSError, what: str = "", *, writing: bool = False) -> LifecycleError:
    """The one-line error a user sees for an operating-system error ``exc`` (``what``: the doing).

    A missing input is bad input data (4), a port that cannot be bound is 15, and every other
    refusal by the operating system (permission, full or read-only disk, a path under a file, a
    folder missing where something is ``writing``) is 14.
    """
    prefix = f"{what}: " if what else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    where = f" ({' -> '.join(names)})" if names else ""
    text = " ".join(f"{prefix}{reason}{where}".split())  # one line, whatever the OS put in it
    if exc.errno in _ADDRESS_ERRNOS:
        return AddressUnavailableError(text)
    if isinstance(exc, FileNotFoundError) and not writing:
        return DataError(text)
    return FileSystemError(text)
