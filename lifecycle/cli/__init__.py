"""The ``lifecycle`` command: the scripted face of the library.

Each stage's commands live in their own module under ``lifecycle/cli/`` and are imported only
when invoked, so ``lifecycle --help`` answers without importing torch or MLflow. This is the one
place where :class:`~lifecycle.errors.LifecycleError` becomes a one-line message and an exit code.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any, Sequence

import click

from lifecycle.errors import LifecycleError

# command name -> (module, attribute, one-line help shown by `lifecycle --help`).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("lifecycle.cli.prepare_cmd", "prepare", "Clean, filter, deduplicate, scrub, split, tokenize and pack a corpus."),
    "train": ("lifecycle.cli.train_cmd", "train", "Train or fine-tune a causal LM and register it."),
    "evaluate": ("lifecycle.cli.evaluate_cmd", "evaluate", "Evaluate a model, optionally against a baseline."),
    "promote": ("lifecycle.cli.registry_cmd", "promote", "Promote a version to staging or production under a policy."),
    "rollback": ("lifecycle.cli.registry_cmd", "rollback", "Move production back to the version that held it before."),
    "status": ("lifecycle.cli.registry_cmd", "status", "Show aliases, stages and the last ledger events of a model."),
    "history": ("lifecycle.cli.registry_cmd", "history", "Show the promotion ledger of a model."),
    "guard": ("lifecycle.cli.guard_cmd", "guard", "The webhook guard that holds UI promotions to the policy."),
    "serve": ("lifecycle.cli.serve_cmd", "serve", "Serve a registered model with `mlflow models serve`."),
    "monitor": ("lifecycle.cli.monitor_cmd", "monitor", "Drift and service metrics from inference records."),
    "report": ("lifecycle.cli.monitor_cmd", "report", "Write the self-contained HTML report of a model."),
    "retrain": ("lifecycle.cli.monitor_cmd", "retrain", "Continuous training on new data."),
    "tune": ("lifecycle.cli.optimize_cmd", "tune", "Hyperparameter search with Optuna."),
    "compress": ("lifecycle.cli.optimize_cmd", "compress", "Make a compressed variant of a registered version."),
    "pipeline": ("lifecycle.cli.pipeline_cmd", "pipeline", "Run the whole lifecycle as one command."),
}


def _available(name: str) -> bool:
    module, attr, _ = COMMANDS[name]
    if importlib.util.find_spec(module) is None:
        return False
    # A module may exist before all of its commands do (monitor before report/retrain): the
    # command modules import their heavy dependencies lazily, so importing one here is cheap.
    return hasattr(importlib.import_module(module), attr)


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _available(cmd_name):
            return None
        module, attr, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="lifecycle")
def cli(verbose: int) -> None:
    """Manage the whole life of a language model on top of MLflow.

    Tracking goes to MLFLOW_TRACKING_URI, or MLflow's default (sqlite:///mlflow.db here).
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> Any:
    """Run the CLI, turning library errors into one-line messages and their exit codes."""
    # Distributed workers (torchrun) print errors once, from rank 0.
    quiet_rank = os.environ.get("RANK", "0") != "0"
    from lifecycle.tracking import use_local_artifact_root

    use_local_artifact_root()
    try:
        return cli.main(args=list(argv) if argv is not None else None, prog_name="lifecycle", standalone_mode=False)
    except LifecycleError as exc:
        if not quiet_rank:
            click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
