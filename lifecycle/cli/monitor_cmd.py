"""``lifecycle monitor``, ``retrain`` and ``report``: watch a served model, retrain it, show its life."""

from __future__ import annotations

import math
import sys

import click

#: Printed in the summary line, in this order (every metric is logged).
_SHOWN = ("request_count", "error_rate", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "input_drift_psi",
          "input_drift_ks", "token_js", "unknown_token_rate", "semantic_drift_bpb_delta", "completion_length_psi",
          "finish_reason_shift")


@click.command("monitor")
@click.argument("name")
@click.option("--alias", default="production", show_default=True, help="Alias of the version to monitor.")
@click.option("--version", "version", help="Monitor this version number instead of the alias.")
@click.option("--since", help="Window start: ISO time or a duration before now (30m, 24h, 7d); 'all'. [default: 24h]")
@click.option("--records", type=click.Path(dir_okay=False),
              help="Inference records JSONL (default: $LIFECYCLE_INFERENCE_LOG).")
@click.option("--reference", help="Reference data: prepared folder or runs:/<id>/prepared "
                                  "(default: the version's data_run_id tag).")
@click.option("--policy", type=click.Path(dir_okay=False),
              help="Policy file whose 'monitoring' section holds the thresholds (default registry_policies/default.yaml).")
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

    Logs monitor/request_count, monitor/error_rate, monitor/latency_p50|p95|p99_ms, token totals,
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
        from lifecycle.retrain import retrain as run_retrain

        click.echo(f"Retraining {name} with {retrain_with} (monitor run {out.run_id})")
        outcome = run_retrain(name, retrain_with, retrain_cfg, echo=lambda msg: click.echo(msg),
                              monitor_run=out.run_id)
        _retrain_summary(outcome)
        return
    if v.exit_code:
        # SystemExit, not ctx.exit: click returns ctx.exit's code from a non-standalone main
        # instead of exiting, and the MLproject script must exit with it for a scheduler to see.
        sys.exit(v.exit_code)


@click.command("retrain")
@click.argument("name")
@click.option("--new-data", "new_data", required=True, metavar="SRC",
              help="New documents: a file or folder (txt, md, jsonl, json, csv, parquet), hf:NAME or runs:/ URI.")
@click.option("--with-served-prompts", "served", is_flag=True,
              help="Add the prompts the model served that were recorded with text (scrubbed of PII).")
@click.option("--records", type=click.Path(dir_okay=False),
              help="Inference records JSONL for --with-served-prompts (default: $LIFECYCLE_INFERENCE_LOG).")
@click.option("--since", help="Only served prompts since this ISO time or duration (24h, 7d). [default: all]")
@click.option("--text-column", help="Column of the text in jsonl/csv/parquet new data (default: text).")
@click.option("--from-alias", help="Alias of the version to fine-tune from (default: production).")
@click.option("--max-steps", type=int, help="Fine-tuning steps (default: 100).")
@click.option("--workdir", help="Folder for the prepared new data and the checkpoints (default: retrain).")
@click.option("--policy", type=click.Path(dir_okay=False),
              help="Promotion policy file (default: registry_policies/default.yaml).")
@click.option("--promote-to", type=click.Choice(["none", "staging", "production"]),
              help="How far to promote (production only where the policy allows it without a person).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML with RetrainConfig keys (train:, evaluate: sections as in the pipeline).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key, e.g. train.learning_rate=1e-4 or prepare.quality.min_words=5 (repeatable).")
@click.option("--force", is_flag=True, help="Rerun every step even when an identical earlier step exists.")
def retrain(name: str, new_data: str, served: bool, records: str | None, since: str | None,
            text_column: str | None, from_alias: str | None, max_steps: int | None, workdir: str | None,
            policy: str | None, promote_to: str | None, config_path: str | None, overrides: tuple[str, ...],
            force: bool) -> None:
    """Fine-tune NAME's production version on new data, evaluate it against production, promote it.

    One parent MLflow run with a child run per step: prepare (production's settings and tokenizer,
    deduplicated against production's data), train, evaluate (on production's data, production as
    baseline), evaluate_new_data, promote_staging, promote_production. Exits 3 when the new version
    is refused for staging; a production refusal that waits for a person is not an error.
    """
    from lifecycle.config import load_config
    from lifecycle.retrain import RetrainConfig, retrain as run_retrain

    prepare_overrides = [o for o in overrides if o.startswith("prepare.")]
    flags = {"served_prompts": True if served else None, "records": records, "records_since": since,
             "text_column": text_column, "from_alias": from_alias, "train.max_steps": max_steps,
             "workdir": workdir, "policy": policy, "promote_to": promote_to}
    cfg = load_config(RetrainConfig, config_path, [o for o in overrides if not o.startswith("prepare.")], **flags)
    outcome = run_retrain(name, new_data, cfg, prepare_overrides=prepare_overrides, force=force,
                          echo=lambda msg: click.echo(msg))
    _retrain_summary(outcome)


def _retrain_summary(outcome) -> None:  # noqa: ANN001 - RetrainOutcome, imported lazily
    """Print what retrain did; exit 3 when the new version was refused for staging."""
    from lifecycle.errors import GateRejected

    click.echo("")
    click.echo(f"Retrain run {outcome.run_id}: v{outcome.base_version} -> v{outcome.version}"
               f"{f' ({outcome.served_prompts} served prompts added)' if outcome.served_prompts else ''}")
    for key in ("eval/loss", "eval/perplexity", "eval/bits_per_byte"):
        if key in outcome.metrics:
            click.echo(f"  {key} = {outcome.metrics[key]:.4f} (production's data)")
    for key in ("compare/loss_delta", "compare/bits_per_byte_delta"):
        if key in outcome.new_data_compare:
            click.echo(f"  new data: {key} = {outcome.new_data_compare[key]:+.4f} vs v{outcome.base_version}")
    refused = None
    for step in outcome.steps:
        if step.name.startswith("promote_"):
            failed = step.outputs.get("failed_gates") or []
            click.echo(f"  {step.name}: {step.status}{' - ' + '; '.join(failed) if failed else ''}")
            if step.name == "promote_staging" and step.status == "refused":
                refused = step.outputs.get("reason") or "refused"
    click.echo(f"Production: {'version ' + outcome.production if outcome.production else 'no version'}")
    if refused:
        raise GateRejected(f"retrained version {outcome.version} refused for staging: {refused}")


@click.command("report")
@click.argument("name")
@click.option("--out", "out", default="report.html", show_default=True, type=click.Path(),
              help="The HTML file to write (self-contained: opens with no network).")
@click.option("--overwrite", is_flag=True, help="Replace --out when it exists.")
@click.option("--no-log", "no_log", is_flag=True, help="Do not log the page as an artifact of a `report` run.")
@click.option("--experiment", help="MLflow experiment of the report run.")
def report(name: str, out: str, overwrite: bool, no_log: bool, experiment: str | None) -> None:
    """Write NAME's lifecycle as one HTML page: lineage, training curves, evaluations, gates,
    the ledger as a timeline and the latest monitoring charts; log it as a run artifact."""
    from lifecycle.report import write_report

    outcome = write_report(name, out, overwrite=overwrite, log_run=not no_log, experiment=experiment)
    click.echo(f"Report of {name}: {outcome.versions} version(s), {outcome.events} ledger event(s), "
               f"{outcome.bytes / 1024:.0f} KiB -> {outcome.path}")
    if outcome.artifact_uri:
        click.echo(f"Logged as {outcome.artifact_uri}")
