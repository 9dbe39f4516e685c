"""``lifecycle tune`` and ``lifecycle compress``: hyperparameter search and compressed variants."""

from __future__ import annotations

import sys

import click

from lifecycle.cli.params import FLOAT, INT


@click.command("tune")
@click.option("--data", required=True, help="Prepared data: a folder or runs:/<run_id>/prepared.")
@click.option("--space", "space_path", required=True, type=click.Path(dir_okay=False),
              help="Search-space YAML (params, fixed, pruner, sampler, enqueue); see examples/tune_space.yaml.")
@click.option("--trials", type=INT, required=True,
              help="Finished trials the study should hold (a resume runs the rest).")
@click.option("--jobs", type=INT, default=1, show_default=True,
              help="Trials run in parallel (threads of this process).")
@click.option("--study-name", help="Optuna study name (default: <model-name>-tune); the same name resumes.")
@click.option("--storage", help="Optuna storage URL (default: optuna.db beside a sqlite tracking database).")
@click.option("--model-name", help="Registered model name for the best trial (default: lifecycle-lm).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file of TrainConfig keys shared by every trial.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a shared TrainConfig key (repeatable).")
@click.option("--output", help="Folder for the trials' checkpoints (default: tune/<study-name>).")
@click.option("--experiment", help="MLflow experiment of the parent run.")
@click.option("--timeout", type=FLOAT, help="Stop starting new trials after this many seconds.")
@click.option("--no-register", is_flag=True, help="Do not register the best trial's model.")
def tune(data: str, space_path: str, trials: int, jobs: int, study_name: str | None, storage: str | None,
         model_name: str | None, config_path: str | None, overrides: tuple[str, ...], output: str | None,
         experiment: str | None, timeout: float | None, no_register: bool) -> None:
    """Search training hyperparameters with Optuna: one nested MLflow run per trial, median pruning
    on the validation loss, the best trial registered as a new version."""
    from lifecycle.optimize.space import base_mapping, load_space
    from lifecycle.optimize.tune import tune as run_tune
    from lifecycle.train.loop import TrainingInterrupted

    space = load_space(space_path)
    base = base_mapping(space, config_path, overrides)
    try:
        out = run_tune(data, space, trials=trials, base=base, jobs=jobs, study_name=study_name, storage=storage,
                       model_name=model_name, output=output, experiment=experiment, register=not no_register,
                       timeout=timeout)
    except (KeyboardInterrupt, TrainingInterrupted) as stop:
        # Like `lifecycle train`: preemption is not a crash; the same command resumes the study.
        signame = getattr(stop, "signame", "SIGINT")
        click.echo(f"Stopped by {signame}; run the same command again to resume the study "
                   "(the interrupted trial runs again first).", err=True)
        sys.exit(130 if signame == "SIGINT" else 143)
    verb = "resumed" if out.resumed else "ran"
    click.echo(f"Study {out.study_name}: {verb} {out.ran} trial(s); {out.complete} complete, {out.pruned} pruned, "
               f"{out.failed} failed in total; parent run {out.parent_run_id}")
    if out.best_trial is None:
        click.echo("No trial completed: nothing to register.")
        return
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.best_params.items())
    click.echo(f"Best trial {out.best_trial}: val/best_loss {out.best_value:.4f} ({params})")
    if out.model_uri:
        click.echo(out.model_uri)


@click.command("compress")
@click.argument("name")
@click.argument("version")
@click.option("--method", required=True, type=click.Choice(["int8-dynamic", "fp16", "bf16", "prune", "distill"]),
              help="int8-dynamic: int8 linear layers for CPU serving; fp16/bf16: half-precision weights for GPU "
                   "serving; prune: whole layers and MLP neurons removed (--amount), then a recovery fine-tune "
                   "against the parent; distill: a smaller student trained against the parent (it starts as "
                   "--preset, --amount or --student).")
@click.option("--amount", help="prune: the fraction of the transformer blocks' parameters to remove, "
                               "strictly between 0 and 1 (0.3 or 30%); distill: the student starts as the "
                               "parent pruned by it.")
@click.option("--preset", type=click.Choice(["tiny", "small"]), help="distill: the student starts as a fresh "
                                                                     "model of this shape.")
@click.option("--student", help="distill: the student starts from this smaller model's weights (models:/NAME/VERSION, "
                                "models:/NAME@ALIAS, runs:/<run_id>/<path> or a folder) with the parent's tokenizer.")
@click.option("--data",
              help="Data to measure parent and variant on (default: the data of the parent's last evaluation); "
                   "prune/distill also train on it (prepared data, tokenized with the parent's tokenizer).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Device for the measurements (int8: cpu).")
@click.option("--experiment", help="MLflow experiment of the run.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of EvalConfig keys.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override an EvalConfig key, or a prune.<key> / distill.<key> (repeatable).")
def compress(name: str, version: str, method: str, amount: str | None, preset: str | None, student: str | None,
             data: str | None, device: str | None, experiment: str | None, config_path: str | None,
             overrides: tuple[str, ...]) -> None:
    """Make a compressed variant of NAME VERSION, evaluate it beside its parent and register it.

    The new version is tagged compressed_from=VERSION with compress/size_ratio, compress/<metric>_delta
    and the usual eval/... tags; a policy's `compression` gate bounds its quality loss.
    """
    from lifecycle.config import load_config
    from lifecycle.errors import ConfigError
    from lifecycle.evaluate.config import EvalConfig
    from lifecycle.optimize.compress import compress as run_compress
    from lifecycle.optimize.compress import format_table
    from lifecycle.optimize.prune import parse_amount
    from lifecycle.optimize.structural import SECTIONS, StructuralConfig, split_overrides
    from lifecycle.optimize.student import init_of

    # Every option is checked here, before a run or a version can exist.
    shrink_overrides, eval_overrides = split_overrides(overrides)
    if any(o.partition("=")[0].strip() == "prune.amount" for o in shrink_overrides):
        # One spelling: a --set would silently win over --amount (and skip its parsing).
        raise ConfigError("give the amount as --amount (e.g. --amount 0.3), not --set prune.amount")
    if method == "prune" and amount is None:
        raise ConfigError("--method prune needs --amount (the fraction of block parameters to remove, e.g. 0.3)")
    if amount is not None and method not in ("prune", "distill"):
        raise ConfigError(f"--amount is for --method prune or distill, not {method}")
    for flag, value in (("--preset", preset), ("--student", student)):
        if value is not None and method != "distill":
            raise ConfigError(f"{flag} is for --method distill, not {method}")
    if method == "distill":
        init_of(preset, 0.0 if amount is not None else None, student)  # exactly one start, before --amount is read
    # A --set key the chosen method never reads would be a flag that means nothing: refused.
    used = {"prune": SECTIONS, "distill": SECTIONS if amount is not None else ("distill.",)}.get(method, ())
    unused = [o.partition("=")[0].strip() for o in shrink_overrides if not o.startswith(used)]
    if unused:
        how = f"--method {method}" + (f" --{'preset' if preset else 'student'}" if method == "distill" else "")
        raise ConfigError(f"--set {unused[0]} has no effect with {how} (prune.* keys are for --method prune or "
                          "distill --amount, distill.* for prune and distill)")
    flags: dict[str, object] = {"preset": preset, "student": student}
    if amount is not None:
        flags["prune.amount"] = parse_amount(amount)
        flags["prune_student"] = method == "distill"
    scfg = load_config(StructuralConfig, None, shrink_overrides, **flags)
    cfg = load_config(EvalConfig, config_path, eval_overrides, device=device)
    from lifecycle.train.loop import TrainingInterrupted

    try:
        out = run_compress(name, version, method, data=data, cfg=cfg, experiment=experiment, structural=scfg)
    except TrainingInterrupted as stop:
        # prune/distill train a student: a signal stops it like `lifecycle train`, but nothing is
        # kept (no version is registered before the variant is measured); the same command starts over.
        click.echo(f"Stopped by {stop.signame} while training the {method} variant (step {stop.step}); "
                   "nothing was registered: run the same command again.", err=True)
        sys.exit(130 if stop.signame == "SIGINT" else 143)
    click.echo(format_table(out.rows))
    what = f"{method} of v{out.parent_version}"
    if method == "prune":
        what += f", amount {out.tags.get('compress/amount')} (achieved {out.tags.get('compress/amount_achieved')})"
    if method == "distill":
        what += f", student from {out.tags.get('compress/student_init')}"
    click.echo(f"Registered {out.model_uri} ({what}, measured on {out.device}); run {out.run_id}")
