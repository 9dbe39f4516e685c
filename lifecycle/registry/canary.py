"""Canary rollouts in the registry: which versions are the arms, and the ledger events of a canary.

* :func:`arms` resolves production and the challenger alias to versions (a missing alias, the same
  version on both arms: one-line errors, nothing written);
* :func:`current_challenger` is the alias of the canary in progress, as its newest ``canary_start``
  recorded it (what ``lifecycle canary`` compares when ``--challenger`` is not given);
* :func:`start` records ``canary_start`` and sets the share the router reads
  (:data:`~lifecycle.serving.router.SHARE_TAG`); :func:`step` raises it to the policy's next step
  (``canary_step``);
* :func:`record_verdict` records a ``canary_verdict`` with every figure as a gate entry (the
  production gate and the report read them back);
* :func:`rollback` deletes the challenger alias as a ledger-recorded move (``canary_rollback``,
  pending until confirmed, like every move), so the router, which follows the aliases, stops
  sending it traffic without a restart.

Every write happens under the model's registry lock, after checking that the arms still are what
the caller compared (:class:`ConcurrencyError` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lifecycle.errors import ConcurrencyError, ConfigError, NotFoundError
from lifecycle.registry import facts
from lifecycle.registry import ledger as L
from lifecycle.registry.client import actor, call, get_client
from lifecycle.registry.lock import RegistryLock
from lifecycle.registry.promote import move_alias, record_only
from lifecycle.serving.router import SHARE_TAG, tag_share

#: Ledger events of a canary name the production endpoint as their target (the rollback names the alias).
TARGET = "production"


@dataclass(frozen=True)
class ArmVersions:
    """The versions behind production and the challenger alias, and the share the registry holds."""

    production: str
    challenger: str
    challenger_alias: str
    share: float | None


def _share(model: Any) -> float | None:
    # As the router reads it: a hand-edited tag that is no share (nan, 5) is no share here either, so
    # --act starts the policy's steps over instead of taking the canary for finished and promoting.
    return tag_share((model.tags or {}).get(SHARE_TAG))


def arms(name: str, challenger_alias: str, *, production_alias: str = "production", client: Any = None) -> ArmVersions:
    """Resolve both arms; NotFoundError for a missing alias, ConfigError when both name one version.

    An empty challenger alias, or the production alias itself, is refused (ConfigError) before the registry is read.
    """
    facts.check_name(name)
    if not challenger_alias.strip():
        raise ConfigError(f"the challenger alias is empty: name it (e.g. staging), got {challenger_alias!r}")
    if challenger_alias == production_alias:
        raise ConfigError(f"@{challenger_alias} is the production alias itself: name the challenger's alias "
                          "(e.g. staging)")
    client = client or get_client()
    model = facts.get_model(client, name)
    aliases = dict(model.aliases or {})
    listing = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
    prod = facts.alias_version(model, production_alias)
    if prod is None:
        raise NotFoundError(f"{name} has no @{production_alias} alias to compare against (aliases: {listing})")
    chal = facts.alias_version(model, challenger_alias)
    if chal is None:
        raise NotFoundError(f"{name} has no @{challenger_alias} alias for the challenger (aliases: {listing})")
    if chal == prod:
        raise ConfigError(f"@{challenger_alias} and @{production_alias} both name {name} v{prod}: a canary needs "
                          "two different versions")
    return ArmVersions(production=prod, challenger=chal, challenger_alias=challenger_alias, share=_share(model))


def _held(client: Any, name: str, expected: ArmVersions) -> Any:
    """Under the lock: the model, after checking that the arms are still ``expected``."""
    model = facts.get_model(client, name)
    now = (facts.alias_version(model, "production"), facts.alias_version(model, expected.challenger_alias))
    if now != (expected.production, expected.challenger):
        raise ConcurrencyError(f"{name} changed meanwhile: production is v{now[0]}, @{expected.challenger_alias} is "
                               f"v{now[1]} (expected v{expected.production} and v{expected.challenger}); run again")
    return model


def _event(name: str, action: str, a: ArmVersions, seq: int, reason: str, **kw: Any) -> L.Event:
    return L.Event(model=name, action=action, target=TARGET, seq=seq, from_version=a.production,
                   to_version=a.challenger, actor=actor(), reason=reason, challenger_alias=a.challenger_alias, **kw)


def _record(name: str, a: ArmVersions, action: str, reason: str, *, share: float | None = None,
            client: Any = None, **kw: Any) -> L.Event:
    """Record a canary event that moves no alias (and set the share tag first when given)."""
    client = client or get_client()
    led = L.Ledger(client)
    lock = RegistryLock(client, name, purpose=action)
    try:
        lock.acquire()
        _held(client, name, a)
        event = _event(name, action, a, led.next_seq(name), reason, **kw)
        if share is not None:
            lock.verify()
            call("set the canary share", client.set_registered_model_tag, name, SHARE_TAG, repr(float(share)))
        record_only(client, led, lock, event)
    finally:
        lock.release()
    return event


def start(name: str, a: ArmVersions, *, mode: str, share: float | None, client: Any = None) -> L.Event:
    """Record ``canary_start`` (mode, alias, share) and set the share the router reads (canary mode)."""
    what = f"canary at share {share:g}" if mode == "canary" else "shadow (copies only)"
    reason = f"{what}: v{a.challenger} (@{a.challenger_alias}) beside production v{a.production}"
    return _record(name, a, L.CANARY_START, reason, share=share if mode == "canary" else None, client=client)


def step(name: str, a: ArmVersions, share: float, *, client: Any = None) -> L.Event:
    """Raise the canary's share to ``share`` (``canary_step``)."""
    reason = f"canary share {a.share if a.share is not None else '?'} -> {share:g} for v{a.challenger}"
    return _record(name, a, L.CANARY_STEP, reason, share=share, client=client)


def record_verdict(name: str, a: ArmVersions, *, code: int, reason: str, gates: list[dict[str, Any]],
                   policy: Any, requests: tuple[int, int] = (0, 0), shadow_dropped: int = 0,
                   records_skipped: int = 0, client: Any = None) -> L.Event:
    """Record ``canary_verdict``: the code, each arm's request count, the shadow copies dropped under load
    (counted apart, never as errors) and the damaged record lines skipped (the evidence the verdict lacks)
    as the first gate entry (``kind`` canary_verdict), then the figures."""
    head = {"gate": "canary verdict", "kind": "canary_verdict", "mode": policy.canary.mode if policy.canary else
            "disabled", "status": {0: "pass", 11: "fail"}.get(code, "undecided"), "reason": reason, "code": code,
            "production": requests[0], "challenger": requests[1], "shadow_dropped": shadow_dropped,
            "records_skipped": records_skipped}
    return _record(name, a, L.CANARY_VERDICT, f"verdict {code}: {reason}", client=client, gates=[head, *gates],
                   policy_path=policy.path, policy_digest=policy.digest)


def rollback(name: str, a: ArmVersions, *, reason: str, gates: list[dict[str, Any]], policy: Any,
             client: Any = None) -> L.Event:
    """Take the challenger out: delete its alias as a recorded move (``canary_rollback``)."""
    client = client or get_client()
    led = L.Ledger(client)
    lock = RegistryLock(client, name, purpose=f"canary rollback of v{a.challenger}")
    try:
        lock.acquire()
        _held(client, name, a)
        event = L.Event(model=name, action=L.CANARY_ROLLBACK, target=a.challenger_alias, seq=led.next_seq(name),
                        from_version=a.challenger, to_version=None, effective=True, actor=actor(),
                        reason=reason, gates=gates, policy_path=policy.path, policy_digest=policy.digest,
                        detail=f"production v{a.production} kept; @{a.challenger_alias} deleted",
                        challenger_alias=a.challenger_alias)
        move_alias(client, led, lock, event)
    finally:
        lock.release()
    return event


@dataclass(frozen=True)
class InProgress:
    """The canary in progress: its challenger alias and the ``canary_start`` event that named it."""

    challenger_alias: str
    start: L.Event


def current_challenger(name: str, *, production_alias: str = "production", client: Any = None) -> InProgress:
    """The challenger alias of ``name``'s canary in progress, as its newest ``canary_start`` recorded it.

    In progress means what the router does: that alias still exists and names another version than
    production (a canary rollback deletes it; a promotion makes both name one version). Otherwise, or
    without any ``canary_start``, :class:`ConfigError` (exit 2) saying so; a missing model is
    :class:`NotFoundError` (exit 5), as with an explicit alias.
    """
    facts.check_name(name)
    client = client or get_client()
    model = facts.get_model(client, name)
    start_event = L.Ledger(client).last_action(name, L.CANARY_START)
    if start_event is None:
        raise ConfigError(f"{name} has no canary in progress (its ledger holds no canary_start): start one with "
                          f"`lifecycle serve {name} --canary ALIAS`, or name the challenger with --challenger ALIAS")
    alias = start_event.challenger_alias
    if not alias:
        raise ConfigError(f"{name}'s newest canary_start (#{start_event.seq}) does not name its challenger alias "
                          "(recorded by an older lifecycle): name it with --challenger ALIAS")
    chal, prod = facts.alias_version(model, alias), facts.alias_version(model, production_alias)
    if chal is None:
        raise ConfigError(f"{name} has no canary in progress: @{alias}, the challenger of canary_start "
                          f"#{start_event.seq}, no longer exists (rolled back?)")
    if chal == prod:
        raise ConfigError(f"{name} has no canary in progress: @{alias}, the challenger of canary_start "
                          f"#{start_event.seq}, names production's version v{prod} (promoted)")
    return InProgress(challenger_alias=alias, start=start_event)


def started_at(name: str, challenger: str, *, client: Any = None) -> float | None:
    """When the newest ``canary_start`` of version ``challenger`` was recorded (None: never)."""
    event = L.Ledger(client or get_client()).last_action(name, L.CANARY_START, to_version=challenger)
    return event.timestamp if event else None


def next_share(steps: tuple[float, ...], current: float | None) -> float | None:
    """The policy's next share step above ``current`` (None when the canary already is at the last step)."""
    for s in steps:
        if current is None or s > current + 1e-12:
            return s
    return None
