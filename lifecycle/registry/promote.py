"""``lifecycle promote``: move the staging/production alias to a version that passes the policy."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from lifecycle.errors import GateRejected, LifecycleError
from lifecycle.policies import Candidate, GateResult, Policy, blocking_failures, check_gates, load_policy
from lifecycle.registry import facts, ledger as L
from lifecycle.registry.client import actor, call, get_client
from lifecycle.registry.lock import RegistryLock

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a promote/rollback/guard action did: its ledger event and gate results."""

    event: L.Event
    gates: list[GateResult] = field(default_factory=list)
    moved: bool = False
    message: str = ""


def lineage(tags: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(evaluation/training run ids, data digests) of a version's tags, for the ledger."""
    runs = {k: tags[k] for k in ("eval_run_id", "train_run_id", "data_run_id") if tags.get(k)}
    digests = {k: tags[k] for k in ("data_digest", "eval_data_digest") if tags.get(k)}
    return runs, digests


def build_candidate(client: Any, led: L.Ledger, name: str, mv: Any, policy: Policy, target: str,
                    model: Any) -> Candidate:
    """Gather what the target's gates need about version ``mv`` (only what they need)."""
    tp = policy.target(target)
    tags = dict(mv.tags or {})
    needs = lambda g: g is not None and g.mode != "disabled"  # noqa: E731
    size = None
    if needs(tp.model_size) and not tags.get("model_size_bytes"):
        size = facts.model_size_bytes(client, name, mv.version)
    signature = facts.has_signature(name, mv.version) if needs(tp.signature) else None
    base_version = base_tags = None
    if needs(tp.baseline):
        base_version = facts.alias_version(model, "production")
        if base_version and base_version != mv.version:
            base_tags = dict(call("read production version", client.get_model_version, name, base_version).tags or {})
    last_change = None
    if needs(tp.cooldown):
        last = led.last(name, target="production", effective=True)
        last_change = last.timestamp if last else None
    return Candidate(version=str(mv.version), tags=tags, model_size_bytes=size, has_signature=signature,
                     baseline_version=base_version, baseline_tags=base_tags, last_production_change=last_change,
                     now=time.time())


def move_alias(client: Any, led: L.Ledger, lock: RegistryLock, event: L.Event) -> None:
    """Record ``event`` in the ledger, then move the alias and mirror the stage.

    The ledger goes first so that the guard, woken by the alias webhook, finds the move already
    recorded as ours. If the move fails after that, an ``abort`` event restores the ledger's truth
    and the alias is put back (best effort), so ledger and registry never disagree silently.
    """
    # A write the user may not make fails here, before anything is written (basic-auth: EDIT).
    call(f"update registered model {event.model}", client.set_registered_model_tag,
         event.model, "lifecycle.last_event", f"{event.seq} {event.action} {event.target} -> v{event.to_version}")
    lock.verify()
    led.append(event)
    try:
        if event.to_version is None:
            call("delete alias", client.delete_registered_model_alias, event.model, event.target)
        else:
            call(f"set alias {event.target}", client.set_registered_model_alias, event.model, event.target, event.to_version)
            facts.mirror_stage(client, event.model, event.to_version, event.target, event.from_version)
    except LifecycleError as exc:
        abort = L.Event(model=event.model, action=L.ABORT, target=event.target, seq=event.seq + 1,
                        from_version=event.to_version, to_version=event.from_version, effective=True,
                        actor=event.actor, reason=f"event #{event.seq} failed: {exc}", reverts=event.seq)
        try:
            led.append(abort)
            if event.from_version:
                client.set_registered_model_alias(event.model, event.target, event.from_version)
        except Exception as inner:  # noqa: BLE001 - report the original failure
            log.error("could not undo event #%d: %s", event.seq, inner)
        raise


def promote(name: str, version: str, target: str, *, policy_path: str | None = None, dry_run: bool = False,
            reason: str = "", client: Any = None, policy: Policy | None = None) -> Outcome:
    """Check ``version`` against the policy's ``target`` gates and move the alias if all pass.

    Raises :class:`GateRejected` (with ``.outcome``) when an enabled gate fails; the rejection is
    recorded in the ledger and nothing in the registry changes. ``dry_run`` evaluates and records
    without moving anything.
    """
    target = facts.check_target(target)
    policy = policy or load_policy(policy_path)
    client = client or get_client()
    mv = facts.get_version(client, name, version)  # also answers "no such model"
    version = str(mv.version)
    led = L.Ledger(client)
    with RegistryLock(client, name, purpose=f"promote v{version} to {target}") as lock:
        model = facts.get_model(client, name)  # fresh, under the lock
        current = facts.alias_version(model, target)
        candidate = build_candidate(client, led, name, mv, policy, target, model)
        results = check_gates(policy.target(target), candidate)
        failures = blocking_failures(results)
        runs, digests = lineage(candidate.tags)
        action = L.DRY_RUN if dry_run else (L.REJECT if failures else L.PROMOTE)
        soft = [r for r in results if r.status == "fail" and not r.blocking]
        why = reason or ("; ".join(f"{r.gate}: {r.reason}" for r in failures) if failures else
                         "all enabled gates passed" + (f" (dry-run gates failing: {', '.join(r.gate for r in soft)})" if soft else ""))
        event = L.Event(model=name, action=action, target=target, seq=led.next_seq(name), from_version=current,
                        to_version=version, effective=action == L.PROMOTE, actor=actor(),
                        policy_path=policy.path, policy_digest=policy.digest, gates=[r.to_dict() for r in results],
                        eval_run_ids=runs, data_digests=digests, reason=why)
        if action == L.PROMOTE:
            move_alias(client, led, lock, event)
        else:
            lock.verify()
            led.append(event)
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
