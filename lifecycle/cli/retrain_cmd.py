"""``lifecycle retrain``: fine-tune the production version on new data, evaluate it and promote it."""

from __future__ import annotations

from typing import Any

import click

from lifecycle.cli.params import INT
from lifecycle.errors import GateRejected


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
@click.option("--max-steps", type=INT, help="Fine-tuning steps (default: 100).")
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
    from lifecycle.cli import check_writable
    from lifecycle.config import load_config
    from lifecycle.retrain import RetrainConfig
    from lifecycle.retrain import retrain as run_retrain

    prepare_overrides = [o for o in overrides if o.startswith("prepare.")]
    flags = {"served_prompts": True if served else None, "records": records, "records_since": since,
             "text_column": text_column, "from_alias": from_alias, "train.max_steps": max_steps,
             "workdir": workdir, "policy": policy, "promote_to": promote_to}
    cfg = load_config(RetrainConfig, config_path, [o for o in overrides if not o.startswith("prepare.")], **flags)
    check_writable(cfg.workdir, "--workdir")
    outcome = run_retrain(name, new_data, cfg, prepare_overrides=prepare_overrides, force=force,
                          echo=lambda msg: click.echo(msg))
    retrain_summary(outcome)


def retrain_summary(outcome: Any) -> None:  # a RetrainOutcome, imported lazily with the command's body
    """Print what retrain did; exit 3 when the new version was refused for staging (also for ``monitor``)."""
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
