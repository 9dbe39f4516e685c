"""``lifecycle status`` and ``lifecycle history``: the registry's state and the ledger, read back."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from lifecycle.registry import facts, ledger as L
from lifecycle.registry.client import get_client, parallel


def status(name: str, *, last: int = 5, client: Any = None) -> dict[str, Any]:
    """Aliases, versions with their legacy stages, and the last ``last`` ledger events of ``name``."""
    client = client or get_client()
    led = L.Ledger(client)
    model, versions, events = parallel(client, lambda: facts.get_model(client, name),
                                       lambda: facts.list_versions(client, name), lambda: led.events(name))
    stack = L.holder_stack(events, "production")
    aliases = {k: str(v) for k, v in (model.aliases or {}).items()}
    consistent = (not stack and "production" not in aliases) or (bool(stack) and stack[-1] == aliases.get("production"))
    return {
        "name": name,
        "aliases": aliases,
        "versions": [{"version": str(v.version), "stage": v.current_stage,
                      "aliases": sorted(a for a, ver in aliases.items() if ver == str(v.version))}
                     for v in versions],
        "ledger_production": stack[-1] if stack else None,
        "consistent": consistent,
        "events": [asdict(e) for e in events[-last:]],
    }


def history(name: str, *, client: Any = None) -> list[L.Event]:
    """Every ledger event of ``name`` in sequence order."""
    client = client or get_client()
    facts.get_model(client, name)
    return L.Ledger(client).events(name)


def format_event(ev: L.Event) -> str:
    """One line per event for humans."""
    when = dt.datetime.fromtimestamp(ev.timestamp, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    arrow = f"{'v' + ev.from_version if ev.from_version else '-'} -> {'v' + ev.to_version if ev.to_version else '-'}"
    mark = "*" if ev.effective else " "
    gates = ""
    if ev.gates:
        failed = [g["gate"] for g in ev.gates if g.get("status") == "fail"]
        gates = f" gates {len(ev.gates) - len(failed)}/{len(ev.gates)} pass" + (f" (failed: {', '.join(failed)})" if failed else "")
    return f"#{ev.seq:<4}{mark} {when}Z {ev.action:<16} {ev.target:<10} {arrow:<14} by {ev.actor}{gates}: {ev.reason}"
