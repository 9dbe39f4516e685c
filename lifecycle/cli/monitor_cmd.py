"""``lifecycle monitor``: drift and service metrics of a served model, and a retrain when they say so."""

from __future__ import annotations

import math
import sys

import click

#: Printed in the summary line, in this order (every metric is logged).
_SHOWN = ("request_count", "error_rate", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "input_drift_psi",
          "input_drift_ks", "token_js", "unknown_token_rate", "semantic_drift_bpb_delta", "completion_length_psi",
          "finish_reason_shift")

#: The window's start and the records file, shared with `lifecycle canary` (one definition of each).
since_option = click.option(
    "--since", help="Window start: ISO time or a duration before now (30m, 24h, 7d); 'all'. [default: 24h]")
records_option = click.option("--records", type=click.Path(dir_okay=False),
                              help="Inference records JSONL (default: $LIFECYCLE_INFERENCE_LOG).")


@click.command("monitor")
@click.argument("name")
@click.option("--alias", default="production", show_default=True, help="Alias of the version to monitor.")
@click.option("--version", "version", help="Monitor this version number instead of the alias.")
@since_option
@records_option
@click.option("--reference", help="Reference data: prepared folder or runs:/<id>/prepared "
                                  "(default: the version's data_run_id tag).")
@click.option("--policy", type=click.Path(dir_okay=False),
              help="Policy file whose 'monitoring' section holds the thresholds (default "
                   "registry_policies/default.yaml).")
@click.option("--version-mismatch", type=click.Choice(["refuse", "separate"]),
              help="Records of other versions in the window: refuse (default) or leave them out.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Device for the semantic drift.")
@click.option("--experiment", help="MLflow experiment of the run.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of MonitorConfig keys.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--retrain-with", "retrain_with", metavar="SRC",
              help="On a 'retrain' verdict, run `lifecycle retrain NAME --new-data SRC` (same --policy) and exit "
                   "with its code instead of 11.")
@click.option("--retrain-config", "retrain_config", type=click.Path(dir_okay=False),
              help="YAML of retrain settings (train:, evaluate:, workdir ...) for --retrain-with.")
def monitor(name: str, alias: str, version: str | None, since: str | None, records: str | None,
            reference: str | None, policy: str | None, version_mismatch: str | None, device: str | None,
            experiment: str | None, config_path: str | None, overrides: tuple[str, ...],
            retrain_with: str | None, retrain_config: str | None) -> None:
    """Measure NAME's inference records of a window against its training data, in one MLflow run.

    Logs monitor/request_count, monitor/shadow_dropped (shadow copies dropped under load: not requests, not
    errors), monitor/error_rate, monitor/latency_p50|p95|p99_ms, token totals,
    the finish-reason mix, monitor/input_drift_psi, monitor/input_drift_ks, monitor/token_js,
    monitor/unknown_token_rate, monitor/semantic_drift_bpb_delta, monitor/completion_length_psi and
    monitor/finish_reason_shift, with drift and latency plots. Prints the verdict and exits
    0 (ok), 10 (warn) or 11 (retrain).
    """
    from lifecycle.config import load_config
    from lifecycle.monitoring.config import MonitorConfig
    from lifecycle.monitoring.run import monitor as run_monitor

    flags = {"since": since, "version_mismatch": version_mismatch, "device": device, "experiment": experiment}
    cfg = load_config(MonitorConfig, config_path, overrides, **flags)
    retrain_cfg = None
    if retrain_with:
        from lifecycle.retrain import RetrainConfig

        # Checked before monitoring: a bad retrain config must not surface after a long run.
        retrain_cfg = load_config(RetrainConfig, retrain_config, policy=policy)
    elif retrain_config:
        raise click.UsageError("--retrain-config needs --retrain-with SRC")
    out = run_monitor(name, alias=alias, version=version, records=records, reference=reference, policy=policy,
                      cfg=cfg)
    shown = "  ".join(f"{k}={out.metrics['monitor/' + k]:.4g}" for k in _SHOWN
                      if not math.isnan(out.metrics.get("monitor/" + k, math.nan)))
    click.echo(f"Monitored {name} v{out.version}: {shown}")
    for note in out.notes:
        click.echo(f"Note: {note}")
    v = out.verdict
    if v.unavailable:
        click.echo(f"Unavailable (thresholded but not measurable): {', '.join(v.unavailable)}")
    if v.unknown:
        click.echo(f"Unknown metrics in the policy (never computed): {', '.join(v.unknown)}")
    reasons = "; ".join(map(str, v.findings)) if v.findings else "all thresholds respected"
    click.echo(f"Verdict: {v.verdict} ({reasons})")
    click.echo(f"run {out.run_id}")
    if retrain_with and v.verdict == "retrain":
        from lifecycle.cli.retrain_cmd import retrain_summary
        from lifecycle.retrain import retrain as run_retrain

        click.echo(f"Retraining {name} with {retrain_with} (monitor run {out.run_id})")
        outcome = run_retrain(name, retrain_with, retrain_cfg, echo=lambda msg: click.echo(msg),
                              monitor_run=out.run_id)
        retrain_summary(outcome)
        return
    if v.exit_code:
        # SystemExit, not ctx.exit: click returns ctx.exit's code from a non-standalone main
        # instead of exiting, and the MLproject script must exit with it for a scheduler to see.
        sys.exit(v.exit_code)
