"""Registry commands: promote, rollback, status, history, repair (the guard is in guard_cmd)."""

from __future__ import annotations

import json
from typing import Any

import click

from lifecycle.errors import LifecycleError


def _print_gates(outcome: Any) -> None:
    for r in outcome.gates:
        flag = {"pass": "PASS", "fail": "FAIL", "skipped": "SKIP"}[r.status]
        mode = "" if r.mode == "enabled" else f" [{r.mode}]"
        click.echo(f"  {flag} {r.gate}{mode}: {r.reason}")


@click.command()
@click.argument("name")
@click.argument("version")
@click.option("--to", "to", required=True, help="staging or production.")
@click.option("--policy", "policy", default=None,
              help="Policy YAML (default: ./registry_policies/default.yaml, else the copy in the package).")
@click.option("--dry-run", is_flag=True, help="Evaluate and record the gates; move nothing.")
@click.option("--reason", default="", help="Why (kept in the ledger).")
def promote(name: str, version: str, to: str, policy: str | None, dry_run: bool, reason: str) -> None:
    """Promote VERSION of model NAME to staging or production if the policy's gates pass.

    Exit 3 when a gate refuses (the rejection is recorded in the ledger; nothing moves).
    """
    from lifecycle.registry.promote import promote as do_promote

    try:
        outcome = do_promote(name, version, to, policy_path=policy, dry_run=dry_run, reason=reason)
    except LifecycleError as exc:
        if getattr(exc, "outcome", None) is not None:
            _print_gates(exc.outcome)  # type: ignore[attr-defined]
        raise
    _print_gates(outcome)
    click.echo(f"{outcome.message} (ledger event #{outcome.event.seq})")


@click.command()
@click.argument("name")
@click.option("--to", "to", default=None,
              help="Version to roll back to (default: the one that held production before).")
@click.option("--reason", required=True, help="Why (kept in the ledger).")
@click.option("--expect-current", default=None, help="Act only if production is this version (safe to retry).")
@click.option("--force", is_flag=True, help="Allow a --to version that never passed the production gates.")
def rollback(name: str, to: str | None, reason: str, expect_current: str | None, force: bool) -> None:
    """Move production of NAME back to the version that held it before (from the ledger).

    Safe to retry: with --expect-current V the call acts only while production is V, and is a
    recorded no-op if a rollback from V already happened. Without it, a rollback right after
    another rollback is refused (exit 9) instead of silently going back a second version.
    """
    from lifecycle.registry.rollback import rollback as do_rollback

    outcome = do_rollback(name, reason=reason, to=to, expect_current=expect_current, force=force)
    click.echo(f"{outcome.message} (ledger event #{outcome.event.seq})")


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--last", default=5, show_default=True, help="Ledger events to show.")
def status(name: str, as_json: bool, last: int) -> None:
    """Show aliases, legacy stages and the last ledger events of NAME."""
    from lifecycle.registry.ledger import Event
    from lifecycle.registry.status import format_event
    from lifecycle.registry.status import status as do_status

    info = do_status(name, last=last)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted(info["aliases"].items())) or "none"
    click.echo(f"{name}: aliases {aliases}")
    for problem in info["problems"]:
        click.echo(f"  WARNING {problem}")
    for v in info["versions"]:
        click.echo(f"  v{v['version']:<4} stage {v['stage']:<10} {' '.join('@' + a for a in v['aliases'])}")
    for ev in info["events"]:
        click.echo("  " + format_event(Event(**ev)))


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the events as a JSON list.")
def history(name: str, as_json: bool) -> None:
    """Show every ledger event of NAME in order (* marks events that moved an alias)."""
    from dataclasses import asdict

    from lifecycle.registry.status import format_event
    from lifecycle.registry.status import history as do_history

    events = do_history(name)
    if as_json:
        click.echo(json.dumps([asdict(e) for e in events], indent=2))
        return
    if not events:
        click.echo(f"{name}: no ledger events")
    for ev in events:
        click.echo(format_event(ev))


@click.command()
@click.argument("name")
@click.option("--policy", "policy", default=None,
              help="Policy YAML for aliases moved outside lifecycle (as the guard uses).")
@click.option("--break-lock", "break_stale_lock", is_flag=True,
              help="First delete NAME's registry lock if it is stale (expired, ownerless, or its holder is gone).")
def repair(name: str, policy: str | None, break_stale_lock: bool) -> None:
    """Bring the registry and the ledger of NAME back into agreement after a crash.

    Settles moves that a killed promote/rollback never confirmed (from what the registry shows),
    mirrors the stages again, and holds an alias that still disagrees with the ledger to the
    policy, as the guard does. Each change is recorded as its own ledger event.
    """
    from lifecycle.registry.repair import repair as do_repair

    lines = do_repair(name, policy_path=policy, break_stale_lock=break_stale_lock)
    for line in lines:
        click.echo(line)
    if not any(not line.startswith(f"{name} has no registry lock") for line in lines):
        click.echo(f"{name}: nothing to repair; the registry and the ledger agree")

