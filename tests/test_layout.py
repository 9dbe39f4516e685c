"""The tests' own layout: one CLI runner (tests/cli.py), and `test_` names only for modules that hold tests.

Two private copies of a runner drift apart (one maps errors to exit codes, the other lets them escape),
and a helper module named `test_*` is collected by pytest as if it held tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
RUNNER = TESTS / "cli.py"


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"), str(path))) for path in sorted(TESTS.glob("*.py"))]


def _names(node: ast.AST) -> set[str]:
    """Every name a piece of code refers to (`main`, `CliRunner`, `SystemExit`, attribute names too)."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            found.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            found.add(sub.attr)
    return found


def _runs_the_cli_itself(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A function that drives click's runner, or calls `main` and turns its SystemExit into a code."""
    names = _names(func)
    if "CliRunner" in names:
        return True
    catches_exit = any(isinstance(h, ast.ExceptHandler) and h.type is not None and "SystemExit" in _names(h.type)
                       for h in ast.walk(func))
    calls_main = any(isinstance(c, ast.Call) and "main" in _names(c.func) for c in ast.walk(func))
    return catches_exit and calls_main


def test_no_private_copies_of_the_cli_runner():
    copies = [f"{path.name}:{func.lineno} {func.name}()"
              for path, tree in _modules() if path != RUNNER
              for func in ast.walk(tree)
              if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and not func.name.startswith("test")
              and _runs_the_cli_itself(func)]
    assert not copies, f"helpers that run the CLI themselves; use tests/cli.py's cli() / cli_output(): {copies}"


def test_modules_named_test_hold_tests_and_helpers_are_not_named_test():
    def has_tests(tree: ast.Module) -> bool:
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                return True
            if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                return True
        return False

    helpers = [path.name for path, tree in _modules() if path.name.startswith("test_") and not has_tests(tree)]
    assert not helpers, f"modules named test_* that hold no tests (rename them without the prefix): {helpers}"
