"""``lifecycle promote``: move the staging/production alias to a version that passes the policy.

Speed is round trips: against a tracking server each REST call costs ~50 ms here, so a promotion
is six rounds of calls, each round's calls made at once (:func:`client.parallel`):

1. check that the version exists, take the lock, and look up the ledger experiment (a refused
   input changes nothing, not even the lock's model: it is released at once);
2. read everything the gates need, under the lock, and mark the model (the permission check);
3. write the ledger event, ``pending``;
4. move the alias and mirror the stage;
5. mark the event ``done`` (the move is confirmed) and finish its run;
6. release the lock.

A promotion killed between 3 and 5 leaves a pending event: readers do not count it, ``lifecycle
status`` shows it, and ``lifecycle repair`` settles it from what the registry says.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from lifecycle.errors import ConfigError, GateRejected, LifecycleError
from lifecycle.policies import Candidate, GateResult, Policy, blocking_failures, check_gates, load_policy
from lifecycle.registry import facts
from lifecycle.registry import ledger as L
from lifecycle.registry.client import actor, call, fault_point, get_client, parallel, registry
from lifecycle.registry.lock import RegistryLock

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a promote/rollback/guard action did: its ledger event and gate results."""

    event: L.Event
    gates: list[GateResult] = field(default_factory=list)
    moved: bool = False
    message: str = ""


@dataclass
class Snapshot:
    """What one round of reads under the lock learnt about a model and a candidate version."""

    version: Any                  # the candidate ModelVersion (tags, stage)
    model: Any                    # the RegisteredModel (aliases)
    seq: int                      # the sequence number of the next ledger event
    candidate: Candidate          # what the gates are checked against
    production: Any = None        # the version @production names, when a gate needed it

    def stage_of(self, version: str | None) -> str | None:
        """The stage of ``version`` when this round read it (else None: unknown)."""
        for mv in (self.version, self.production):
            if mv is not None and version is not None and str(mv.version) == str(version):
                return mv.current_stage
        return None

    def current(self, alias: str) -> str | None:
        """The version ``alias`` names now."""
        return facts.alias_version(self.model, alias)

    def next_seq(self) -> int:
        """The sequence number of the next ledger event."""
        return self.seq


def lineage(tags: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(evaluation/training run ids, data digests) of a version's tags, for the ledger."""
    runs = {k: tags[k] for k in ("eval_run_id", "train_run_id", "data_run_id") if tags.get(k)}
    digests = {k: tags[k] for k in ("data_digest", "eval_data_digest") if tags.get(k)}
    return runs, digests


def mark_text(action: str) -> str:
    """The ``lifecycle.last_action`` tag value: what, by whom, when."""
    return f"{action} by {actor()} at {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def read_snapshot(client: Any, led: L.Ledger, name: str, version: str, policy: Policy, target: str, *,
                  mark: str | None = None) -> Snapshot:
    """Read, in one round of parallel requests, all that the ``target`` gates need (call under the lock).

    Only what enabled or dry-run gates need is read. The artifact size and the signature are read
    alongside the version itself (before its tags say whether a size tag makes the listing moot):
    a wasted read costs less than a round trip. ``mark`` also tags the model (the permission
    check of the writes to come) in the same round.
    """
    tp = policy.target(target)
    needs = lambda g: g is not None and g.mode != "disabled"  # noqa: E731
    jobs: dict[str, Any] = {
        # Order decides which failure is reported: a missing model or version first.
        "version": lambda: facts.get_version(client, name, version),
        "model": lambda: facts.get_model(client, name),
        "seq": lambda: led.next_seq(name),
    }
    if needs(tp.baseline) or needs(tp.canary):
        jobs["baseline"] = lambda: facts.version_by_alias(client, name, "production")
    if needs(tp.canary):
        jobs["canary"] = lambda: led.last_action(name, L.CANARY_VERDICT, to_version=str(int(version)))
    if needs(tp.cooldown):
        jobs["cooldown"] = lambda: led.last(name, target="production", effective=True)
    if needs(tp.model_size):
        jobs["size"] = lambda: facts.model_size_bytes(client, name, str(int(version)))
    if needs(tp.signature):
        jobs["signature"] = lambda: facts.has_signature(name, str(int(version)))
    if mark:
        jobs["mark"] = lambda: facts.mark(client, name, mark)
    got = dict(zip(jobs, parallel(client, *jobs.values())))
    mv = got["version"]
    tags = dict(mv.tags or {})
    base = got.get("baseline")
    base_version = str(base.version) if base is not None else None
    last_change = got.get("cooldown")
    candidate = Candidate(
        version=str(mv.version), tags=tags,
        model_size_bytes=None if tags.get("model_size_bytes") else got.get("size"),
        has_signature=got.get("signature"),
        baseline_version=base_version,
        baseline_tags=dict(base.tags or {}) if base is not None and base_version != str(mv.version) else None,
        last_production_change=last_change.timestamp if last_change else None, now=time.time(),
        canary_verdict=canary_facts(got.get("canary")))
    return Snapshot(version=mv, model=got["model"], seq=got["seq"], candidate=candidate, production=base)


def canary_facts(event: L.Event | None) -> dict[str, Any] | None:
    """What the canary gate needs from a ``canary_verdict`` event: its code, number and production version."""
    if event is None:
        return None
    code = next((g.get("code") for g in event.gates if g.get("kind") == "canary_verdict"), None)
    return {"code": code, "seq": event.seq, "production": event.from_version}


def record_only(client: Any, led: L.Ledger, lock: RegistryLock, event: L.Event) -> None:
    """Record an event that moves nothing (a rejection, a dry run, a refused rollback), then
    release the lock; finishing the ledger run is cosmetic, so it overlaps with the release."""
    lock.verify()
    led.write(event)
    parallel(client, lambda: led.finish(event), lock.release)


def move_alias(client: Any, led: L.Ledger, lock: RegistryLock, event: L.Event, *,
               version_stage: str | None = None, replaced_stage: str | None = None) -> None:
    """Record ``event`` as a pending move, move the alias and mirror the stage, then confirm it.

    The ledger goes first so that the guard, woken by the alias webhook, finds the move already
    recorded as ours (it waits for our lock, so it sees the move confirmed). If the move fails,
    the alias is put back, the event marked ``failed`` and an ``abort`` event says why; if even
    that fails, the event stays pending for ``lifecycle repair``. ``version_stage`` /
    ``replaced_stage`` (the stages of the versions the alias gets and leaves, read under the
    lock) spare the stage mirror its own reads.
    """
    lock.verify()
    event.state = L.PENDING
    led.write(event)
    reg = registry(client)
    try:
        if event.to_version is None:
            fault_point(f"delete alias {event.target}")
            call("delete alias", reg.delete_registered_model_alias, event.model, event.target)
        else:
            mirror = facts.mirror_jobs(client, event.model, event.to_version, event.target, event.from_version,
                                       version_stage=version_stage, replaced_stage=replaced_stage)

            def set_alias() -> None:
                fault_point(f"set alias {event.target}")
                call(f"set alias {event.target}", reg.set_registered_model_alias, event.model, event.target,
                     event.to_version)

            # The alias first: its failure is the one reported (and undone below).
            parallel(client, set_alias, *mirror)
    except LifecycleError as exc:
        _undo(client, led, event, exc, version_stage)
        raise
    # Confirmed: the alias names what the event says. Until this lands the event stays pending.
    parallel(client, lambda: led.set_state(event, L.DONE), lambda: led.finish(event))


def _undo(client: Any, led: L.Ledger, event: L.Event, exc: Exception, version_stage: str | None) -> None:
    """Put the alias back after a failed move; mark the event failed and record an ``abort``."""
    reg = registry(client)
    try:
        if event.from_version:
            fault_point(f"restore alias {event.target}")
            reg.set_registered_model_alias(event.model, event.target, event.from_version)
            facts.mirror_stage(client, event.model, event.from_version, event.target, event.to_version)
        elif event.to_version is not None:
            # A first-ever promotion: no earlier holder, so the alias must not exist at all.
            from mlflow.exceptions import MlflowException

            try:
                fault_point(f"delete alias {event.target}")
                reg.delete_registered_model_alias(event.model, event.target)
            except MlflowException:
                if facts.alias_version(reg.get_registered_model(event.model), event.target) is not None:
                    raise
            if version_stage and version_stage != facts.STAGE_OF.get(event.target):
                facts.transition(client, event.model, event.to_version, version_stage)
        led.set_state(event, L.FAILED)
        led.append(L.Event(model=event.model, action=L.ABORT, target=event.target, seq=event.seq + 1,
                           from_version=event.to_version, to_version=event.from_version, effective=False,
                           actor=event.actor, reason=f"event #{event.seq} failed and was undone: {exc}",
                           reverts=event.seq))
    except Exception as inner:  # noqa: BLE001 - report the original failure
        log.error("could not undo ledger event #%d of %s (%s); it stays pending: run `lifecycle repair %s`",
                  event.seq, event.model, inner, event.model)


def promote(name: str, version: str, target: str, *, policy_path: str | None = None, dry_run: bool = False,
            reason: str = "", client: Any = None, policy: Policy | None = None) -> Outcome:
    """Check ``version`` against the policy's ``target`` gates and move the alias if all pass.

    Raises :class:`GateRejected` (with ``.outcome``) when an enabled gate fails; the rejection is
    recorded in the ledger and nothing in the registry changes. ``dry_run`` evaluates and records
    without moving anything.
    """
    target = facts.check_target(target)
    facts.check_name(name)
    L.check_text(reason)
    if not str(version).strip().isdigit():
        raise ConfigError(f"version must be a number, got {version!r}")
    version = str(int(version))
    policy = policy or load_policy(policy_path)
    client = client or get_client()
    led = L.Ledger(client)
    lock = RegistryLock(client, name, purpose=f"promote v{version} to {target}")
    try:
        # A missing model or version is refused before anything is written (its error wins).
        parallel(client, lambda: facts.get_version(client, name, version), lock.acquire, led.experiment_id)
        snap = read_snapshot(client, led, name, version, policy, target,
                             mark=None if dry_run else mark_text(f"promote v{version} to {target}"))
        current = snap.current(target)
        results = check_gates(policy.target(target), snap.candidate)
        failures = blocking_failures(results)
        runs, digests = lineage(snap.candidate.tags)
        action = L.DRY_RUN if dry_run else (L.REJECT if failures else L.PROMOTE)
        soft = [r for r in results if r.status == "fail" and not r.blocking]
        soft_note = f" (dry-run gates failing: {', '.join(r.gate for r in soft)})" if soft else ""
        verdict = ("; ".join(f"{r.gate}: {r.reason}" for r in failures) if failures
                   else "all enabled gates passed" + soft_note)
        why = reason or verdict  # the user's words verbatim; the gates' verdict when none were given
        event = L.Event(model=name, action=action, target=target, seq=snap.next_seq(), from_version=current,
                        to_version=version, effective=action == L.PROMOTE, actor=actor(),
                        policy_path=policy.path, policy_digest=policy.digest, gates=[r.to_dict() for r in results],
                        eval_run_ids=runs, data_digests=digests, reason=why, detail=verdict if reason else "")
        if action == L.PROMOTE:
            move_alias(client, led, lock, event, version_stage=snap.version.current_stage,
                       replaced_stage=snap.stage_of(current))
        else:
            record_only(client, led, lock, event)
    finally:
        lock.release()
    outcome = Outcome(event=event, gates=results, moved=action == L.PROMOTE)
    if action == L.REJECT:
        outcome.message = (f"{name} v{version} refused for {target} by {len(failures)} gate(s): "
                           + "; ".join(f"{r.gate} ({r.reason})" for r in failures))
        err = GateRejected(outcome.message)
        err.outcome = outcome  # type: ignore[attr-defined]
        raise err
    outcome.message = (f"dry run: {name} v{version} would {'be refused' if failures else 'pass'} for {target}"
                       if dry_run else f"{name}@{target} -> v{version} (was {'v' + current if current else 'unset'})")
    return outcome
