"""A per-model lock that works through MLflow's REST API alone.

Setting an alias is last-writer-wins with no compare-and-swap, and tags are too, so a lock built
from tags cannot be exclusive. What the REST API does guarantee is the uniqueness of a registered
model's name (a database constraint, on sqlite and PostgreSQL alike): creating the registered
model ``<model>.lifecycle-lock`` succeeds for exactly one caller; deleting it releases the lock.

* Lease: the lock carries ``lock.owner`` (a random token) and ``lock.expires`` (epoch seconds).
  A holder that crashed leaves a lock that others break once it has expired. Breaking is itself
  serialised by a second uniquely named model (``...lifecycle-lock.break``), so two contenders
  cannot both delete-and-recreate.
* Fencing: before each write the holder calls :meth:`RegistryLock.verify`. While at least half
  of the lease is left (by the holder's own monotonic clock, counted from before its create
  request left) no one can have broken the lock, even from a machine whose clock runs up to
  half a lease ahead, so no read is needed; later it re-reads the owner token, and a holder
  whose lease was broken stops with :class:`ConcurrencyError` instead of writing over the new
  holder. The ledger's sequence number is assigned under the lock.
* Ambiguous failures (a timeout whose request did succeed) are resolved by reading the owner
  token back: if it is ours, we hold the lock.
* Stale locks: a lock counts as stale once its lease has expired, at once when its holder was a
  process on this machine that no longer exists (a killed ``lifecycle promote``), and, for a lock
  model without an owner tag (made by hand or by something else), once it is older than
  :data:`OWNERLESS_GRACE_S`. Breaking a stale lock deletes a registered model the caller may not
  own: on a basic-auth server that needs MANAGE on it, and a caller without it gets
  :class:`~lifecycle.errors.PermissionDeniedError` naming the lock and what an admin runs
  (``lifecycle repair NAME --break-lock``, :func:`break_lock`).
* Abandoned locks: a request cut mid-way (the server went away) can leave a lock on the server
  that this process made and no longer holds: a create that did succeed but whose answer was
  lost, or a release that failed. Its holder process is alive, so by the rules above it would
  block everyone for a whole lease; this process remembers such tokens and breaks them at once
  (a long-running guard would otherwise wait out its own lost lock after every outage).
"""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from lifecycle.errors import ConcurrencyError, LifecycleError, PermissionDeniedError
from lifecycle.registry.client import actor, error_code, fault_point, registry, translate

LOCK_SUFFIX = ".lifecycle-lock"
_BREAK_SUFFIX = ".break"
#: An ownerless lock model older than this (by its creation time) is stale. Our own locks get
#: their owner tag in the request that creates them; the margin covers clock skew between hosts.
OWNERLESS_GRACE_S = 120.0
#: Tokens of locks that this process made or held and has let go of without confirming the delete.
_ABANDONED: set[str] = set()


@dataclass
class LockState:
    """What a lock model says about its holder (``exists`` False: the lock is free)."""

    exists: bool
    owner: str | None = None
    expires: float = 0.0
    created_ms: int = 0
    holder: str = ""

    def stale_because(self, now: float | None = None) -> str | None:
        """Why the lock may be broken (its lease expired, its holder is gone, it has no owner), or None."""
        now = time.time() if now is None else now
        if not self.exists:
            return None
        if self.owner is None:
            age = now - self.created_ms / 1000
            return f"it has no owner tag and is {age:.0f} s old" if age > OWNERLESS_GRACE_S else None
        if now > self.expires:
            return f"its lease expired {now - self.expires:.0f} s ago"
        if self.owner in _ABANDONED:
            return "this process let go of it when a request to the server failed"
        host, _, pid = self.holder.rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            return f"its holder (process {pid} on this machine) is gone"
        return None

    def describe(self) -> str:
        """Who holds the lock, for messages."""
        who = f"held by {self.holder}" if self.holder else "no holder recorded"
        if self.owner is None:
            return f"{who}, no owner tag"
        return f"{who}, lease until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.expires))}Z"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_name(model: str) -> str:
    """The registered-model name that represents ``model``'s lock."""
    return f"{model}{LOCK_SUFFIX}"


def is_lock_model(name: str) -> bool:
    """Whether a registered model is one of our locks (hidden from listings)."""
    return name.endswith(LOCK_SUFFIX) or name.endswith(LOCK_SUFFIX + _BREAK_SUFFIX)


class RegistryLock:
    """Context manager holding ``model``'s lock for at most ``lease_s`` seconds per acquisition.

    ``wait_s`` bounds how long :meth:`acquire` waits for another holder before raising
    :class:`ConcurrencyError` (exit code 9).
    """

    def __init__(self, client: Any, model: str, *, lease_s: float = 60.0, wait_s: float | None = None,
                 purpose: str = "") -> None:
        self.client = client
        self.model = model
        self.name = lock_name(model)
        self.lease_s = lease_s
        self.wait_s = float(os.environ.get("LIFECYCLE_LOCK_WAIT_S", "120")) if wait_s is None else wait_s
        self.purpose = purpose
        self.token = uuid.uuid4().hex
        self.held = False
        #: Monotonic time at which our lease runs out (set when we learn that we hold the lock).
        self._deadline = 0.0
        self._sent = (0.0, 0.0)  # (monotonic, wall) clock when our last create request left

    # -- the primitive ---------------------------------------------------------------------------
    def _state(self, name: str) -> LockState:
        """What lock model ``name`` says (``exists`` False when the lock is free)."""
        from mlflow.exceptions import MlflowException

        try:
            rm = registry(self.client).get_registered_model(name)
        except MlflowException as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return LockState(exists=False)
            raise translate(exc, f"read lock {name}") from None
        tags = rm.tags or {}
        try:
            expires = float(tags.get("lock.expires", "0"))
        except ValueError:
            expires = 0.0
        return LockState(exists=True, owner=tags.get("lock.owner") or None, expires=expires,
                         created_ms=int(rm.creation_timestamp or 0), holder=tags.get("lock.holder", ""))

    def _try_create(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        self._sent = (time.monotonic(), time.time())
        tags = {"lock.owner": self.token, "lock.expires": f"{self._sent[1] + self.lease_s:.3f}",
                "lock.holder": f"{socket.gethostname()}:{os.getpid()}", "lock.purpose": self.purpose}
        try:
            fault_point(f"create lock {name}")
            registry(self.client).create_registered_model(
                name, tags=tags,
                description=f"lifecycle lock of {self.model}; safe to delete if lock.expires has passed")
            return True
        except MlflowException as exc:
            code = error_code(exc)
            if code == "RESOURCE_ALREADY_EXISTS":
                return False
            if code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_PARAMETER_VALUE"):
                raise translate(exc, f"take the registry lock of {self.model}") from None
            # sqlite "database is locked", a 5xx or a timeout: the create may or may not have
            # happened; reading the owner back below decides.
            return False

    def _break_if_stale(self, seen: LockState) -> None:
        """Delete the lock ``seen`` if it is stale (serialised by a breaker lock); no-op otherwise."""
        why = seen.stale_because()
        if why is None:
            return
        breaker = self.name + _BREAK_SUFFIX
        b_seen = self._state(breaker)
        try:
            if b_seen.stale_because() is not None:
                self._delete(breaker)  # a breaker that crashed mid-break
            if not self._try_create(breaker):
                return
            try:
                cur = self._state(self.name)
                # Only delete the very lock we judged stale, not one a faster contender made since.
                if cur.owner == seen.owner and cur.created_ms == seen.created_ms and cur.stale_because() is not None:
                    self._delete(self.name)
            finally:
                self._delete(breaker)
        except PermissionDeniedError:
            raise PermissionDeniedError(
                f"the registry lock of {self.model} (registered model {self.name!r}, {seen.describe()}) is stale "
                f"because {why}, but user {actor()!r} may not delete it; an admin runs: "
                f"lifecycle repair {self.model} --break-lock") from None

    def _delete(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            fault_point(f"delete lock {name}")
            registry(self.client).delete_registered_model(name)
        except MlflowException as exc:
            if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise translate(exc, f"release lock {name}") from None

    # -- public ----------------------------------------------------------------------------------
    def state(self) -> LockState:
        """What the lock model says now (one read)."""
        return self._state(self.name)

    def acquire(self) -> "RegistryLock":
        """Wait (bounded by ``wait_s``) until this process holds the lock."""
        try:
            return self._acquire()
        except BaseException:
            # A create (of the lock or of its breaker) may have reached the server before the
            # failure: whatever carries our token now is abandoned, and ours to break next time.
            if self._sent != (0.0, 0.0):
                _ABANDONED.add(self.token)
            raise

    def _acquire(self) -> "RegistryLock":
        deadline = time.monotonic() + self.wait_s
        delay = 0.02
        while True:
            created = self._try_create(self.name)
            seen = LockState(exists=True, owner=self.token) if created else self._state(self.name)
            if seen.owner == self.token:
                self.held = True
                _ABANDONED.discard(self.token)
                # Our own clock wrote lock.expires, so our own clock can count it down.
                self._deadline = (self._sent[0] + self.lease_s if created
                                  else time.monotonic() + (seen.expires - time.time()))
                return self
            if seen.exists:
                self._break_if_stale(seen)
            if time.monotonic() > deadline:
                raise ConcurrencyError(
                    f"could not take the registry lock of {self.model} within {self.wait_s:.0f} s "
                    f"({seen.describe()}; a crashed holder's lock expires after {self.lease_s:.0f} s, "
                    f"then `lifecycle repair {self.model} --break-lock` removes it)")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.6, 0.5)

    def _surely_held(self) -> bool:
        """Whether at least half the lease is left: then no one can have broken the lock."""
        return self.held and time.monotonic() < self._deadline - self.lease_s / 2

    def verify(self) -> None:
        """Fencing: raise :class:`ConcurrencyError` unless we still hold the lock (call before writes).

        Free (no request) during the first half of the lease; a read of the owner token after.
        """
        if self._surely_held():
            return
        if self._state(self.name).owner != self.token:
            self.held = False
            raise ConcurrencyError(f"lost the registry lock of {self.model} (lease expired and was broken); "
                                   "nothing more was written")

    def release(self) -> None:
        """Release the lock if we still hold it (never deletes another holder's lock)."""
        if not self.held:
            return
        surely = self._surely_held()
        self.held = False
        try:
            # Within the first half of the lease no one can have broken the lock: skip the read.
            if surely:
                self._delete(self.name)
                return
            if self._state(self.name).owner == self.token:
                self._delete(self.name)
        except LifecycleError:
            # The lease expires on its own, and this process breaks it sooner (see _ABANDONED);
            # a failed release must not hide the real outcome.
            _ABANDONED.add(self.token)

    def __enter__(self) -> "RegistryLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def break_lock(client: Any, model: str) -> str:
    """Delete ``model``'s lock if it is stale (``lifecycle repair NAME --break-lock``); say what was done.

    Raises :class:`ConcurrencyError` when a live holder has it (breaking it would let two writers
    in) and :class:`PermissionDeniedError` when the caller may not delete the lock model.
    """
    lock = RegistryLock(client, model, wait_s=0)
    seen = lock._state(lock.name)
    if not seen.exists:
        return f"{model} has no registry lock"
    why = seen.stale_because()
    if why is None:
        raise ConcurrencyError(f"the registry lock of {model} ({seen.describe()}) is not stale; "
                               f"wait for its holder or for the lease to run out")
    lock._break_if_stale(seen)
    if lock._state(lock.name).exists:
        raise ConcurrencyError(f"the registry lock of {model} changed hands while breaking it; nothing was deleted")
    return f"broke the registry lock of {model} ({seen.describe()}): {why}"
