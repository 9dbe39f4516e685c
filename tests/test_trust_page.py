"""docs/trust.md is generated from the tests and cannot go stale: it lists every test that carries the
`tried` marker, with the marker's words; the recorder in tests/conftest.py and the renderer in
tests/trust_page.py turn a real pytest run into the page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import trust_page

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def collected() -> list[dict]:
    """Every `tried` marker of the suite (one `pytest --collect-only` subprocess for the module)."""
    return trust_page.collect_markers()


def test_every_tried_marker_names_an_area_what_was_tried_and_what_happens(collected):
    assert collected, "no test carries @pytest.mark.tried: the trust page would be empty"
    bad = [r["nodeid"] for r in collected
           if r["nargs"] != 3 or r["kwargs"] or not all(isinstance(r[k], str) and r[k].strip()
                                                        for k in ("area", "tried", "result"))]
    assert not bad, f"@pytest.mark.tried takes three non-empty texts (area, what was tried, what happens): {bad}"


def test_trust_page_lists_every_marked_test(collected):
    page = trust_page.PAGE.read_text(encoding="utf-8")
    expected = trust_page.rows(collected, [])
    missing = [f"{row.test}: {row.tried}" for row in expected if f"| {' | '.join(row.cells())} |" not in page]
    listed = set(re.findall(r"^\|.*?\| `(tests/[^`]+)`", page, flags=re.MULTILINE))
    stale = sorted(listed - {row.test for row in expected})
    assert not missing and not stale, (
        f"docs/trust.md is out of date (regenerate it: {trust_page.REGENERATE}); "
        f"not listed or changed: {missing}; no longer a marked test: {stale}")


def test_recorded_outcomes_become_the_page(tmp_path):
    """A real pytest run with the recorder on: passed, failed, skipped and parametrized cases each
    reach the page, grouped by area, with text that would break a table (`|`, newlines) kept in one cell."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent('''
        import pytest

        @pytest.mark.tried("zeta area", "a pipe | and a\\nnewline", "stays in one cell as <TEXT>")
        def test_passes():
            pass

        @pytest.mark.tried("alpha area", "a failing check", "reported as failed")
        def test_fails():
            assert False

        @pytest.mark.tried("alpha area", "a skipped check", "reported as skipped")
        def test_skips():
            pytest.skip("not here")

        @pytest.mark.tried("alpha area", "two cases", "both run")
        @pytest.mark.parametrize("n", [1, 2])
        def test_cases(n):
            pass

        def test_unmarked():
            pass
    '''))
    results = tmp_path / "results.jsonl"
    env = {**os.environ, trust_page.TRIED_OUT: str(results), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "-o", "markers=tried", str(tmp_path / "test_sample.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]  # test_fails failed, as it should
    records = trust_page.read_jsonl(results)
    outcomes = {r["nodeid"].split("::")[-1]: r["outcome"] for r in records}
    assert outcomes == {"test_passes": "passed", "test_fails": "failed", "test_skips": "skipped",
                        "test_cases[1]": "passed", "test_cases[2]": "passed"}

    page = trust_page.render(trust_page.rows([], records))
    assert page.index("## alpha area") < page.index("## zeta area")
    assert ("| a pipe \\| and a newline | stays in one cell as &lt;TEXT&gt; | `test_sample.py::test_passes` | passed |"
            in page)
    assert "| two cases | both run | `test_sample.py::test_cases` (2 cases) | 2 passed |" in page
    assert "| a failing check | reported as failed | `test_sample.py::test_fails` | failed |" in page
    assert "| a skipped check | reported as skipped | `test_sample.py::test_skips` | skipped |" in page
    assert "test_unmarked" not in page
    assert "5 tests" not in page and "4 tests in 2 areas" in page


def test_a_marked_test_that_did_not_run_is_listed_as_not_run():
    collected = [{"nodeid": "tests/test_x.py::test_y", "area": "a", "tried": "t", "result": "r"}]
    page = trust_page.render(trust_page.rows(collected, []))
    assert "| t | r | `tests/test_x.py::test_y` | not run |" in page
