"""Generate docs/trust.md, the list of what the tests tried (bad input, injected faults) and what happened.

The page is made from the tests, never written by hand: each test that proves a class of failure closed
carries `@pytest.mark.tried(area, what_was_tried, what_happens)`, and tests/conftest.py records the
outcome of every marked test when `LIFECYCLE_TRIED_OUT=<file>` is set. Usage:

    python -m tests.trust_page --run --write docs/trust.md          # run `pytest -m tried`, then write
    python -m tests.trust_page --from results.jsonl --write docs/trust.md

Every marked test the suite holds is listed (collected with `pytest --collect-only -m tried`), also
one that did not run (outcome "not run"), so the page cannot silently lose a row.
Loaded as a pytest plugin (`-p tests.trust_page`) with `LIFECYCLE_TRIED_COLLECT=<file>` set, this module
writes the markers of the collected tests to that file instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "trust.md"
COLLECT_OUT = "LIFECYCLE_TRIED_COLLECT"
TRIED_OUT = "LIFECYCLE_TRIED_OUT"  # the variable tests/conftest.py reads
REGENERATE = "python -m tests.trust_page --run --write docs/trust.md"


@dataclass
class Row:
    """One marker of one test function; a parametrized test's cases share a row."""

    area: str
    tried: str
    result: str
    test: str
    outcomes: dict[str, int] = field(default_factory=dict)

    def cells(self) -> list[str]:
        """The row's first three cells (what was tried, what happens, the test), as the page writes them."""
        cases = sum(self.outcomes.values())
        test = f"`{self.test}`" + (f" ({cases} cases)" if cases > 1 else "")
        return [_cell(self.tried), _cell(self.result), test]

    def outcome(self) -> str:
        """`passed`, or a count per outcome when the cases differ or there are several."""
        if len(self.outcomes) == 1 and sum(self.outcomes.values()) == 1:
            return next(iter(self.outcomes))
        return ", ".join(f"{n} {state}" for state, n in sorted(self.outcomes.items()))


def _cell(text: str) -> str:
    # A table cell is one line, a bare `|` would end it, and `<IPV4>` would be read as an HTML tag.
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def test_function(nodeid: str) -> str:
    """The test function a node id belongs to (a parametrized case's id without its `[...]`)."""
    return nodeid.split("[", 1)[0]


def marker_records(items: Iterable[pytest.Item]) -> list[dict]:
    """One record per `tried` marker of each item: node id and the marker's three arguments."""
    records = []
    for item in items:
        for marker in item.iter_markers("tried"):
            area, tried, result = (list(marker.args) + [None, None, None])[:3]
            records.append({"nodeid": item.nodeid, "area": area, "tried": tried, "result": result,
                            "nargs": len(marker.args), "kwargs": sorted(marker.kwargs)})
    return records


def pytest_collection_finish(session: pytest.Session) -> None:
    """As a plugin (`-p tests.trust_page`): write the collected tests' markers to $LIFECYCLE_TRIED_COLLECT."""
    path = os.environ.get(COLLECT_OUT)
    if path:
        Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                      for r in marker_records(session.items)), encoding="utf-8")


def collect_markers(pytest_args: Iterable[str] = ()) -> list[dict]:
    """Every `tried` marker in the suite, from `pytest --collect-only -m tried` in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "collected.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "tried", "-p", "no:cacheprovider",
             "-p", "tests.trust_page", *pytest_args, str(REPO / "tests")],
            cwd=REPO, env={**os.environ, COLLECT_OUT: str(out)}, capture_output=True, text=True, timeout=600,
            check=False)
        # 5: no test carries the marker (pytest's "no tests collected").
        if proc.returncode not in (0, 5) or not out.exists():
            raise RuntimeError(f"collecting the tried markers failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return read_jsonl(out)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file written by the recorder or the collector."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def rows(collected: list[dict], results: list[dict]) -> list[Row]:
    """Group records by test function and marker; a collected test missing from the results is "not run"."""
    outcome_of = {(r["nodeid"], r["area"], r["tried"], r["result"]): r["outcome"] for r in results}
    records = collected or [{k: r[k] for k in ("nodeid", "area", "tried", "result")} for r in results]
    grouped: dict[tuple, Row] = {}
    for rec in records:
        key = (test_function(rec["nodeid"]), rec["area"], rec["tried"], rec["result"])
        row = grouped.setdefault(key, Row(rec["area"], rec["tried"], rec["result"], key[0]))
        state = outcome_of.get((rec["nodeid"], rec["area"], rec["tried"], rec["result"]), "not run")
        row.outcomes[state] = row.outcomes.get(state, 0) + 1
    return sorted(grouped.values(), key=lambda r: (r.area.lower(), r.test, r.tried))


def render(page_rows: list[Row]) -> str:
    """The Markdown page: a summary, then one table per area."""
    by_area: dict[str, list[Row]] = defaultdict(list)
    for row in page_rows:
        by_area[row.area].append(row)
    totals: dict[str, int] = defaultdict(int)
    for row in page_rows:
        for state, n in row.outcomes.items():
            totals[state] += n
    summary = ", ".join(f"{n} {state}" for state, n in sorted(totals.items())) or "none"
    lines = [
        "# What was tried",
        "",
        f"<!-- Generated from the tests' `@pytest.mark.tried` markers by `{REGENERATE}`;",
        "     do not edit by hand: tests/test_trust_page.py fails when a marked test is missing here. -->",
        "",
        "The kinds of bad input and the faults the test suite throws at `lifecycle`, and what happens each",
        "time. Each row is one test (a test that tries several cases says how many) with the outcome of the",
        "run this page was generated from. A row stands for a whole class of input or fault: generated input",
        "(hypothesis), a fault injected into a real process (SIGKILL, a dead server), or every case of a list.",
        "How to add a row: [testing](testing.md#how-the-tests-are-laid-out). [Back to the README](../README.md).",
        "",
        f"{len(page_rows)} tests in {len(by_area)} areas; cases: {summary}.",
    ]
    for area in sorted(by_area, key=str.lower):
        lines += ["", f"## {area}", "", "| what was tried | what happens | test | outcome |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row.cells())} | {row.outcome()} |" for row in by_area[area]]
    return "\n".join(lines) + "\n"


def run_marked_tests(pytest_args: Iterable[str]) -> tuple[int, list[dict]]:
    """Run `pytest -m tried` with the recorder on; its exit code and the recorded outcomes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.jsonl"
        out.touch()
        code = subprocess.run([sys.executable, "-m", "pytest", "-m", "tried", "-p", "no:cacheprovider",
                               *pytest_args], cwd=REPO, env={**os.environ, TRIED_OUT: str(out)}, check=False).returncode
        return code, read_jsonl(out)


def main(argv: list[str] | None = None) -> int:
    """Command line: render docs/trust.md from a results file or from a run of the marked tests."""
    parser = argparse.ArgumentParser(prog="python -m tests.trust_page", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="results", type=Path, help="JSON lines written with LIFECYCLE_TRIED_OUT set")
    source.add_argument("--run", action="store_true", help="run `pytest -m tried` first and use its outcomes")
    parser.add_argument("--write", type=Path, help="where to write the page (default: print it)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments for --run (after --)")
    args = parser.parse_args(argv)
    code = 0
    if args.run:
        code, results = run_marked_tests(args.pytest_args)
    else:
        results = read_jsonl(args.results)
    text = render(rows(collect_markers(), results))
    if args.write:
        tmp = args.write.with_name(args.write.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.write)
        print(f"wrote {args.write}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    # A failed marked test still gets its row ("failed"), and the exit code says so.
    return 0 if code in (0, 5) else 1


if __name__ == "__main__":
    sys.exit(main())
