"""``lifecycle status`` and ``lifecycle history``: the registry's state and the ledger, read back.

Status says loudly what needs a person: a move that was never confirmed (a command killed
mid-way), an alias that disagrees with the ledger, a guard that gave up on a move, a ledger entry
that cannot be read, a stale lock. Each line names what to run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from lifecycle.registry import TARGETS, facts
from lifecycle.registry import ledger as L
from lifecycle.registry.client import get_client, parallel
from lifecycle.registry.lock import RegistryLock


def problems(name: str, aliases: dict[str, str], events: list[L.Event], damaged: list[L.Damaged],
             lock: Any = None) -> list[str]:
    """What needs a person, one line each (a pure function of what status read)."""
    out = []
    # A live holder of the lock may be making the move right now: not (yet) a problem to repair.
    busy = lock is not None and lock.exists and lock.stale_because() is None
    for ev in L.unsettled(events):
        move = f"event #{ev.seq} ({ev.action} @{ev.target} -> {'v' + ev.to_version if ev.to_version else 'no alias'})"
        if busy:
            out.append(f"IN PROGRESS: {move} is not confirmed yet ({lock.describe()}); if it stays so, "
                       f"run `lifecycle repair {name}`")
        else:
            out.append(f"HALF-DONE: {move} was never confirmed; run `lifecycle repair {name}`")
    for target in TARGETS:
        stack = L.holder_stack(events, target)
        truth = stack[-1] if stack else None
        if aliases.get(target) != truth:
            out.append(f"DISAGREE: @{target} is {'v' + aliases[target] if target in aliases else 'unset'} but the "
                       f"ledger says {'v' + truth if truth else 'unset'}; run `lifecycle repair {name}`")
        failed = L.guard_failures(events, target)
        for ev in failed:
            out.append(f"GUARD FAILED: event #{ev.seq}: the guard gave up on @{target}: {L.preview(ev.reason, 300)}; "
                       f"run `lifecycle repair {name}`")
    for bad in damaged:
        out.append(f"UNREADABLE: ledger entry #{bad.seq} (run {bad.run_id}) is skipped: {bad.why}")
    if lock is not None and lock.exists:
        why = lock.stale_because()
        if why:
            out.append(f"STALE LOCK: {lock.describe()}: {why}; the next command breaks it, or run "
                       f"`lifecycle repair {name} --break-lock`")
    return out


def status(name: str, *, last: int = 5, client: Any = None) -> dict[str, Any]:
    """Aliases, versions with their legacy stages, the last ``last`` ledger events and problems of ``name``."""
    facts.check_name(name)
    client = client or get_client()
    led = L.Ledger(client)
    probe = RegistryLock(client, name)
    model, versions, events, lock = parallel(client, lambda: facts.get_model(client, name),
                                             lambda: facts.list_versions(client, name), lambda: led.events(name),
                                             probe.state)
    damaged = led.damaged.get(name, [])
    stack = L.holder_stack(events, "production")
    aliases = {k: str(v) for k, v in (model.aliases or {}).items()}
    consistent = (not stack and "production" not in aliases) or (bool(stack) and stack[-1] == aliases.get("production"))
    shown = events[-last:] if last > 0 else []
    # A half-done or guard-failed event stays in view however old it is.
    flagged = [e for e in events if e not in shown and (e.state == L.PENDING or e.action == L.GUARD_FAILED)]
    return {
        "name": name,
        "aliases": aliases,
        "versions": [{"version": str(v.version), "stage": v.current_stage,
                      "aliases": sorted(a for a, ver in aliases.items() if ver == str(v.version))}
                     for v in versions],
        "ledger_production": stack[-1] if stack else None,
        "consistent": consistent,
        "problems": problems(name, aliases, events, damaged, lock),
        "damaged": [asdict(d) for d in damaged],
        "events": [asdict(e) for e in flagged + shown],
    }


def history(name: str, *, client: Any = None) -> list[L.Event]:
    """Every readable ledger event of ``name`` in sequence order (unreadable ones are warned about)."""
    facts.check_name(name)
    client = client or get_client()
    facts.get_model(client, name)
    return L.Ledger(client).events(name)


def format_event(ev: L.Event) -> str:
    """One line per event for humans (the reason's control characters shown as escapes)."""
    when = dt.datetime.fromtimestamp(ev.timestamp, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    arrow = f"{'v' + ev.from_version if ev.from_version else '-'} -> {'v' + ev.to_version if ev.to_version else '-'}"
    mark = ("*" if ev.effective and ev.done else "?" if ev.state == L.PENDING
            else "x" if ev.state == L.FAILED else " ")
    gates = ""
    if ev.gates:
        failed = [g.get("gate", "?") for g in ev.gates if g.get("status") == "fail"]
        gates = (f" gates {len(ev.gates) - len(failed)}/{len(ev.gates)} pass"
                 + (f" (failed: {', '.join(failed)})" if failed else ""))
    state = {L.PENDING: " [HALF-DONE: never confirmed]", L.FAILED: " [did not happen]"}.get(ev.state, "")
    detail = f" ({L.preview(ev.detail, 2000)})" if ev.detail else ""
    return (f"#{ev.seq:<4}{mark} {when}Z {ev.action:<16} {ev.target:<10} {arrow:<14} by {L.preview(ev.actor, 200)}"
            f"{gates}{state}: {L.preview(ev.reason, 20_000)}{detail}")
