"""The ``lifecycle`` command: the scripted face of the library.

Each stage's commands live in their own module under ``lifecycle/cli/`` and are imported only
when invoked, so ``lifecycle --help`` answers without importing torch or MLflow. This is the one
place where :class:`~lifecycle.errors.LifecycleError` (and an operating-system error: permission,
full disk, port in use) becomes a one-line message and an exit code.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import click

from lifecycle.errors import (
    AddressUnavailableError,
    FileSystemError,
    LifecycleError,
    TrackingUnavailableError,
    from_os_error,
)

# command name -> (module, attribute, one-line help shown by `lifecycle --help`).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("lifecycle.cli.prepare_cmd", "prepare",
                "Clean, filter, deduplicate, scrub, split, tokenize and pack a corpus."),
    "train": ("lifecycle.cli.train_cmd", "train", "Train or fine-tune a causal LM and register it."),
    "evaluate": ("lifecycle.cli.evaluate_cmd", "evaluate", "Evaluate a model, optionally against a baseline."),
    "promote": ("lifecycle.cli.registry_cmd", "promote", "Promote a version to staging or production under a policy."),
    "rollback": ("lifecycle.cli.registry_cmd", "rollback", "Move production back to the version that held it before."),
    "status": ("lifecycle.cli.registry_cmd", "status", "Show aliases, stages and the last ledger events of a model."),
    "history": ("lifecycle.cli.registry_cmd", "history", "Show the promotion ledger of a model."),
    "repair": ("lifecycle.cli.registry_cmd", "repair", "Settle half-done moves and align registry and ledger."),
    "guard": ("lifecycle.cli.guard_cmd", "guard", "The webhook guard that holds UI promotions to the policy."),
    "serve": ("lifecycle.cli.serve_cmd", "serve", "Serve a registered model with `mlflow models serve`."),
    "monitor": ("lifecycle.cli.monitor_cmd", "monitor", "Drift and service metrics from inference records."),
    "canary": ("lifecycle.cli.canary_cmd", "canary", "Compare a canary/shadow challenger with production; act on it."),
    "report": ("lifecycle.cli.report_cmd", "report", "Write the self-contained HTML report of a model."),
    "retrain": ("lifecycle.cli.retrain_cmd", "retrain", "Continuous training on new data."),
    "tune": ("lifecycle.cli.optimize_cmd", "tune", "Hyperparameter search with Optuna."),
    "compress": ("lifecycle.cli.optimize_cmd", "compress", "Make a compressed variant of a registered version."),
    "predict": ("lifecycle.cli.predict_cmd", "predict", "Generate for every row of a file with a model, resumably."),
    "pipeline": ("lifecycle.cli.pipeline_cmd", "pipeline", "Run the whole lifecycle as one command."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_text) for name, (_, _, help_text) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="lifecycle")
def cli(verbose: int) -> None:
    """Manage the whole life of a language model on top of MLflow.

    Tracking goes to MLFLOW_TRACKING_URI, or MLflow's default (sqlite:///mlflow.db here).
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


def check_writable(path: str | os.PathLike[str], flag: str, *, file: bool = False) -> None:
    """Refuse up front an output that the operating system will not let us write (exit 14).

    ``path`` is a folder to create or fill (``file``: a file to write). The nearest folder that
    exists is probed by creating and removing a temporary file in it, which also catches what
    permission bits do not show (a read-only or full disk, /proc, a root-squashed mount), so a
    long run never fails at its last write. Nothing is left behind. An existing ``path`` that is
    not a folder is left to the command (it is "the output exists", exit 6, there).
    """
    target = Path(path).expanduser().absolute()
    probe = target.parent if file else target
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        if probe == target:
            return
        raise FileSystemError(f"{flag} {path}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".lifecycle-write-check-", dir=probe)
    except OSError as exc:
        raise from_os_error(exc, f"{flag} {path}: cannot write in {probe}", writing=True) from None
    os.close(fd)
    os.unlink(name)


def _shown(exc: BaseException | str) -> str:
    """The error's message as shown: the credentials of any URI in it masked."""
    from lifecycle.tracking import mask_secrets

    return mask_secrets(str(exc) or type(exc).__name__)


#: Connection errors that mean a server cannot be reached (a broken pipe on our own output does not).
_UNREACHABLE = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError)


def main(argv: Sequence[str] | None = None) -> Any:
    """Run the CLI, turning library and operating-system errors into one-line messages and exit codes."""
    # Distributed workers (torchrun) print errors once, from rank 0.
    quiet_rank = os.environ.get("RANK", "0") != "0"
    from lifecycle.tracking import use_local_artifact_root

    use_local_artifact_root()
    try:
        try:
            return cli.main(args=list(argv) if argv is not None else None, prog_name="lifecycle",
                            standalone_mode=False)
        except OSError as exc:
            # Refused/reset connections and requests' errors are OSErrors too, but mean "cannot
            # reach", not "cannot write".
            if isinstance(exc, _UNREACHABLE) or type(exc).__module__.split(".")[0] in ("requests", "urllib3"):
                raise TrackingUnavailableError(f"cannot connect: {' '.join(str(exc).split())}") from exc
            # Permission denied, disk full, port in use ...: the user's to fix, not a crash.
            raise from_os_error(exc) from exc
        except OverflowError as exc:
            if "port" not in str(exc):
                raise
            # socket.bind() refuses a port above 65535 with OverflowError, not OSError.
            raise AddressUnavailableError(" ".join(str(exc).split())) from exc
        except Exception as exc:
            # A database that cannot be reached (the tracking store, a study storage) surfaces as
            # SQLAlchemy's OperationalError (after MLflow's own retries): not a crash either.
            if type(exc).__name__ == "OperationalError" and type(exc).__module__.startswith("sqlalchemy"):
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise TrackingUnavailableError(f"cannot reach the database: {first}") from exc
            raise
    except LifecycleError as exc:
        if not quiet_rank:
            click.echo(f"Error: {_shown(exc)}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # One line, as every other refusal: click's own form adds a usage block and a hint.
        if not quiet_rank:
            where = exc.ctx.command_path if exc.ctx is not None else "lifecycle"
            message = "; ".join(line.strip() for line in _shown(exc.format_message()).splitlines() if line.strip())
            click.echo(f"Error: {message} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.message = _shown(exc.message)
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
