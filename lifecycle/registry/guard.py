"""The guard for registry-UI promotions: a webhook receiver that holds alias moves to the policy.

MLflow (3.3+, ``mlflow server`` with a SQL backend) posts ``model_version_alias.created`` /
``.deleted`` events. The payload names neither the version the alias left nor who moved it, so
the guard treats each event as a hint and *reconciles*: under the model's lock it compares the
alias with what the ledger says it should be. Our own promote/rollback record their move in the
ledger before making it, so they reconcile to "nothing to do". Anything else is a move made
outside lifecycle (the UI, a raw API call): a version that passes the policy is recorded as
``ui_promote``; one that fails is moved back to the ledger's version (or the alias deleted if the
ledger has none) and recorded as ``guard_revert``. A deleted alias that the ledger says should
exist is restored.

The HTTP receiver that feeds :func:`reconcile` is :mod:`lifecycle.registry.receiver` (checks,
queue, retries) and :mod:`lifecycle.registry.guard_http` (the server); the signature check is
:mod:`lifecycle.registry.signature`.
"""

from __future__ import annotations

import logging
from typing import Any

from lifecycle.policies import Policy, blocking_failures, check_gates
from lifecycle.registry import TARGETS, facts
from lifecycle.registry import ledger as L
from lifecycle.registry.client import actor, parallel
from lifecycle.registry.lock import RegistryLock, is_lock_model
from lifecycle.registry.promote import Outcome, lineage, move_alias, read_snapshot
from lifecycle.registry.settle import settle
from lifecycle.registry.signature import MAX_SKEW_S, sign, verify_signature  # noqa: F401 - the guard's API

log = logging.getLogger(__name__)


def reconcile(client: Any, policy: Policy, name: str, alias: str, *, by: str = "guard") -> Outcome | None:
    """Bring alias ``alias`` of ``name`` back in line with the ledger and the policy.

    Under the model's lock, half-done moves (a promote or rollback killed before it confirmed its
    move) are first settled from what the registry shows (:func:`lifecycle.registry.settle.settle`);
    then an alias that still disagrees with the ledger is held to the policy. ``by`` names who
    acts in the events' actor (``guard`` or ``repair``). Returns the recorded outcome, or None
    when the alias already agreed with the ledger and nothing was pending.
    """
    if alias not in TARGETS or is_lock_model(name):
        return None
    led = L.Ledger(client)
    with RegistryLock(client, name, purpose=f"{by} {alias}") as lock:
        events, model = parallel(client, lambda: led.events(name), lambda: facts.get_model(client, name))
        settled = settle(client, led, lock, name, model, events, alias, by=by)
        stack = L.holder_stack(events, alias)
        truth = stack[-1] if stack else None
        current = facts.alias_version(model, alias)
        if current == truth:
            return Outcome(event=settled, moved=False, message=settled.reason) if settled else None
        notes = f"{settled.reason}\n" if settled else ""
        seq = L.next_seq_of(events, led.damaged.get(name, []))
        base = dict(model=name, target=alias, seq=seq, actor=f"{by}:{actor()}", policy_path=policy.path,
                    policy_digest=policy.digest)
        if current is None:
            event = L.Event(action=L.GUARD_REVERT, from_version=None, to_version=truth, effective=True,
                            reason=f"@{alias} was deleted outside lifecycle; restored to v{truth} (use rollback)",
                            **base)
            move_alias(client, led, lock, event)
            return Outcome(event=event, moved=True, message=notes + event.reason)
        candidate = read_snapshot(client, led, name, current, policy, alias).candidate
        results = check_gates(policy.target(alias), candidate)
        failures = blocking_failures(results)
        runs, digests = lineage(dict(candidate.tags))
        gates = [r.to_dict() for r in results]
        if failures:
            why = "; ".join(f"{r.gate}: {r.reason}" for r in failures)
            event = L.Event(action=L.GUARD_REVERT, from_version=current, to_version=truth, effective=True,
                            gates=gates, eval_run_ids=runs, data_digests=digests,
                            reason=f"@{alias} moved to v{current} outside lifecycle and refused by the policy "
                                   f"({why}); reverted to {'v' + truth if truth else 'no alias'}", **base)
            move_alias(client, led, lock, event)
            return Outcome(event=event, gates=results, moved=True, message=notes + event.reason)
        event = L.Event(action=L.UI_PROMOTE, from_version=truth, to_version=current, effective=True, gates=gates,
                        eval_run_ids=runs, data_digests=digests,
                        reason=f"@{alias} moved to v{current} outside lifecycle; the policy passed: recorded", **base)
        lock.verify()
        # Mirror the stage before recording: whoever sees the ledger event (a person, a test, the
        # report) then also sees `models:/NAME/Production` agree with the alias.
        facts.mirror_stage(client, name, current, alias, truth)
        led.append(event)
        return Outcome(event=event, gates=results, moved=False, message=notes + event.reason)
