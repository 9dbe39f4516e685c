"""``lifecycle rollback``: move production back to the version that held it before (from the ledger).

Double-rollback protection (a retried CI job must not skip back two versions):

* ``--expect-current V`` fences the call: it acts only while production is V. If production is no
  longer V because a rollback *from V* already happened, the call is a recorded no-op (exit 0);
  any other mismatch is refused (exit 9).
* Without ``--expect-current`` (and without ``--to``), a rollback right after another rollback is
  refused: going back further must be asked for explicitly with ``--expect-current``.
* "Before" comes from the ledger's stack of production holders, never "version minus one".

Every call, refused or not, writes exactly one ledger event; refused input (a bad name, reason or
version) is refused before anything is written. The plan counts confirmed moves only: a promotion
killed before its move was confirmed never makes production go *forward* to its version.
"""

from __future__ import annotations

import logging
from typing import Any

from lifecycle.errors import ConcurrencyError, ConfigError, GateRejected, LifecycleError, NotFoundError
from lifecycle.registry import facts
from lifecycle.registry import ledger as L
from lifecycle.registry.client import actor, get_client, parallel
from lifecycle.registry.lock import RegistryLock
from lifecycle.registry.promote import Outcome, lineage, mark_text, move_alias, record_only

TARGET = "production"
log = logging.getLogger(__name__)


def plan_rollback(events: list[L.Event], current: str | None, *, to: str | None, expect_current: str | None,
                  force: bool) -> tuple[str, str | None, str]:
    """Decide a rollback from the ledger alone: ``(action, target_version, explanation)``.

    ``action`` is ``rollback``, ``rollback_noop`` or ``rollback_refused``; a pure function so the
    fencing rules are tested without a server.
    """
    prod_events = [e for e in events if e.target == TARGET and e.effective and e.done]
    last = prod_events[-1] if prod_events else None
    if expect_current is not None and current != expect_current:
        if last is not None and last.action == L.ROLLBACK and last.from_version == expect_current:
            return L.ROLLBACK_NOOP, current, (f"production already rolled back from v{expect_current} to "
                                              f"v{current} by event #{last.seq}; nothing to do")
        return L.ROLLBACK_REFUSED, None, (f"production is {'v' + current if current else 'unset'}, not the "
                                          f"expected v{expect_current}; refusing (someone else changed it)")
    if to is None and expect_current is None and last is not None and last.action == L.ROLLBACK:
        return L.ROLLBACK_REFUSED, None, (f"production was just rolled back to v{last.to_version} (event #{last.seq}); "
                                          f"to go back further pass --expect-current {last.to_version}")
    if to is not None:
        if to == current:
            return L.ROLLBACK_NOOP, current, f"production already is v{to}"
        if not force and not L.passed_production(events, to):
            return L.ROLLBACK_REFUSED, None, (f"v{to} never passed the production gates (no promotion in the "
                                              f"ledger); use --force to roll back to it anyway")
        return L.ROLLBACK, to, f"rollback to v{to} as requested"
    stack = L.holder_stack(events, TARGET)
    # Out-of-band moves (not in the ledger): "before" is the ledger's own last holder.
    below = stack if (not stack or stack[-1] != current) else stack[:-1]
    for version in reversed(below):
        if version is not None and version != current:
            return L.ROLLBACK, version, f"back to v{version}, which held production before v{current}"
    return L.ROLLBACK_REFUSED, None, (f"no earlier production version in the ledger "
                                      f"(production is {'v' + current if current else 'unset'})")


def rollback(name: str, *, reason: str, to: str | None = None, expect_current: str | None = None,
             force: bool = False, client: Any = None) -> Outcome:
    """Roll production back; see the module docstring for the fencing rules.

    Raises :class:`NotFoundError` when there is no earlier version, :class:`GateRejected` for a
    version that never passed the production gates (without ``force``), and
    :class:`ConcurrencyError` when fencing refuses. Each of those is recorded in the ledger.
    """
    facts.check_name(name)
    if not (reason or "").strip():
        raise ConfigError("rollback needs --reason TEXT (it goes into the ledger)")
    L.check_text(reason)
    if to is not None:
        if not str(to).strip().isdigit():
            raise ConfigError(f"version must be a number, got {to!r}")
        to = str(int(to))
    if expect_current is not None:
        expect_current = str(int(expect_current)) if str(expect_current).strip().isdigit() else expect_current
    client = client or get_client()
    led = L.Ledger(client)
    lock = RegistryLock(client, name, purpose="rollback")
    try:
        # A missing model or --to version is refused before anything is written (its error wins).
        exists = ((lambda: facts.get_version(client, name, to)) if to is not None
                  else (lambda: facts.get_model(client, name)))
        parallel(client, exists, lock.acquire, led.experiment_id)
        # One round under the lock: the model (aliases), its whole ledger, every version (tags and
        # stages of whichever the plan picks), and the mark that checks our write permission.
        model, events, versions, _ = parallel(
            client, lambda: facts.get_model(client, name), lambda: led.events(name),
            lambda: facts.list_versions(client, name),
            lambda: facts.mark(client, name, mark_text(f"rollback ({reason.strip()[:200]})")))
        by_number = {str(v.version): v for v in versions}
        if to is not None and to not in by_number and len(versions) < 1000:
            raise facts.missing_version(name, to, versions)
        current = facts.alias_version(model, TARGET)
        action, target, why = plan_rollback(events, current, to=to, expect_current=expect_current, force=force)
        for half in L.unsettled(events):
            log.warning("%s: ledger event #%d (%s %s -> %s) was never confirmed; it does not count "
                        "(run `lifecycle repair %s`)", name, half.seq, half.action, half.target, half.to_version, name)
        prod_events = [e for e in events if e.target == TARGET and e.effective and e.done]
        seq = L.next_seq_of(events, led.damaged.get(name, []))
        event = L.Event(model=name, action=action, target=TARGET, seq=seq,
                        from_version=current, to_version=target, effective=action == L.ROLLBACK,
                        actor=actor(), reason=reason, detail=why,
                        reverts=prod_events[-1].seq if prod_events and action == L.ROLLBACK else None)
        if action == L.ROLLBACK:
            # A deleted version cannot take production (a version list past 1000 is read directly).
            mv = by_number.get(target) or facts.get_version(client, name, target)
            event.eval_run_ids, event.data_digests = lineage(dict(mv.tags or {}))
            replaced = by_number.get(current) if current else None
            move_alias(client, led, lock, event, version_stage=mv.current_stage,
                       replaced_stage=replaced.current_stage if replaced is not None else None)
        else:
            record_only(client, led, lock, event)
    finally:
        lock.release()
    outcome = Outcome(event=event, moved=action == L.ROLLBACK, message=why)
    if action == L.ROLLBACK_REFUSED:
        err: LifecycleError
        if "never passed" in why:
            err = GateRejected(f"{name}: {why}")
        elif "no earlier production version" in why:
            err = NotFoundError(f"{name}: {why}")
        else:
            err = ConcurrencyError(f"{name}: {why}")
        err.outcome = outcome  # type: ignore[attr-defined]
        raise err
    if action == L.ROLLBACK:
        outcome.message = f"{name}@production -> v{target} (was v{current}): {why}"
    return outcome
