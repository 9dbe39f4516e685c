"""The append-only promotion ledger, stored as one MLflow run per event.

Runs live in the experiment ``lifecycle-ledger`` of the same backend as the registry, so the
history survives with the registry's database and is searchable in the UI (``tags.ledger.model``,
``tags.ledger.action`` ...). Sequence numbers are per model and assigned under the registry lock
(:mod:`lifecycle.registry.lock`).

Storage, chosen so that no event is ever cut mid-JSON (MLflow caps a tag value at 8000 characters):

* ``ledger.event`` always holds a complete JSON event. When the whole event fits, that is all;
  when it does not (a long reason, long gate reasons or lineage tags), it holds a slim copy with
  short previews and ``ledger.event.parts = N``, and the whole JSON is split over the tags
  ``ledger.event.part.0`` ... ``.N-1``. All of them travel in the one request that creates the
  run, so an event is stored whole or not at all.
* ``ledger.state`` is ``pending`` for a move written before the alias moved, ``done`` once the
  move is confirmed and ``failed`` when it is known not to have happened (undone, or found not
  done by ``lifecycle repair``). Events without the tag (older writers, non-moves) are ``done``.
  Only done moves define the registry's truth (:func:`holder_stack`).

A run whose event cannot be read back (cut off, edited by hand, written by something else) is
skipped with a warning naming the run; :attr:`Ledger.damaged` lists them for ``lifecycle status``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from lifecycle.errors import ConfigError, LifecycleError
from lifecycle.registry.client import call, error_code, fault_point, filter_literal
from lifecycle.registry.text import MAX_REASON_CHARS, check_text, preview  # noqa: F401 - part of this API

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "lifecycle-ledger"
#: MLflow's cap on a run tag value (characters); longer values are cut or refused by the server.
_MAX_TAG = 8000
_PART = 7000
#: Parts of one event at most (about 450 000 characters of JSON): one create request stays small.
_MAX_PARTS = 64

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
GUARD_FAILED = "guard_failed"  # the guard gave up reconciling an alias move (written by the guard)
REPAIR = "repair"              # `lifecycle repair` (or the guard) settled half-done events
CANARY_START = "canary_start"        # `lifecycle serve --canary/--shadow` started a challenger beside production
CANARY_STEP = "canary_step"          # `lifecycle canary --act` raised the canary's share to the next step
CANARY_VERDICT = "canary_verdict"    # `lifecycle canary` compared the arms (figures in ``gates``)
CANARY_ROLLBACK = "canary_rollback"  # `lifecycle canary --act` took a worse challenger out (its alias deleted)

#: Events that put an alias back on an earlier holder instead of pushing a new one.
RESTORING = (ROLLBACK, ABORT, GUARD_REVERT, REPAIR)

#: Values of the ``ledger.state`` tag.
PENDING, DONE, FAILED = "pending", "done", "failed"


def experiment_name() -> str:
    """The ledger experiment (``LIFECYCLE_LEDGER_EXPERIMENT`` overrides the default)."""
    return os.environ.get("LIFECYCLE_LEDGER_EXPERIMENT", DEFAULT_EXPERIMENT)


def _typed(data: dict[str, Any]) -> None:
    """Raise ValueError unless ``data`` has the field types an event needs (hand edits, old writers)."""
    def need(key: str, types: tuple[type, ...], *, nullable: bool = False, required: bool = True) -> None:
        if key not in data and not required:
            return
        value = data.get(key)
        if value is None and nullable:
            return
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"field {key!r} is {type(value).__name__}, not {'/'.join(t.__name__ for t in types)}")

    for key in ("model", "action", "target"):
        need(key, (str,))
    need("seq", (int,))
    for key in ("from_version", "to_version", "policy_path", "policy_digest", "challenger_alias"):
        need(key, (str,), nullable=True, required=False)
    need("reverts", (int,), nullable=True, required=False)
    need("effective", (bool,), required=False)
    need("timestamp", (int, float), required=False)
    for key in ("actor", "reason", "detail"):
        need(key, (str,), required=False)
    gates = data.get("gates", [])
    if not isinstance(gates, list) or not all(isinstance(g, dict) for g in gates):
        raise ValueError("field 'gates' is not a list of objects")
    for key in ("eval_run_ids", "data_digests"):
        value = data.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"field {key!r} is not an object of strings")


@dataclass
class Event:
    """One ledger event. ``to_version`` is what the alias names after an effective event.

    ``state`` is kept in its own tag (it changes once the move is confirmed), not in the JSON.
    """

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
    #: What the command decided and why, in its own words (the user's ``reason`` is kept verbatim).
    detail: str = ""
    #: Canary events: the challenger's alias (``lifecycle canary`` defaults to the newest canary_start's).
    challenger_alias: str | None = None
    state: str = DONE

    @property
    def done(self) -> bool:
        """Whether the event counts: a confirmed move, or an event that moves nothing."""
        return self.state == DONE

    def to_json(self) -> str:
        """The event as compact JSON (without the ledger run id and the state)."""
        data = asdict(self)
        data.pop("run_id")
        data.pop("state")
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, run_id: str | None = None, state: str = DONE) -> "Event":
        """Rebuild an event written by :meth:`to_json` (unknown keys from newer writers ignored).

        Raises ValueError for text that is not a whole event of the right field types.
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        _typed(data)
        names = {f.name for f in fields(cls)} - {"run_id", "state"}
        return cls(**{k: v for k, v in data.items() if k in names}, run_id=run_id, state=state)

    def _slim(self, limit: int) -> str:
        """A complete JSON copy that fits one tag: long strings previewed (the parts hold them whole)."""
        data = asdict(self)
        data.pop("run_id")
        data.pop("state")
        for cut in (1000, 200, 40, 0):
            data["reason"] = preview(self.reason, cut) if cut else ""
            data["detail"] = preview(self.detail, cut) if cut else ""
            data["gates"] = [{k: (preview(v, cut) if isinstance(v, str) else v) for k, v in g.items()}
                             for g in self.gates] if cut else []
            for key in ("eval_run_ids", "data_digests"):
                data[key] = {preview(k, 100): preview(v, cut) for k, v in getattr(self, key).items()} if cut else {}
            for key in ("model", "actor", "policy_path"):
                value = getattr(self, key)
                data[key] = preview(value, max(cut, 100)) if isinstance(value, str) else value
            text = json.dumps(data, sort_keys=True, separators=(",", ":"))
            if len(text) <= limit:
                return text
        raise ConfigError("a ledger event is too large to store even in its short form")

    def tags(self) -> dict[str, str]:
        """Searchable run tags for this event, with the whole event in one or more JSON tags."""
        tags = {
            "ledger.model": self.model,
            "ledger.seq": f"{self.seq:010d}",
            "ledger.action": self.action,
            "ledger.target": self.target,
            "ledger.from_version": self.from_version or "",
            "ledger.to_version": self.to_version or "",
            "ledger.effective": "true" if self.effective else "false",
            "ledger.actor": preview(self.actor, 250),
            "ledger.policy_digest": self.policy_digest or "",
            "ledger.reason": preview(self.reason),
            "ledger.state": self.state,
            "mlflow.user": preview(self.actor, 250),
            # MLflow keeps the run name in a 250-character column.
            "mlflow.runName": preview(f"{self.model} #{self.seq} {self.action} {self.target} "
                                      f"{self.from_version or '-'}->{self.to_version or '-'}", 250),
        }
        if self.reverts is not None:
            tags["ledger.reverts"] = str(self.reverts)
        body = self.to_json()
        if len(body) <= _MAX_TAG:
            tags["ledger.event"] = body
            return tags
        parts = [body[i:i + _PART] for i in range(0, len(body), _PART)]
        if len(parts) > _MAX_PARTS:
            raise ConfigError(f"a ledger event of {len(body)} characters is too large to store "
                              f"(at most {_MAX_PARTS * _PART}); shorten the reason")
        tags["ledger.event"] = self._slim(_MAX_TAG)
        tags["ledger.event.parts"] = str(len(parts))
        tags.update({f"ledger.event.part.{i}": part for i, part in enumerate(parts)})
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str], run_id: str | None = None) -> "Event":
        """Rebuild an event from its run's tags; ValueError (saying what is wrong) when it is damaged."""
        body = tags.get("ledger.event")
        if body is None:
            raise ValueError("no ledger.event tag")
        state = tags.get("ledger.state") or DONE
        if state not in (PENDING, DONE, FAILED):
            raise ValueError(f"unknown ledger.state {state!r}")
        parts = tags.get("ledger.event.parts")
        if parts is not None:
            if not parts.isdigit() or not 0 < int(parts) <= _MAX_PARTS:
                raise ValueError(f"bad ledger.event.parts {parts!r}")
            missing = [i for i in range(int(parts)) if f"ledger.event.part.{i}" not in tags]
            if missing:
                raise ValueError(f"ledger.event.part.{missing[0]} is missing")
            body = "".join(tags[f"ledger.event.part.{i}"] for i in range(int(parts)))
        try:
            event = cls.from_json(body, run_id=run_id, state=state)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the event JSON is cut off or edited ({exc.msg} at character {exc.pos})") from None
        # The searchable tags drive the ledger's queries: they must agree with the event.
        seq_tag = tags.get("ledger.seq", "").lstrip("0")
        if tags.get("ledger.model") not in (None, event.model) or seq_tag != str(event.seq).lstrip("0"):
            raise ValueError("the ledger.model / ledger.seq tags disagree with the event")
        return event


@dataclass
class Damaged:
    """A ledger run whose event could not be read (skipped by every reader)."""

    run_id: str
    seq: str
    why: str


_WARNED: set[str] = set()


#: Ledger experiment ids already looked up in this process, by (tracking URI, experiment name):
#: a long-lived process (the guard, a benchmark, a notebook) asks the server once.
_KNOWN_IDS: dict[tuple[str, str], str] = {}


class Ledger:
    """Read and append the events of one backend (every model shares the ledger experiment)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._experiment_id: str | None = _KNOWN_IDS.get(self._key())
        #: Runs the last full read of each model could not read back, by model.
        self.damaged: dict[str, list[Damaged]] = {}

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
                fault_point("create the ledger experiment")
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

        The event counts from here on (readers see it, the next ``seq`` follows it); a move is
        written ``pending`` and counts once :meth:`confirm` marks it done. The run stays RUNNING
        until :meth:`finish` / :meth:`confirm`.
        """
        if event.seq < 1:
            # Numbering an event here would read the ledger outside the caller's lock (two writers
            # could take one number): a missing seq is a caller's bug, refused before any write.
            raise ValueError(f"ledger event {event.action} of {event.model} has no sequence number (seq "
                             f"{event.seq}): take it under the lock with next_seq()/next_seq_of()")
        tags = event.tags()  # refuses an event too large to store before anything is written
        exp_id = self.experiment_id()
        fault_point("write the ledger event")
        run = call("write the ledger event", self.client.create_run, exp_id,
                   start_time=int(event.timestamp * 1000), tags=tags)
        event.run_id = run.info.run_id
        return event

    def finish(self, event: Event) -> None:
        """Mark the run of a written event FINISHED (cosmetic: the UI shows it as done)."""
        if event.run_id:
            fault_point("finish the ledger event")
            call("finish the ledger event", self.client.set_terminated, event.run_id, "FINISHED")

    def set_state(self, event: Event, state: str) -> None:
        """Record that a pending move was done (confirmed in the registry) or failed (never happened)."""
        if not event.run_id:
            return
        fault_point(f"mark the ledger event {state}")
        call("update the ledger event", self.client.set_tag, event.run_id, "ledger.state", state)
        event.state = state

    def append(self, event: Event) -> Event:
        """Write ``event`` as a finished run; the caller holds the model's lock and set ``seq``."""
        self.write(event)
        self.finish(event)
        return event

    def _runs(self, model: str, extra: str = "", max_results: int | None = None,
              descending: bool = False) -> list[Any]:
        exp_id = self.experiment_id(create=False)
        if exp_id is None:
            return []
        flt = f"tags.`ledger.model` = {filter_literal(model)}" + (f" and {extra}" if extra else "")
        order = [f"tags.`ledger.seq` {'DESC' if descending else 'ASC'}"]
        out: list[Any] = []
        token = None
        while True:
            page_size = min(max_results or 1000, 1000)
            page = call("read the ledger", self.client.search_runs, [exp_id], filter_string=flt,
                        max_results=page_size, order_by=order, page_token=token)
            out.extend(page)
            token = page.token
            if not token or (max_results and len(out) >= max_results):
                break
        return out

    def _parse(self, model: str, runs: list[Any]) -> tuple[list[Event], list[Damaged]]:
        events, damaged = [], []
        for run in runs:
            tags = dict(run.data.tags or {})
            try:
                ev = Event.from_tags(tags, run_id=run.info.run_id)
                if ev.model != model:
                    raise ValueError(f"the event names model {ev.model!r}")
                events.append(ev)
            except (ValueError, TypeError) as exc:
                bad = Damaged(run_id=run.info.run_id, seq=tags.get("ledger.seq", "?").lstrip("0") or "0", why=str(exc))
                damaged.append(bad)
                if bad.run_id not in _WARNED:
                    _WARNED.add(bad.run_id)
                    log.warning("ledger of %s: skipping unreadable entry #%s (run %s): %s", model, bad.seq,
                                bad.run_id, bad.why)
        return events, damaged

    def events(self, model: str) -> list[Event]:
        """Every readable event of ``model`` in sequence order, pending and failed moves included.

        Unreadable runs are skipped with a warning and listed in :attr:`damaged`.
        """
        events, damaged = self._parse(model, self._runs(model))
        self.damaged[model] = damaged
        return events

    def last(self, model: str, *, target: str | None = None, effective: bool | None = None) -> Event | None:
        """The newest readable event of ``model`` (optionally of one target / only effective done ones)."""
        extra = []
        if target:
            extra.append(f"tags.`ledger.target` = '{target}'")
        if effective is not None:
            extra.append(f"tags.`ledger.effective` = '{'true' if effective else 'false'}'")
        # A damaged or unconfirmed newest entry must not hide the one before it.
        events, _ = self._parse(model, self._runs(model, " and ".join(extra), max_results=20, descending=True))
        for ev in events:
            if effective is None or ev.done:
                return ev
        return None

    def last_action(self, model: str, action: str, *, to_version: str | None = None) -> Event | None:
        """The newest readable event of ``model`` with ``action`` (and ``to_version``), or None."""
        extra = f"tags.`ledger.action` = {filter_literal(action)}"
        if to_version is not None:
            extra += f" and tags.`ledger.to_version` = {filter_literal(to_version)}"
        events, _ = self._parse(model, self._runs(model, extra, max_results=5, descending=True))
        return events[0] if events else None

    def next_seq(self, model: str) -> int:
        """The sequence number for the next event of ``model`` (call under the lock).

        Read from the newest run's ``ledger.seq`` tag, so a damaged newest entry still counts.
        """
        runs = self._runs(model, max_results=1, descending=True)
        return top_seq(runs) + 1


def top_seq(runs: Iterable[Any]) -> int:
    """The highest ``ledger.seq`` among ledger runs (0 when none carries a number)."""
    best = 0
    for run in runs:
        raw = (run.data.tags or {}).get("ledger.seq", "")
        if raw.isdigit():
            best = max(best, int(raw))
    return best


def next_seq_of(events: list[Event], damaged: list[Damaged]) -> int:
    """The next sequence number after ``events`` and the ``damaged`` runs of one full read."""
    seqs = [e.seq for e in events] + [int(d.seq) for d in damaged if d.seq.isdigit()]
    return max(seqs, default=0) + 1


def holder_stack(events: Iterable[Event], target: str = "production") -> list[str | None]:
    """The versions that held ``target``, as a stack the ledger's effective, done events build.

    A promotion pushes the new version; a rollback pops back to the version before (so two
    rollbacks go back two promotions, never "version minus one"); a guard revert, a repair and
    an (older writers') abort restore without pushing. Pending and failed moves do not count:
    the top of the stack is the version the alias names after every confirmed move.
    """
    stack: list[str | None] = []
    for ev in events:
        if ev.target != target or not ev.effective or not ev.done:
            continue
        if ev.action in RESTORING and ev.to_version in stack:
            # Back to the nearest earlier holder (normally the element just below the top).
            while stack[-1] != ev.to_version:
                stack.pop()
        elif not stack or stack[-1] != ev.to_version:
            stack.append(ev.to_version)
    return stack


def passed_production(events: Iterable[Event], version: str) -> bool:
    """Whether ``version`` was ever promoted to production through the gates (ours or the guard's)."""
    return any(ev.target == "production" and ev.effective and ev.done and ev.to_version == version
               and ev.action in (PROMOTE, UI_PROMOTE) for ev in events)


def guard_failures(events: Iterable[Event], target: str) -> list[Event]:
    """``guard_failed`` events of ``target`` that no later move or repair of that alias answered."""
    open_: list[Event] = []
    for ev in events:
        if ev.target != target:
            continue
        if ev.action == GUARD_FAILED:
            open_.append(ev)
        elif ev.done and ev.action in (PROMOTE, ROLLBACK, UI_PROMOTE, GUARD_REVERT, REPAIR):
            open_ = []
    return open_


def unsettled(events: Iterable[Event]) -> list[Event]:
    """Moves written but never confirmed (a command killed mid-move): ``lifecycle repair`` settles them."""
    return [ev for ev in events if ev.effective and ev.state == PENDING]
