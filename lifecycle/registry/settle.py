"""Settling half-done moves: a pending ledger event is decided from what the registry shows.

Used under the model's lock by ``lifecycle repair`` and by the guard's reconcile, so that a move
killed half-way is recorded as done or failed before anyone compares the alias with the ledger.
Moves of other aliases than staging and production (a canary rollback deletes the challenger's
alias, whatever its name) are settled by :func:`settle_other_aliases`: no policy and no legacy
stage belongs to such an alias, so settling is all there is to do.
"""

from __future__ import annotations

from typing import Any

from lifecycle.registry import TARGETS, facts
from lifecycle.registry import ledger as L
from lifecycle.registry.client import actor
from lifecycle.registry.lock import RegistryLock


def _v(version: str | None) -> str:
    return f"v{version}" if version else "no alias"


def happened(event: L.Event, events: list[L.Event], current: str | None) -> bool:
    """Whether the pending move ``event`` reached the registry.

    The next move of the same alias started from what the registry said under the lock; with none
    after it, the alias itself says. A pure function, tested without a server.
    """
    later = next((f for f in events if f.seq > event.seq and f.target == event.target and f.effective
                  and f.state != L.FAILED), None)
    if later is not None:
        return later.from_version == event.to_version
    return current == event.to_version


def settle(client: Any, led: L.Ledger, lock: RegistryLock, name: str, model: Any, events: list[L.Event],
           target: str, *, by: str = "repair") -> L.Event | None:
    """Settle the pending moves of ``target`` (call under the lock); the ``repair`` event written, or None.

    An unanswered ``guard_failed`` of ``target`` is answered by the same event: the caller goes on
    to compare the alias with the ledger, which is what the guard could not do.

    ``events`` (the model's ledger, read under the lock) is updated in place: settled states, and
    the repair event appended.
    """
    pending = [e for e in L.unsettled(events) if e.target == target]
    # A guard that gave up on this alias is answered by this look, recorded below.
    gave_up = L.guard_failures(events, target)
    if not pending and not gave_up:
        return None
    current = facts.alias_version(model, target)
    notes = [f"looked again after guard_failed #{ev.seq}" for ev in gave_up]
    for ev in pending:
        done = happened(ev, events, current)
        lock.verify()
        led.set_state(ev, L.DONE if done else L.FAILED)
        notes.append(f"#{ev.seq} {ev.action} -> {_v(ev.to_version)} " +
                     ("done (the registry shows the move)" if done else "never happened (marked failed)"))
        if not done and ev.to_version and ev.to_version != current:
            _unmirror(client, name, model, ev)
    if current and target in facts.STAGE_OF:
        # A move killed half-way may have mirrored the stage of one version and not the other.
        facts.mirror_stage(client, name, current, target, None)
    event = L.Event(model=name, action=L.REPAIR, target=target, seq=L.next_seq_of(events, led.damaged.get(name, [])),
                    from_version=current, to_version=current, effective=False, actor=f"{by}:{actor()}",
                    reason=f"settled @{target}: " + "; ".join(notes))
    lock.verify()
    led.append(event)
    events.append(event)
    return event


def _unmirror(client: Any, name: str, model: Any, ev: L.Event) -> None:
    """Undo the stage a move that never happened may have mirrored onto its version."""
    if ev.target not in facts.STAGE_OF:
        return  # no stage mirrors a custom alias
    mv = facts.get_version(client, name, ev.to_version)
    if mv.current_stage != facts.STAGE_OF[ev.target]:
        return
    # Its stage before the move is not recorded; an alias that names it says the most likely one.
    others = {a for a, v in (model.aliases or {}).items() if str(v) == ev.to_version}
    stage = next((facts.STAGE_OF[a] for a in TARGETS if a in others), "None")
    if stage != mv.current_stage:
        facts.transition(client, name, ev.to_version, stage)


def settle_other_aliases(client: Any, name: str, *, by: str = "repair") -> list[L.Event]:
    """Settle the pending moves of aliases other than staging and production; the ``repair`` events written.

    The ledger is read first without the lock (nothing pending: nothing taken), then again under it.
    """
    led = L.Ledger(client)
    if not any(ev.target not in TARGETS for ev in L.unsettled(led.events(name))):
        return []
    written: list[L.Event] = []
    with RegistryLock(client, name, purpose=f"{by} other aliases") as lock:
        events, model = led.events(name), facts.get_model(client, name)
        for target in sorted({ev.target for ev in L.unsettled(events)} - set(TARGETS)):
            event = settle(client, led, lock, name, model, events, target, by=by)
            if event is not None:
                written.append(event)
    return written
