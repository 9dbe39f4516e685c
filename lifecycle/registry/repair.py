"""``lifecycle repair``: bring registry and ledger back into agreement after a crash.

A promote or rollback killed mid-way leaves a *pending* ledger event (written, never confirmed)
and perhaps a moved alias or a half-mirrored stage; a crashed holder leaves its lock behind.
Repair, under the model's lock, for each alias:

1. settles every pending move from what the registry says: a move the registry shows (the alias
   names its version, or the next move started from it) is marked ``done``, any other ``failed``;
   the stages are mirrored again, and a ``repair`` event records what was decided;
2. then, if the alias still disagrees with the ledger, holds it to the policy the way the guard
   does (:func:`lifecycle.registry.guard.reconcile`): a version that passes is recorded, one that
   fails is moved back to the ledger's version.

Pending moves of any other alias (a canary rollback killed half-way deletes a challenger alias of
any name) are settled the same way (step 1); no policy holds such an alias.

``--break-lock`` first removes a stale lock (expired, ownerless, or its holder process gone),
which on a basic-auth server only the lock model's owner or an admin may delete.
"""

from __future__ import annotations

from typing import Any

from lifecycle.policies import load_policy
from lifecycle.registry import TARGETS, facts
from lifecycle.registry.client import get_client
from lifecycle.registry.guard import reconcile
from lifecycle.registry.lock import break_lock
from lifecycle.registry.settle import settle_other_aliases


def repair(name: str, *, policy_path: str | None = None, break_stale_lock: bool = False,
           client: Any = None) -> list[str]:
    """Settle half-done moves and align each alias with the ledger; what was done, one line each."""
    facts.check_name(name)
    policy = load_policy(policy_path)
    client = client or get_client()
    facts.get_model(client, name)
    lines = []
    if break_stale_lock:
        lines.append(break_lock(client, name))
    for target in TARGETS:
        outcome = reconcile(client, policy, name, target, by="repair")
        if outcome is not None:
            lines.extend(outcome.message.splitlines())
    lines.extend(event.reason for event in settle_other_aliases(client, name, by="repair"))
    return lines
