"""The append-only promotion ledger, stored as one MLflow run per event.

Runs live in the experiment ``lifecycle-ledger`` of the same backend as the registry, so the
history survives with the registry's database and is searchable in the UI (``tags.ledger.model``,
``tags.ledger.action`` ...). The whole event is kept as JSON in the ``ledger.event`` tag.
Sequence numbers are per model and assigned under the registry lock (:mod:`lifecycle.registry.lock`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from lifecycle.errors import LifecycleError
from lifecycle.registry.client import call, error_code

DEFAULT_EXPERIMENT = "lifecycle-ledger"
_MAX_TAG = 8000

#: Actions. Effective events move an alias (or its absence) and define the registry's truth.
PROMOTE = "promote"            # gates passed, alias moved by `lifecycle promote`
REJECT = "reject"              # gates refused; nothing moved
DRY_RUN = "dry_run"            # `promote --dry-run`: gates evaluated, nothing moved
ROLLBACK = "rollback"          # production moved back by `lifecycle rollback`
ROLLBACK_NOOP = "rollback_noop"        # a repeated rollback that found its work already done
ROLLBACK_REFUSED = "rollback_refused"  # fencing or policy refused a rollback
UI_PROMOTE = "ui_promote"      # an alias moved outside our commands and passed the policy (guard)
UI_DELETE = "ui_delete"        # an alias deleted outside our commands (guard records it)
GUARD_REVERT = "guard_revert"  # an alias moved outside our commands failed the policy; reverted
ABORT = "abort"                # a promote/rollback failed after its event was written; undone


def experiment_name() -> str:
    """The ledger experiment (``LIFECYCLE_LEDGER_EXPERIMENT`` overrides the default)."""
    return os.environ.get("LIFECYCLE_LEDGER_EXPERIMENT", DEFAULT_EXPERIMENT)


@dataclass
class Event:
    """One ledger event. ``to_version`` is what the alias names after an effective event."""

    model: str
    action: str
    target: str
    seq: int = 0
    from_version: str | None = None
    to_version: str | None = None
    effective: bool = False
    actor: str = ""
    timestamp: float = field(default_factory=time.time)
    policy_path: str | None = None
    policy_digest: str | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)
    eval_run_ids: dict[str, str] = field(default_factory=dict)
    data_digests: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    reverts: int | None = None
    run_id: str | None = None

    def to_json(self) -> str:
        """The event as compact JSON (without the ledger run id)."""
        data = asdict(self)
        data.pop("run_id")
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, run_id: str | None = None) -> "Event":
        """Rebuild an event written by :meth:`to_json` (unknown keys from newer writers ignored)."""
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names}, run_id=run_id)

    def tags(self) -> dict[str, str]:
        """Searchable run tags for this event."""
        tags = {
            "ledger.model": self.model,
            "ledger.seq": f"{self.seq:010d}",
            "ledger.action": self.action,
            "ledger.target": self.target,
            "ledger.from_version": self.from_version or "",
            "ledger.to_version": self.to_version or "",
            "ledger.effective": "true" if self.effective else "false",
            "ledger.actor": self.actor,
            "ledger.policy_digest": self.policy_digest or "",
            "ledger.reason": self.reason[:_MAX_TAG],
            "mlflow.user": self.actor,
            "mlflow.runName": f"{self.model} #{self.seq} {self.action} {self.target} "
                              f"{self.from_version or '-'}->{self.to_version or '-'}",
        }
        if self.reverts is not None:
            tags["ledger.reverts"] = str(self.reverts)
        body = self.to_json()
        if len(body) > _MAX_TAG:
            # Gate reasons are the only unbounded part; keep the verdicts, trim the prose.
            slim = Event(**{**asdict(self), "gates": [{**g, "reason": g.get("reason", "")[:120]} for g in self.gates]})
            body = slim.to_json()[:_MAX_TAG]
        tags["ledger.event"] = body
        return tags


#: Ledger experiment ids already looked up in this process, by (tracking URI, experiment name):
#: a long-lived process (the guard, a benchmark, a notebook) asks the server once.
_KNOWN_IDS: dict[tuple[str, str], str] = {}


class Ledger:
    """Read and append the events of one backend (every model shares the ledger experiment)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._experiment_id: str | None = _KNOWN_IDS.get(self._key())

    def _key(self) -> tuple[str, str]:
        return (str(getattr(self.client, "tracking_uri", "")), experiment_name())

    def experiment_id(self, create: bool = True) -> str | None:
        """The ledger experiment's id, created on first use (race-safe)."""
        if self._experiment_id:
            return self._experiment_id
        found = self._lookup(create)
        if found:
            _KNOWN_IDS[self._key()] = found
        return found

    def _lookup(self, create: bool) -> str | None:
        name = experiment_name()
        exp = call("read the ledger experiment", self.client.get_experiment_by_name, name)
        if exp is None and create:
            from mlflow.exceptions import MlflowException

            try:
                self._experiment_id = self.client.create_experiment(
                    name, tags={"mlflow.note.content": "Promotion ledger written by lifecycle: one run per event."})
                return self._experiment_id
            except MlflowException as exc:
                if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    from lifecycle.registry.client import translate

                    raise translate(exc, "create the ledger experiment") from None
            exp = call("read the ledger experiment", self.client.get_experiment_by_name, name)
        if exp is None:
            return None
        if exp.lifecycle_stage != "active":
            raise LifecycleError(f"the ledger experiment {name!r} is deleted; restore it (mlflow experiments restore)")
        self._experiment_id = exp.experiment_id
        return self._experiment_id

    def write(self, event: Event) -> Event:
        """Write ``event`` (one request); the caller holds the model's lock and set ``seq``.

        The event counts from here on (readers see it, the next ``seq`` follows it); the run stays
        RUNNING until :meth:`finish`, which callers overlap with their next writes.
        """
        exp_id = self.experiment_id()
        run = call("write the ledger event", self.client.create_run, exp_id,
                   start_time=int(event.timestamp * 1000), tags=event.tags())
        event.run_id = run.info.run_id
        return event

    def finish(self, event: Event) -> None:
        """Mark the run of a written event FINISHED (cosmetic: the UI shows it as done)."""
        if event.run_id:
            call("finish the ledger event", self.client.set_terminated, event.run_id, "FINISHED")

    def append(self, event: Event) -> Event:
        """Write ``event`` as a finished run; the caller holds the model's lock and set ``seq``."""
        self.write(event)
        self.finish(event)
        return event

    def _search(self, model: str, extra: str = "", max_results: int | None = None, descending: bool = False) -> list[Event]:
        exp_id = self.experiment_id(create=False)
        if exp_id is None:
            return []
        quoted = model.replace("'", "\\'")
        flt = f"tags.`ledger.model` = '{quoted}'" + (f" and {extra}" if extra else "")
        order = [f"tags.`ledger.seq` {'DESC' if descending else 'ASC'}"]
        out: list[Event] = []
        token = None
        while True:
            page_size = min(max_results or 1000, 1000)
            page = call("read the ledger", self.client.search_runs, [exp_id], filter_string=flt,
                        max_results=page_size, order_by=order, page_token=token)
            for run in page:
                body = run.data.tags.get("ledger.event")
                if body:
                    out.append(Event.from_json(body, run_id=run.info.run_id))
            token = page.token
            if not token or (max_results and len(out) >= max_results):
                break
        return out[:max_results] if max_results else out

    def events(self, model: str) -> list[Event]:
        """Every event of ``model`` in sequence order."""
        return self._search(model)

    def last(self, model: str, *, target: str | None = None, effective: bool | None = None) -> Event | None:
        """The newest event of ``model`` (optionally of one target / only effective ones)."""
        extra = []
        if target:
            extra.append(f"tags.`ledger.target` = '{target}'")
        if effective is not None:
            extra.append(f"tags.`ledger.effective` = '{'true' if effective else 'false'}'")
        found = self._search(model, " and ".join(extra), max_results=1, descending=True)
        return found[0] if found else None

    def next_seq(self, model: str) -> int:
        """The sequence number for the next event of ``model`` (call under the lock)."""
        last = self.last(model)
        return (last.seq + 1) if last else 1


def holder_stack(events: Iterable[Event], target: str = "production") -> list[str | None]:
    """The versions that held ``target``, as a stack the ledger's effective events build.

    A promotion pushes the new version; a rollback pops back to the version before (so two
    rollbacks go back two promotions, never "version minus one"); a guard revert and an abort
    restore without pushing. The top of the stack is the version the alias should name.
    """
    stack: list[str | None] = []
    for ev in events:
        if ev.target != target or not ev.effective:
            continue
        if ev.action in (ROLLBACK, ABORT, GUARD_REVERT) and ev.to_version in stack:
            # Back to the nearest earlier holder (normally the element just below the top).
            while stack[-1] != ev.to_version:
                stack.pop()
        elif not stack or stack[-1] != ev.to_version:
            stack.append(ev.to_version)
    return stack


def passed_production(events: Iterable[Event], version: str) -> bool:
    """Whether ``version`` was ever promoted to production through the gates (ours or the guard's)."""
    return any(ev.target == "production" and ev.effective and ev.to_version == version
               and ev.action in (PROMOTE, UI_PROMOTE) for ev in events)
