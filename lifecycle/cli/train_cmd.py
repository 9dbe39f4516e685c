"""``lifecycle train``: train or fine-tune a causal LM on prepared data and register it."""

from __future__ import annotations

import atexit
import gc
import sys
from typing import Iterable

import click

from lifecycle.cli.params import FLOAT, INT
from lifecycle.errors import ConfigError, LifecycleError


def refuse_repeated_keys(overrides: Iterable[str]) -> None:
    """Refuse a ``--set`` key given twice: which of two values the user meant is not ours to guess."""
    seen: dict[str, str] = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" in item and key in seen:
            raise ConfigError(f"--set {key} is given twice ({seen[key]!r} and {item!r}); give it once")
        seen[key] = item


def exit_promptly() -> None:
    """Let this process end without the interpreter's last garbage collections (about 2 s here).

    torch, transformers and MLflow leave hundreds of thousands of objects for the collector to walk
    at exit; under torchrun that kept a refusing rank alive long after its peers had ended, until
    torchrun killed it (-15) instead of reporting its exit code. Frozen at exit (never earlier: an
    in-process caller goes on collecting), they are released by reference counting as usual; only
    the final walk is skipped. Registered again rather than twice.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


@click.command("train")
@click.option("--data", required=True, help="Prepared data: a folder or runs:/<run_id>/prepared.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of TrainConfig keys.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--model-name", help="Registered model name (default: lifecycle-lm).")
@click.option("--preset", help="Model size when training from scratch: tiny, small, gpt2, or auto (sized for the "
                              "data and the time budget).")
@click.option("--base-model", help="Fine-tune this model: folder, hub name, runs:/ or models:/NAME@ALIAS.")
@click.option("--max-steps", type=INT, help="Optimizer steps (default 200; with --time-budget: no limit but the time).")
@click.option("--time-budget", help="Wall-clock budget of the training loop, evaluations and checkpoints included "
                                    "(90s, 10m, 1h or seconds); steps and LR schedule are fitted to it.")
@click.option("--batch-size", type=INT, help="Micro-batch per process (global = batch * grad_accum * processes).")
@click.option("--learning-rate", type=FLOAT, help="Peak learning rate (default 1e-3; --preset auto: chosen by width).")
@click.option("--seed", type=INT, help="Seed of model init and data order.")
@click.option("--output", help="Checkpoint folder (default: checkpoints/<run_id>/, one folder per run).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --output, or without --output "
                                             "of the run under checkpoints/ that saved last (same MLflow run).")
@click.option("--resume-run", "resume_run", metavar="RUN_ID", help="Continue the run checkpointed in "
                                                                   "checkpoints/RUN_ID/ (same MLflow run).")
@click.option("--overwrite", is_flag=True, help="Delete existing checkpoints in --output and start over.")
def train(data: str, config_path: str | None, overrides: tuple[str, ...], model_name: str | None,
          preset: str | None, base_model: str | None, max_steps: int | None, time_budget: str | None,
          batch_size: int | None,
          learning_rate: float | None, seed: int | None, output: str | None, resume: bool,
          resume_run: str | None, overwrite: bool) -> None:
    """Train a causal LM on prepared data, log it to one MLflow run and register it.

    Instruction data (`lifecycle prepare --format sft`) is detected from its data card: every
    example is one row and the loss is on the responses only (full fine-tune or LoRA).

    Run under `torchrun --nproc_per_node N -m lifecycle train ...` for DDP training.
    """
    from lifecycle.cli import check_writable
    from lifecycle.config import load_config
    from lifecycle.train.config import DEFAULT_CHECKPOINT_ROOT, TrainConfig
    from lifecycle.train.loop import TrainingInterrupted
    from lifecycle.train.run import train as run_train

    refuse_repeated_keys(overrides)
    cfg = load_config(TrainConfig, config_path, overrides, preset=preset, base_model=base_model,
                      max_steps=max_steps, time_budget=time_budget, batch_size=batch_size,
                      learning_rate=learning_rate, seed=seed, output=output, model_name=model_name)
    # Unset, checkpoints go to checkpoints/<run_id>/ under the working directory, probed there.
    check_writable(cfg.output if cfg.output is not None else DEFAULT_CHECKPOINT_ROOT, "--output")
    try:
        outcome = run_train(cfg, data, resume=resume, resume_run=resume_run, overwrite=overwrite)
    except LifecycleError:
        exit_promptly()
        raise
    except TrainingInterrupted as stop:
        # Preemption is not a crash: the checkpoint is written and the MLflow run marked KILLED.
        # 128 + signal number (143 for SIGTERM, 130 for Ctrl-C) tells a scheduler "terminated",
        # neither success nor failure.
        # Without --output the run has its own folder checkpoints/<run_id>/: name that run.
        again = "--resume" if cfg.output is not None or stop.checkpoint is None else \
            f"--resume-run {stop.checkpoint.parent.name}"
        click.echo(f"Stopped by {stop.signame} after step {stop.step}; checkpoint {stop.checkpoint}. "
                   f"Continue with the same command plus {again}.", err=True)
        sys.exit(130 if stop.signame == "SIGINT" else 143)
    if outcome.run_id is None:  # a non-zero torchrun rank: rank 0 reports
        return
    resumed = f" (resumed from step {outcome.resumed_from})" if outcome.resumed_from is not None else ""
    click.echo(f"Trained {outcome.steps} steps{resumed}; best val/loss {outcome.best_val_loss:.4f} "
               f"at step {outcome.best_step}{' (early stop)' if outcome.stopped_early else ''}; run {outcome.run_id}")
    if outcome.model_uri:
        click.echo(outcome.model_uri)
