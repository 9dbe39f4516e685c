"""Run the ``lifecycle`` CLI in the test process, as a user's shell would, and return its exit code."""

from __future__ import annotations

from lifecycle.cli import main


def cli(*args: str) -> int:
    """``lifecycle ARGS...`` in-process; the exit code (0 when it returns normally)."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
