"""``lifecycle pipeline``: prepare -> train -> evaluate -> staging -> production in one run."""

from __future__ import annotations

import click

from lifecycle.cli.params import INT


@click.command("pipeline")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML with model_name, workdir, policy, promote_to and prepare/train/evaluate sections.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key, e.g. train.max_steps=500 or prepare.source.uri=corpus.txt (repeatable).")
@click.option("--source", help="Corpus to prepare (default: builtin:pydoc).")
@click.option("--model-name", help="Registered model name (default: lifecycle-lm).")
@click.option("--preset", help="Model size: tiny, small or gpt2 (default: tiny).")
@click.option("--max-steps", type=INT, help="Training steps (default: 300; with --time-budget: no limit but the time).")
@click.option("--time-budget", help="Wall-clock budget of the training step (90s, 10m, 1h or seconds).")
@click.option("--workdir", help="Folder for prepared data and checkpoints (default: outputs).")
@click.option("--policy", help="Promotion policy file (default: registry_policies/default.yaml).")
@click.option("--promote-to", type=click.Choice(["none", "staging", "production"]),
              help="How far to promote (production only where the policy allows it without a person).")
@click.option("--force", is_flag=True, help="Rerun every step even when an identical earlier step exists.")
def pipeline(config_path: str | None, overrides: tuple[str, ...], source: str | None, model_name: str | None,
             preset: str | None, max_steps: int | None, time_budget: str | None, workdir: str | None,
             policy: str | None, promote_to: str | None, force: bool) -> None:
    """Run the whole lifecycle as child runs of one parent MLflow run, reusing unchanged steps."""
    from lifecycle.cli import check_writable
    from lifecycle.config import load_config
    from lifecycle.pipeline import PipelineConfig, run_pipeline

    flags = {"prepare.source.uri": source, "model_name": model_name, "train.preset": preset,
             "train.max_steps": max_steps, "train.time_budget": time_budget, "workdir": workdir, "policy": policy,
             "promote_to": promote_to}
    if time_budget is not None and max_steps is None:
        overrides = ("train.max_steps=", *overrides)  # the budget alone decides, unless --set says otherwise
    cfg = load_config(PipelineConfig, config_path, overrides, **flags)
    check_writable(cfg.workdir, "--workdir")
    outcome = run_pipeline(cfg, force=force, echo=lambda msg: click.echo(msg))

    reused = [s.name for s in outcome.steps if s.reused and s.status != "already"]
    click.echo("")
    click.echo(f"Pipeline run {outcome.run_id}: reused {', '.join(reused) if reused else 'no steps'}")
    for step in outcome.steps:
        if step.name.startswith("promote_"):
            detail = step.outputs.get("reason") or ""
            failed = step.outputs.get("failed_gates") or []
            click.echo(f"  {step.name}: {step.status}{' - ' + '; '.join(failed) if failed else ''}"
                       f"{'' if failed or not detail else ' - ' + detail}")
    click.echo(f"Registered: models:/{outcome.model_name}/{outcome.version}")
    for key in ("eval/loss", "eval/perplexity", "eval/bits_per_byte", "eval/rougeL", "eval/latency_p95_ms"):
        if key in outcome.metrics:
            click.echo(f"  {key} = {outcome.metrics[key]:.4f}")
    click.echo(f"Production: {'version ' + outcome.production if outcome.production else 'no version yet'}")
    click.echo("Next:")
    if outcome.production != outcome.version:
        click.echo(f"  # a person approves: tag version {outcome.version} approved_by=<name> in the MLflow UI, then")
        click.echo(f"  lifecycle promote {outcome.model_name} {outcome.version} --to production")
    click.echo(f"  lifecycle serve {outcome.model_name} --alias production --port 5001")
    click.echo(f"  mlflow models serve -m models:/{outcome.model_name}@production --env-manager local -p 5001")
    click.echo(f"  lifecycle rollback {outcome.model_name} --reason \"...\"")
