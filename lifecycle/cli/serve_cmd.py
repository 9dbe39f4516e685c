"""``lifecycle serve``: `mlflow models serve` for a registered model, with our settings in the env.

It resolves ``models:/NAME@ALIAS`` (or ``/VERSION``) first, so a missing alias is a one-line
error with what exists instead of a server that dies while loading, checks that the port is in
range and free (exit 2 otherwise), then replaces itself with ``mlflow models serve -m URI
--env-manager local`` (signals and exit code are the server's own), with this interpreter's
``bin`` first on PATH so that the server's ``uvicorn`` is found without an activated virtualenv.

With ``--canary ALIAS --canary-share S`` or ``--shadow ALIAS`` it serves the routing pyfunc model
(:mod:`lifecycle.serving.router_model`) instead, saved to a fresh temporary folder: production and
the version behind ALIAS in one endpoint. Bad input (a share outside (0, 1), a missing alias, the
same version on both arms) is refused before anything is written; then ``canary_start`` is
recorded in the ledger. It then becomes a small supervisor of ``mlflow models serve``
(:mod:`lifecycle.serving.router_folder`) that removes the folder when the server stops; folders
that crashed servers left behind are swept at the next start.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from lifecycle.cli.params import FLOAT, INT
from lifecycle.errors import ConfigError
from lifecycle.serving.launch import check_port, serve_env

log = logging.getLogger(__name__)


@click.command("serve")
@click.argument("name")
@click.option("--alias", default="production", show_default=True, help="Registry alias to serve.")
@click.option("--version", "version", default=None, help="Serve this version number instead of an alias.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", "-p", default=5001, show_default=True, type=INT,
              help="Port to listen on (1-65535; out of range or in use: exit 2).")
@click.option("--workers", "-w", default=1, show_default=True, type=INT,
              help="Server worker processes (each loads its own copy of the model; on one GPU prefer 1).")
@click.option("--device", default=None,
              help="cuda, cuda:N or cpu (default: CUDA when available; an int8-dynamic variant falls back to cpu).")
@click.option("--max-batch-size", type=INT, default=None, help="Most rows per generate call.")
@click.option("--batch-wait-ms", type=FLOAT, default=None,
              help="Longest a starting batch waits for requests still being parsed (default 5; a lone request "
                   "never waits).")
@click.option("--coalesce/--no-coalesce", default=None, help="Batch concurrent requests together (default on).")
@click.option("--max-new-tokens-cap", type=INT, default=None, help="Largest max_new_tokens a request may ask for.")
@click.option("--max-prompt-tokens", type=INT, default=None, help="Cap on prompt tokens.")
@click.option("--max-rows", type=INT, default=None, help="Most prompts per request (default 256; more: HTTP 400).")
@click.option("--max-body-bytes", type=INT, default=None,
              help="Largest request body in bytes (default 4 MiB; larger: HTTP 413).")
@click.option("--max-stop-chars", type=INT, default=None, help="Longest stop string (default 64; longer: HTTP 400).")
@click.option("--inference-log", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per request here (LIFECYCLE_INFERENCE_LOG).")
@click.option("--log-text", is_flag=True, default=False,
              help="Also record prompts and completions, PII-scrubbed (LIFECYCLE_INFERENCE_LOG_TEXT=1).")
@click.option("--timeout", type=INT, default=None, help="Request timeout in seconds (MLflow's default: 60).")
@click.option("--canary", "canary", metavar="ALIAS", default=None,
              help="Also serve the version behind ALIAS (e.g. staging) to --canary-share of the requests.")
@click.option("--canary-share", default=None, metavar="SHARE",
              help="Share of requests for the canary, a decimal strictly between 0 and 1 such as 0.1 (the "
                   "default). Sticky by the X-Routing-Key header or the routing_key param.")
@click.option("--shadow", "shadow", metavar="ALIAS", default=None,
              help="Answer from production; send a copy of each request to the version behind ALIAS (recorded only).")
@click.option("--refresh-s", type=FLOAT, default=None,
              help="With --canary/--shadow: seconds between re-reads of the aliases and the share (default 5).")
@click.option("--shadow-queue", type=INT, default=None,
              help="With --shadow: copies waiting at most; more are dropped and counted (default 8).")
def serve(name: str, alias: str, version: str | None, host: str, port: int, workers: int, device: str | None,
          max_batch_size: int | None, batch_wait_ms: float | None, coalesce: bool | None,
          max_new_tokens_cap: int | None, max_prompt_tokens: int | None, max_rows: int | None,
          max_body_bytes: int | None, max_stop_chars: int | None, inference_log: str | None,
          log_text: bool, timeout: int | None, canary: str | None, canary_share: str | None,
          shadow: str | None, refresh_s: float | None, shadow_queue: int | None) -> None:
    """Serve registered model NAME (at --alias, default production) over HTTP.

    POST /invocations with {"inputs": ["prompt", ...], "params": {"max_new_tokens": 32}},
    {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}.
    """
    from mlflow.tracking import MlflowClient

    from lifecycle.tracking import _check_model_uri

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    router = _router_settings(name, alias, version, canary, canary_share, shadow, refresh_s, shadow_queue)
    # `mlflow models serve` runs `uvicorn` by name: find ours even without an activated virtualenv.
    env = serve_env()
    settings = {
        "LIFECYCLE_DEVICE": device,
        "LIFECYCLE_MAX_BATCH_SIZE": max_batch_size,
        "LIFECYCLE_BATCH_WAIT_MS": batch_wait_ms,
        "LIFECYCLE_COALESCE": None if coalesce is None else str(coalesce).lower(),
        "LIFECYCLE_MAX_NEW_TOKENS_CAP": max_new_tokens_cap,
        "LIFECYCLE_MAX_PROMPT_TOKENS": max_prompt_tokens,
        "LIFECYCLE_MAX_ROWS": max_rows,
        "LIFECYCLE_MAX_BODY_BYTES": max_body_bytes,
        "LIFECYCLE_MAX_STOP_CHARS": max_stop_chars,
        "LIFECYCLE_INFERENCE_LOG": os.path.abspath(inference_log) if inference_log else None,
        "LIFECYCLE_INFERENCE_LOG_TEXT": "1" if log_text else None,
        "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": timeout,
    }
    env.update({k: str(v) for k, v in settings.items() if v is not None})
    # Validate the settings here, where a bad value is a one-line error, not a dead worker.
    from lifecycle.serving.settings import serving_config

    config = serving_config({}, environ=env)
    check_port(host, port)
    if workers > 1 and _on_cuda(config.device):
        click.echo(f"warning: --workers {workers} on a GPU loads {workers} copies of the model onto the same device "
                   "and splits the coalescer's batches between them (smaller batches, more memory); one worker "
                   "batches every request: prefer --workers 1 on a single GPU", err=True)
    uri = f"models:/{name}/{version}" if version else f"models:/{name}@{alias}"
    client = MlflowClient()
    _check_model_uri(client, uri)
    if router is not None:
        _exec_router(name, alias, router, host, port, workers, env)
    resolved = version or client.get_model_version_by_alias(name, alias).version
    env["LIFECYCLE_MODEL_NAME"] = name
    env["LIFECYCLE_MODEL_VERSION"] = str(resolved)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", host, "-p", str(port), "-w", str(workers)]
    click.echo(f"serving {name} version {resolved} ({uri}) at http://{host}:{port}/invocations", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


def _on_cuda(device: str | None) -> bool:
    """Whether the server's model will sit on a GPU (the device asked for, or CUDA when available)."""
    if device:
        return device.strip().lower().startswith("cuda")
    import torch  # only when several workers were asked for: the question needs it

    return bool(torch.cuda.is_available())


def _router_settings(name: str, alias: str, version: str | None, canary: str | None, share: str | None,
                     shadow: str | None, refresh_s: float | None, shadow_queue: int | None) -> dict | None:
    """The router's settings from the flags, or None for a plain server; ConfigError for a bad combination.

    Checked before the registry is read: everything here is a usage error (exit 2).
    """
    from lifecycle.serving.router import check_share

    if canary is None and shadow is None:
        stray = [f for f, v in (("--canary-share", share), ("--refresh-s", refresh_s), ("--shadow-queue", shadow_queue))
                 if v is not None]
        if stray:
            raise ConfigError(f"{stray[0]} needs --canary ALIAS or --shadow ALIAS")
        return None
    if canary is not None and shadow is not None:
        raise ConfigError("give --canary ALIAS or --shadow ALIAS, not both")
    flag, challenger = ("--canary", canary) if canary is not None else ("--shadow", shadow)
    if not challenger.strip():
        raise ConfigError(f"{flag} needs the challenger's alias (e.g. {flag} staging), got {challenger!r}")
    if version is not None or alias != "production":
        raise ConfigError("--canary/--shadow serve a challenger beside the production alias: drop --version/--alias")
    if challenger == alias:
        raise ConfigError(f"{flag} {challenger}: that is the production alias itself; name the challenger's alias "
                          "(e.g. staging)")
    if shadow is not None and share is not None:
        raise ConfigError("--canary-share goes with --canary; a shadow answers no request")
    value = 0.0
    if canary is not None:
        try:
            value = check_share("0.1" if share is None else share)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    settings = {"model_name": name, "production_alias": alias, "challenger_alias": challenger,
                "mode": "canary" if canary is not None else "shadow", "share": value}
    if refresh_s is not None:
        settings["refresh_s"] = refresh_s
    if shadow_queue is not None:
        settings["shadow_queue"] = shadow_queue
    from lifecycle.serving.router_model import router_config

    try:
        router_config({"router": settings})  # a bad --refresh-s / --shadow-queue: exit 2 before anything
    except ConfigError as exc:
        # Name the flag the user typed, not the routing model's config key.
        raise ConfigError(str(exc).replace("router.refresh_s", "--refresh-s")
                          .replace("router.shadow_queue", "--shadow-queue")) from None
    return settings


def _exec_router(name: str, alias: str, router: dict, host: str, port: int, workers: int, env: dict) -> None:
    """Check both arms, save the routing model, record ``canary_start`` and become the supervisor of
    ``mlflow models serve`` (which removes the routing model's folder when the server stops)."""
    from lifecycle.registry import canary as registry_canary
    from lifecycle.serving import router_folder
    from lifecycle.serving.mlflow_model import save_router_model

    arms = registry_canary.arms(name, router["challenger_alias"], production_alias=alias)
    router_folder.sweep()  # folders of servers that died without cleaning up
    held = router_folder.claim()
    try:
        path = save_router_model(held.folder / "model", router)
        canary = router["mode"] == "canary"
        registry_canary.start(name, arms, mode=router["mode"], share=router["share"] if canary else None)
    except BaseException:
        held.release()
        raise
    serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(path), "--env-manager", "local",
             "-h", host, "-p", str(port), "-w", str(workers)]
    os.set_inheritable(held.fd, True)  # the lock travels into the supervisor (and from it into the server)
    cmd = [sys.executable, "-m", "lifecycle.serving.router_folder", str(held.folder), str(held.fd), "--", *serve]
    what = (f"canary v{arms.challenger} (@{router['challenger_alias']}) at share {router['share']:g}"
            if canary else f"shadow v{arms.challenger} (@{router['challenger_alias']})")
    click.echo(f"serving {name} production v{arms.production} with {what} at http://{host}:{port}/invocations",
               err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, cmd, env)
    except BaseException:
        held.release()
        raise
