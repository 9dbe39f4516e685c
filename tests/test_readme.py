"""The README's and the docs pages' commands are real: every `lifecycle` command parses against the CLI,
every `mlflow run` names an entry point and parameters the MLproject has, every benchmark flag exists,
every file a command names is in the checkout, and every `lifecycle` subcommand shown is run for real
by some test in this suite. The README stays an introduction that links every page of docs/, and
every relative link resolves.

Running each line verbatim here would train on the whole built-in corpus several times; the
end-to-end tests run the same commands with tiny settings instead, and this module checks that the
two cannot drift apart.
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
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]

# The README is the introduction; the reference lives in docs/ (issue #19).
README_MAX_LINES = 300

SHELL_WORDS = ("lifecycle", "mlflow", "python", "torchrun", "curl", "pip", "bash")


def page_commands(page: Path) -> list[str]:
    """Shell commands from a Markdown page's code blocks (indented, or fenced as bash/sh/shell),
    continuation lines joined; other code (JSON, templates, YAML) is left out."""
    lines: list[str] = []
    pending = ""
    fence: str | None = None
    for raw in page.read_text(encoding="utf-8").splitlines():
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


def readme_commands() -> list[str]:
    """Shell commands of the README itself."""
    return page_commands(README)


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


# (page, command) for every shell command of the README and of every docs page.
SHOWN = [(page, c) for page in PAGES for c in page_commands(page)]
COMMANDS = [c for _, c in SHOWN]
LIFECYCLE = [(c, a) for c in COMMANDS if (a := _lifecycle_args(_words(c)))]
_IDS = [f"{page.name}:{c[:60]}" for page, c in SHOWN if _lifecycle_args(_words(c))]


def test_readme_has_the_walkthrough_commands():
    readme = readme_commands()
    subcommands = {a[0] for c in readme if (a := _lifecycle_args(_words(c)))}
    for needed in ("prepare", "train", "evaluate", "promote", "rollback", "serve", "monitor"):
        assert needed in subcommands, f"README shows no `lifecycle {needed}`"
    assert any(c.startswith("mlflow run .") for c in readme)
    assert "pip install torch==2.13.0 && pip install -e '.[test,spark]' && python -m pytest" in README.read_text()


def test_docs_pages_have_commands_the_checks_see():
    """The docs pages' commands are collected too (a page whose code blocks the parser missed would
    leave its commands unchecked)."""
    for name in ("data-preparation.md", "team-setup.md", "tune-and-compress.md", "instruction-tuning.md"):
        page = REPO / "docs" / name
        assert page_commands(page), f"docs/{name} shows no command the checks collect"


@pytest.mark.parametrize("command,args", LIFECYCLE, ids=_IDS)
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
        if word.startswith(("registry_policies/", "examples/")):
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
                               cwd=REPO, timeout=120, check=False).stdout
    for word in words[2:]:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in help_text, f"{command}: {script.name} has no {word}"


def test_every_readme_subcommand_is_run_by_a_test():
    """Each `lifecycle X` the README or a docs page shows is invoked for real somewhere in tests/ (through
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
    assert not missing, f"README/docs commands no test runs: {missing}"


def test_readme_is_an_introduction_that_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move reference text to docs/"
    linked = {m.split("#", 1)[0] for m in re.findall(r"\]\((docs/[^)\s]+)\)", text)}
    missing = [f"docs/{p.name}" for p in DOCS if f"docs/{p.name}" not in linked]
    assert not missing, f"README.md links no {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings, fence = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#+ (.*)", line)):
            headings.append(m.group(1))
    return {_anchor(h) for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    """Every relative link of the README and docs pages names a file of the checkout, and a `#section`
    names a heading of that page (pages are split and merged; a moved section must not leave a
    dead link behind)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


# Entry points the docs show that no test runs yet, through `mlflow run` or their script. Known gaps, kept
# visible: the test below fails once one is run (take it off the list then) or when another joins it.
ENTRY_POINTS_NOT_RUN_YET = {"tune"}


def test_every_shown_entry_point_is_run_by_a_test():
    """Each `mlflow run . -e X` the README or a docs page shows is run by some test: through `mlflow run`
    (`"-e", "X"`, or no `-e` for main) or by running the entry point's script, as the MLproject does."""
    project = yaml.safe_load((REPO / "MLproject").read_text())
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("*.py")
                        if p.name != Path(__file__).name)
    shown = set()
    for command in MLFLOW_RUNS:
        words = _words(command)
        shown.add(words[words.index("-e") + 1] if "-e" in words else "main")
    run = set()
    for entry in shown:
        script = Path(project["entry_points"][entry]["command"].split()[1]).name
        patterns = [rf"""["']-e["'],\s*["']{entry}["']""", rf"""entrypoints/{script}|["']{script}["']"""]
        if entry == "main":
            patterns.append(r"""["']mlflow["'],\s*["']run["'],\s*str\(REPO\),\s*["']--env-manager""")
        if any(re.search(p, sources) for p in patterns):
            run.add(entry)
    assert shown - run == ENTRY_POINTS_NOT_RUN_YET & shown, (
        f"entry points shown but run by no test: {sorted(shown - run)}; "
        f"ENTRY_POINTS_NOT_RUN_YET lists {sorted(ENTRY_POINTS_NOT_RUN_YET)} (update it)")
