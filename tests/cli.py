"""Run the ``lifecycle`` CLI in the test process, as a user's shell would: the one CLI runner of the tests.

Both helpers go through ``lifecycle.cli.main``, so errors become the one-line messages and exit codes a
user sees; tests keep no private copies of this (tests/test_layout.py checks).
"""

from __future__ import annotations

from click.testing import CliRunner

from lifecycle.cli import main


def cli(*args: str) -> int:
    """``lifecycle ARGS...`` in-process; the exit code (0 when it returns normally)."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def cli_output(*args: str) -> tuple[int, str]:
    """``lifecycle ARGS...`` in-process with its output captured: the exit code, and stdout and stderr
    interleaved as a terminal shows them."""
    with CliRunner().isolation() as (_stdout, _stderr, output):
        code = cli(*args)
    return code, output.getvalue().decode("utf-8", errors="replace")
