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
"""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from typing import Any

from lifecycle.errors import ConcurrencyError, LifecycleError
from lifecycle.registry.client import error_code, registry, translate

LOCK_SUFFIX = ".lifecycle-lock"
_BREAK_SUFFIX = ".break"


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
    def _owner(self, name: str) -> tuple[str | None, float, int]:
        """(owner token, lease expiry, creation ms) of lock ``name``; (None, 0, 0) if free."""
        from mlflow.exceptions import MlflowException

        try:
            rm = registry(self.client).get_registered_model(name)
        except MlflowException as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None, 0.0, 0
            raise translate(exc, f"read lock {name}") from None
        tags = rm.tags or {}
        try:
            expires = float(tags.get("lock.expires", "0"))
        except ValueError:
            expires = 0.0
        return tags.get("lock.owner"), expires, int(rm.creation_timestamp or 0)

    def _try_create(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        self._sent = (time.monotonic(), time.time())
        tags = {"lock.owner": self.token, "lock.expires": f"{self._sent[1] + self.lease_s:.3f}",
                "lock.holder": f"{socket.gethostname()}:{os.getpid()}", "lock.purpose": self.purpose}
        try:
            registry(self.client).create_registered_model(
                name, tags=tags, description=f"lifecycle lock of {self.model}; safe to delete if lock.expires has passed")
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

    def _break_if_stale(self, owner: str, expires: float) -> None:
        if time.time() <= expires:
            return
        breaker = self.name + _BREAK_SUFFIX
        b_owner, b_expires, b_created = self._owner(breaker)
        if b_owner is not None and time.time() > b_expires:
            self._delete(breaker)  # a breaker that crashed mid-break
        if not self._try_create(breaker):
            return
        try:
            cur_owner, cur_expires, _ = self._owner(self.name)
            # Only delete the very lock we judged stale, not one a faster contender made since.
            if cur_owner == owner and time.time() > cur_expires:
                self._delete(self.name)
        finally:
            self._delete(breaker)

    def _delete(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            registry(self.client).delete_registered_model(name)
        except MlflowException as exc:
            if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise translate(exc, f"release lock {name}") from None

    # -- public ----------------------------------------------------------------------------------
    def acquire(self) -> "RegistryLock":
        """Wait (bounded by ``wait_s``) until this process holds the lock."""
        deadline = time.monotonic() + self.wait_s
        delay = 0.02
        while True:
            created = self._try_create(self.name)
            owner, expires, _ = (self.token, 0.0, 0) if created else self._owner(self.name)
            if owner == self.token:
                self.held = True
                # Our own clock wrote lock.expires, so our own clock can count it down.
                self._deadline = (self._sent[0] + self.lease_s if created
                                  else time.monotonic() + (expires - time.time()))
                return self
            if owner is not None:
                self._break_if_stale(owner, expires)
            if time.monotonic() > deadline:
                raise ConcurrencyError(
                    f"could not take the registry lock of {self.model} within {self.wait_s:.0f} s "
                    f"(held by another promote/rollback; a crashed holder's lock expires after {self.lease_s:.0f} s)")
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
        owner, _, _ = self._owner(self.name)
        if owner != self.token:
            self.held = False
            raise ConcurrencyError(f"lost the registry lock of {self.model} (lease expired and was broken); nothing more was written")

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
            owner, _, _ = self._owner(self.name)
            if owner == self.token:
                self._delete(self.name)
        except LifecycleError:
            # The lease expires on its own; a failed release must not hide the real outcome.
            pass

    def __enter__(self) -> "RegistryLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
