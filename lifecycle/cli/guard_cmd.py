"""``lifecycle guard``: the webhook guard that holds registry-UI alias moves to the policy (serve / install)."""

from __future__ import annotations

import os

import click

from lifecycle.cli.params import FloatRange, IntRange


@click.group()
def guard() -> None:
    """The webhook guard that holds registry-UI alias moves to the policy."""


@guard.command("serve")
@click.option("--policy", "policy", default=None,
              help="Policy YAML (default: ./registry_policies/default.yaml, else the copy in the package).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, type=IntRange(0, 65535))
@click.option("--secret", default=None, help="Webhook secret (default: env LIFECYCLE_GUARD_SECRET).")
@click.option("--max-attempts", default=8, show_default=True, type=IntRange(min=1),
              help="Reconcile tries per delivery before a guard_failed ledger event is recorded.")
@click.option("--retry-delay", default=1.0, show_default=True, type=FloatRange(min=0.001, max=86_399),
              help="Seconds before the first retry of a failed reconcile; doubles per attempt.")
@click.option("--retry-max-delay", default=60.0, show_default=True, type=FloatRange(min=0.001, max=86_399),
              help="Longest wait between retries.")
@click.option("--queue-size", default=256, show_default=True, type=IntRange(min=1),
              help="Reconciles that may wait; when full, deliveries get 503 (MLflow retries them).")
@click.option("--read-timeout", default=10.0, show_default=True, type=FloatRange(min=0.001, max=86_399),
              help="Seconds a client has to send a request's headers, and then its body (else 408).")
@click.option("--max-connections", default=64, show_default=True, type=IntRange(min=1),
              help="Open connections; more get 503.")
def guard_serve(policy: str | None, host: str, port: int, secret: str | None, max_attempts: int,
                retry_delay: float, retry_max_delay: float, queue_size: int, read_timeout: float,
                max_connections: int) -> None:
    """Receive registry webhooks and revert alias moves that fail the policy."""
    from lifecycle.registry.guard_http import serve
    from lifecycle.registry.receiver import GuardSettings

    settings = GuardSettings(max_attempts=max_attempts, retry_delay_s=retry_delay, retry_max_delay_s=retry_max_delay,
                             queue_size=queue_size, read_timeout_s=read_timeout, max_connections=max_connections)
    serve(policy_path=policy, host=host, port=port, secret=secret or os.environ.get("LIFECYCLE_GUARD_SECRET"),
          settings=settings)


@guard.command("install")
@click.option("--url", required=True, help="Where the guard listens, e.g. http://127.0.0.1:8787/webhook.")
@click.option("--secret", default=None, help="Webhook secret (default: env LIFECYCLE_GUARD_SECRET).")
@click.option("--name", "hook_name", default="lifecycle-guard", show_default=True)
def guard_install(url: str, secret: str | None, hook_name: str) -> None:
    """Register (or update) the guard's webhook with the tracking server."""
    from lifecycle.registry.receiver import install

    hook = install(url, secret=secret or os.environ.get("LIFECYCLE_GUARD_SECRET"), name=hook_name)
    events = ", ".join(f"{e.entity.value}.{e.action.value}" for e in hook.events)
    click.echo(f"webhook {hook.webhook_id} -> {hook.url} ({events})")
