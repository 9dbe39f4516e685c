"""The README's commands are real: every `lifecycle` command parses against the CLI, every
`mlflow run` names an entry point and parameters the MLproject has, every benchmark flag exists,
every file a command names is in the checkout, and every `lifecycle` subcommand the README shows
is run for real by some test in this suite.

Running each README line verbatim here would train on the whole built-in corpus several times;
the end-to-end tests run the same commands with tiny settings instead, and this module checks
that the two cannot drift apart.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


SHELL_WORDS = ("lifecycle", "mlflow", "python", "torchrun", "curl", "pip")


def readme_commands() -> list[str]:
    """Shell commands from the README's code blocks (indented, or fenced as bash/sh/shell),
    continuation lines joined; other code (JSON, templates, YAML) is left out."""
    lines: list[str] = []
    pending = ""
    fence: str | None = None
    for raw in README.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:].strip() or "text")
            continue
        in_shell = fence in ("bash", "sh", "shell") or (fence is None and raw.startswith("    "))
        if not in_shell or not stripped:
            continue
        text = pending + stripped
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        lines.append(text)
    commands: list[str] = []
    for line in lines:
        line = re.sub(r"\s+#\s.*$", "", line)  # trailing comments
        for part in line.split("&&"):
            part = part.strip().rstrip("&").strip()
            first = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", part).split(" ", 1)[0]
            if first in SHELL_WORDS:
                commands.append(part)
    return commands


def _words(command: str) -> list[str]:
    words = shlex.split(command.replace("<", "X").replace(">", "X"))
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words.pop(0)
    return words


def _lifecycle_args(words: list[str]) -> list[str] | None:
    if words[:1] == ["lifecycle"]:
        return words[1:]
    if "-m" in words and words[0] in ("python", "torchrun"):
        i = words.index("-m")
        if words[i + 1 : i + 2] == ["lifecycle"]:
            return words[i + 2 :]
    return None


COMMANDS = readme_commands()
LIFECYCLE = [(c, a) for c in COMMANDS if (a := _lifecycle_args(_words(c)))]


def test_readme_has_the_walkthrough_commands():
    subcommands = {args[0] for _, args in LIFECYCLE}
    for needed in ("prepare", "train", "evaluate", "promote", "rollback", "serve", "monitor"):
        assert needed in subcommands, f"README shows no `lifecycle {needed}`"
    assert any(c.startswith("mlflow run .") for c in COMMANDS)


@pytest.mark.parametrize("command,args", LIFECYCLE, ids=[c[:60] for c, _ in LIFECYCLE])
def test_lifecycle_command_parses(command, args):
    from lifecycle.cli import cli

    cmd: click.Command = cli
    ctx_args = list(args)
    # Walk down groups (`guard serve`) to the command that takes the options.
    while isinstance(cmd, click.Group):
        sub = cmd.get_command(None, ctx_args[0])  # type: ignore[arg-type]
        assert sub is not None, f"{command}: no such command {ctx_args[0]!r}"
        cmd, ctx_args = sub, ctx_args[1:]
    try:
        cmd.make_context(cmd.name or "", ctx_args, resilient_parsing=False)
    except click.BadParameter as exc:
        # A path the reader makes first (corpus.jsonl, prepared/) need not exist here.
        assert "does not exist" in str(exc), f"{command}: {exc}"
    except click.UsageError as exc:
        pytest.fail(f"README command does not parse: {command}\n{exc}")
    for word in ctx_args:
        if word.startswith("registry_policies/") or word.startswith("examples/"):
            assert (REPO / word).exists(), f"{command}: names {word}, which is not in the checkout"


MLFLOW_RUNS = [c for c in COMMANDS if c.startswith("mlflow run")]


@pytest.mark.parametrize("command", MLFLOW_RUNS)
def test_mlflow_run_names_real_entry_points_and_parameters(command):
    project = yaml.safe_load((REPO / "MLproject").read_text())
    words = _words(command)
    entry = words[words.index("-e") + 1] if "-e" in words else "main"
    assert entry in project["entry_points"], f"{command}: MLproject has no entry point {entry!r}"
    declared = project["entry_points"][entry].get("parameters", {})
    for i, word in enumerate(words):
        if word == "-P":
            key = words[i + 1].split("=", 1)[0]
            assert key in declared, f"{command}: entry point {entry!r} has no parameter {key!r}"


BENCHMARKS = [c for c in COMMANDS if _words(c)[:2] and _words(c)[1].startswith("benchmarks/")]


@pytest.mark.parametrize("command", BENCHMARKS)
def test_benchmark_commands_and_flags_exist(command):
    words = _words(command)
    script = REPO / words[1]
    assert script.exists(), command
    if script.suffix != ".py":
        return
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                               cwd=REPO, timeout=120).stdout
    for word in words[2:]:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in help_text, f"{command}: {script.name} has no {word}"


def test_every_readme_subcommand_is_run_by_a_test():
    """Each `lifecycle X` the README shows is invoked for real somewhere in tests/ (through
    `main([...])`, click's runner, or a `lifecycle`/`python -m lifecycle` subprocess)."""
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("test_*.py")
                        if p.name != Path(__file__).name)
    sources += (REPO / "tests" / "conftest.py").read_text(encoding="utf-8")
    missing = []
    for sub in sorted({args[0] for _, args in LIFECYCLE}):
        pattern = (rf"""\[\s*["']{sub}["']"""                                   # main(["prepare", ...])
                   rf"""|["']lifecycle["'],\s*(?:["']-\w+["'],\s*)*["']{sub}["']"""  # subprocess
                   rf"""|\bcli\(\s*["']{sub}["']""")                            # a test's cli() helper
        if not re.search(pattern, sources):
            missing.append(sub)
    assert not missing, f"README commands no test runs: {missing}"
