"""Shared by the MLproject entry point scripts: turn ``key=value`` pairs into CLI flags.

MLproject commands render every parameter, set or not, so each script receives ``key=value``
words named like the command's options (``set=`` for ``--set``); empty values mean "not given" and
boolean flags take ``true``/``false`` (or yes/no, on/off, 1/0; any other word is refused, never read
as false). Every other value is passed on exactly as written (never
re-read as YAML, never stripped). The script then runs the same click command a user runs, so
`mlflow run . -e STEP` and `lifecycle STEP` cannot drift apart.
"""

from __future__ import annotations

import sys
from typing import NoReturn, Sequence

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _refuse(message: str) -> NoReturn:
    """A bad entry point word: one line and exit 2, as the CLI refuses a bad flag."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)


def to_cli_args(command: str, words: Sequence[str]) -> list[str]:
    """Translate ``["source=x", "overwrite=true", "set=a=1;b=2"]`` into click arguments.

    Values go as ``--option=VALUE`` and positionals after ``--``, so a value that starts with a
    dash is a value, not an option.
    """
    from lifecycle.cli import COMMANDS, cli

    ctx_cmd = cli.get_command(None, command)  # type: ignore[arg-type]
    if ctx_cmd is None:
        _refuse(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    params = {p.name: p for p in ctx_cmd.params}
    # The option's own spelling (`set=...` for `--set`, whose click name is `overrides`) and the click name.
    for p in ctx_cmd.params:
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                params.setdefault(opt[2:].replace("-", "_"), p)
    positional: list[str] = []
    flags: list[str] = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            positional.append(word)
            continue
        name = key.replace("-", "_")
        param = params.get(name)
        if param is None:
            _refuse(f"{command}: unknown parameter {key!r}; valid: {', '.join(sorted(params))}")
        if value == "":
            continue
        if getattr(param, "param_type_name", "") == "argument":
            positional.append(value)
            continue
        opt = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            word = value.strip().lower()
            if word not in _TRUE + _FALSE:
                _refuse(f"{command}: {key}={value!r} is not true or false")
            if word in _TRUE:
                flags.append(opt)
            continue
        if getattr(param, "multiple", False):
            # MLproject parameters are single strings: several values are separated by ';'.
            # Whitespace after a ';' separates; the rest of each item is the user's text.
            for item in value.split(";"):
                if item.strip():
                    flags.append(f"{opt}={item.lstrip()}")
            continue
        flags.append(f"{opt}={value}")
    return [command, *flags, "--", *positional]


def run(command: str, argv: Sequence[str] | None = None) -> None:
    """Run ``lifecycle COMMAND`` with the entry point's ``key=value`` words; exit with its code."""
    from lifecycle.cli import main

    args = to_cli_args(command, list(sys.argv[1:] if argv is None else argv))
    main(args)
