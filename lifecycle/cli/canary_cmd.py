"""``lifecycle canary``: compare the challenger with production on live traffic, and act on the verdict."""

from __future__ import annotations

import math
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import click

from lifecycle.cli.monitor_cmd import records_option, since_option


@click.command("canary")
@click.argument("name")
@click.option("--challenger", "challenger_alias", default=None,
              help="Alias of the challenger (what `lifecycle serve --canary/--shadow` was given). Default: the one "
                   "the newest canary_start in NAME's ledger recorded; exit 2 when no canary is in progress.")
@since_option
@records_option
@click.option("--policy", type=click.Path(dir_okay=False),
              help="Policy file whose 'canary' section holds the minimum requests, allowed deltas, share steps and "
                   "mode (default registry_policies/default.yaml).")
@click.option("--act", is_flag=True, default=False,
              help="Act on the verdict when the policy's canary mode is enabled: 0 -> next share step, or promote "
                   "the challenger to production; 11 -> delete the challenger alias (canary_rollback).")
def canary(name: str, challenger_alias: str | None, since: str | None, records: str | None, policy: str | None,
           act: bool) -> None:
    """Compare NAME's challenger with production on the records of a window, and print a verdict.

    The challenger is --challenger ALIAS, by default the alias of the canary in progress (the newest
    canary_start of NAME's ledger; exit 2 when there is none, or its alias was rolled back or promoted).

    The window starts at --since; by default 24h ago, but not before the challenger's newest canary_start.
    Exits 0 (the challenger holds: ready for the next step or promotion), 10 (not enough evidence
    yet) or 11 (the challenger is worse: roll back). Every run records a canary_verdict event.
    """
    from lifecycle.monitoring.canary import compare, split_arms
    from lifecycle.monitoring.records import load_records, parse_since, records_path
    from lifecycle.policies import load_policy
    from lifecycle.policies.schema import CanaryPolicy
    from lifecycle.registry import canary as registry_canary

    # Everything the user gave is checked before the registry is read or written.
    pol = load_policy(policy)
    rules = pol.canary or CanaryPolicy()
    start = parse_since(since or "24h")
    path = records_path(records)
    origin = ""
    if challenger_alias is None:
        progress = registry_canary.current_challenger(name)
        challenger_alias, origin = progress.challenger_alias, f", from canary_start #{progress.start.seq}"
    arms = registry_canary.arms(name, challenger_alias)
    began = registry_canary.started_at(name, arms.challenger) if since is None else None
    if began is not None:
        # The default window holds this challenger's canary only (an explicit --since is taken as given).
        began_at = datetime.fromtimestamp(began, tz=timezone.utc) - timedelta(seconds=1)
        start = max(start, began_at)
    read = load_records(path)
    split = split_arms(read.records, name=name, production=arms.production, challenger=arms.challenger, since=start)
    verdict = compare(split.production, split.challenger, rules, shadow_dropped=split.shadow_dropped)
    shadow = split.roles.get("shadow", 0) > 0
    window = start.isoformat(timespec="seconds") if start else "the beginning"
    click.echo(f"{name}: production v{arms.production} vs {'shadow' if shadow else 'canary'} v{arms.challenger} "
               f"(@{challenger_alias}{origin}) since {window}")
    for c in verdict.comparisons:
        click.echo(f"  {c.metric:<22} production {_f(c.production):>10}  challenger {_f(c.challenger):>10}  "
                   f"excess {_f(c.excess):>9} [{_f(c.low)}, {_f(c.high)}] allowed {_f(c.allowed)}  {c.status}")
    click.echo(f"  requests: production {verdict.production.requests}, challenger {verdict.challenger.requests}"
               + (f", shadow copies dropped {verdict.shadow_dropped} (queue full; not errors)"
                  if verdict.shadow_dropped else "")
               + (f", damaged lines skipped {len(read.skipped)}" if read.skipped else "")
               + (f", other models' records left out {sum(split.other_models.values())}"
                  if split.other_models else ""))
    gates = [dict(c.to_gate(), mode=rules.mode) for c in verdict.comparisons]
    event = registry_canary.record_verdict(name, arms, code=verdict.code, reason=verdict.reason, gates=gates,
                                           policy=pol, requests=(verdict.production.requests,
                                                                 verdict.challenger.requests),
                                           shadow_dropped=verdict.shadow_dropped,
                                           records_skipped=len(read.skipped))
    click.echo(f"Verdict: {verdict.code} ({verdict.word}: {verdict.reason}) [ledger #{event.seq}]")
    if act:
        _act(name, arms, verdict, gates, pol, shadow=shadow)
    if verdict.code:
        sys.exit(verdict.code)


def _act(name: str, arms: Any, verdict: Any, gates: list[dict[str, Any]], pol: Any, *, shadow: bool) -> None:
    """What --act does with the verdict (the policy's canary mode decides whether it may)."""
    from lifecycle.monitoring.canary import HOLDS, WORSE
    from lifecycle.policies.schema import CanaryPolicy
    from lifecycle.registry import canary as registry_canary

    rules = pol.canary or CanaryPolicy()
    if verdict.code == HOLDS:
        nxt = None if shadow else registry_canary.next_share(rules.share_steps, arms.share)
        plan = (f"raise the canary share to {nxt:g}" if nxt is not None
                else f"promote v{arms.challenger} to production")
    elif verdict.code == WORSE:
        plan = f"take v{arms.challenger} out of the canary (delete @{arms.challenger_alias})"
    else:
        click.echo("Act: nothing to do until the verdict is 0 or 11")
        return
    if rules.mode != "enabled":
        click.echo(f"Act: the policy's canary mode is {rules.mode}: would {plan}; nothing changed")
        return
    if verdict.code == WORSE:
        event = registry_canary.rollback(name, arms, reason=f"canary verdict 11: {verdict.reason}", gates=gates,
                                         policy=pol)
        click.echo(f"Act: rolled back: @{arms.challenger_alias} deleted, production stays v{arms.production} "
                   f"[ledger #{event.seq}]")
    elif nxt is not None:
        event = registry_canary.step(name, arms, nxt)
        click.echo(f"Act: canary share -> {nxt:g} [ledger #{event.seq}]")
    else:
        from lifecycle.registry.promote import promote

        outcome = promote(name, arms.challenger, "production", policy=pol,
                          reason=f"canary verdict 0 on live traffic: {verdict.reason}")
        click.echo(f"Act: promoted: {outcome.message} [ledger #{outcome.event.seq}]")


def _f(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"
