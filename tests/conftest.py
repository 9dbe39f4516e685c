"""Shared fixtures: an isolated tracking database, real servers, and tiny prepared data.

Fixtures that start processes are session-scoped; tests isolate themselves by names
(experiments, registered models), not by servers.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests import servers

# docs/trust.md is generated from the `tried` markers and the outcome of each marked test: with this
# variable set to a file, every marked test appends one JSON line per marker (see tests/trust_page.py).
TRIED_OUT = "LIFECYCLE_TRIED_OUT"
_TRIED_PHASES = pytest.StashKey[dict]()


@pytest.fixture(scope="session", autouse=True)
def _isolated_tracking(tmp_path_factory: pytest.TempPathFactory):
    """Point MLflow at a session-private sqlite database: tests never touch ./mlflow.db."""
    root = tmp_path_factory.mktemp("tracking")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    # With a sqlite tracking URI MLflow puts artifacts under ./mlruns of the current directory;
    # this variable (what `mlflow server` itself sets for its store) keeps test artifacts, also
    # those of `mlflow run` subprocesses, out of the checkout.
    os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"] = str(root / "artifacts")
    # Hub access is impossible here and must never be attempted silently.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield os.environ["MLFLOW_TRACKING_URI"]
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking database for one test (for tests that count runs or versions)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module single-threaded: tiny models gain nothing from several threads, and on a
    shared 2-core machine two spinning threads made a training step 15x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture
def unique_name() -> str:
    """A registered-model / experiment name no other test uses."""
    return f"lm-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def artifacts_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """Log this test's runs to a fresh experiment of their own (artifacts in a temporary folder)."""
    import uuid

    from mlflow.tracking import MlflowClient

    name = f"data-tests-{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("artifacts")
    MlflowClient().create_experiment(name, artifact_location=root.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` with a sqlite backend, shared by the session."""
    work = tmp_path_factory.mktemp("mlflow-server-sqlite")
    server = servers.start_mlflow_server(f"sqlite:///{work / 'backend.db'}", work)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on a fresh PostgreSQL database (skips, or fails in CI, without one)."""
    servers.require_postgres()
    uri = servers.create_postgres_database()
    work = tmp_path_factory.mktemp("mlflow-server-pg")
    server = servers.start_mlflow_server(uri, work)
    yield server
    server.stop()
    servers.drop_postgres_database(uri)


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared data from a slice of the built-in corpus: small vocab, 64-token blocks.

    Made through the CLI, exactly as a user would, so every stage's tests consume the real
    prepare output contract.
    """
    from tests.cli import cli

    out = tmp_path_factory.mktemp("prepared") / "data"
    code = cli("prepare", "--source", "builtin:pydoc", "--output", str(out), "--vocab-size", "512",
               "--block-size", "64", "--max-documents", "400")
    if code != 0:
        raise SystemExit(code)
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fast unit tests first, then the modules with end-to-end tests (servers, `mlflow run`).

    A broken import then fails in seconds (pytest runs with -x in CI), and the slow tests only
    run once the cheap ones pass.
    """
    # Whole modules move, never single tests: interleaving two modules would stretch a
    # module-scoped fixture (an experiment, an environment variable) over another's tests.
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: 1 if item.module.__name__ in slow_modules else 0)


@pytest.fixture(scope="module")
def compress_parent(prepared_tiny: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> dict:
    """A tiny registered model for `lifecycle compress` to compress; see tests/compress_support.py.

    Module-scoped, not session-scoped: the compress tests count the name's versions (the int8 test's
    variant is version 2), so the two compress modules must not share one name.
    """
    from tests import compress_support

    return compress_support.train_parent(prepared_tiny, tmp_path_factory)


@pytest.fixture(scope="session")
def lifecycle_history(prepared_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny model's whole life (train, gates, serving, `mlflow run -e retrain`, rollback,
    monitor) for the retrain and report tests; see tests/history.py."""
    import torch

    from tests import history

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on a shared 2-core machine
    try:
        return history.build(prepared_tiny, tmp_path_factory.mktemp("history"))
    finally:
        torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Record a `tried` test's outcome (passed / failed / skipped) once its teardown is reported."""
    outcome = yield
    path = os.environ.get(TRIED_OUT)
    markers = list(item.iter_markers("tried"))
    if not path or not markers:
        return
    report = outcome.get_result()
    phases = item.stash.setdefault(_TRIED_PHASES, {})
    phases[report.when] = "skipped" if report.skipped else report.outcome
    if report.when != "teardown":
        return
    states = [phases.get(when) for when in ("setup", "call", "teardown")]
    final = "failed" if "failed" in states else "skipped" if "skipped" in states else "passed"
    with open(path, "a", encoding="utf-8") as out:
        for marker in markers:
            area, tried, result = (list(marker.args) + [None, None, None])[:3]
            # One write per line: several pytest processes may append to the same file.
            out.write(json.dumps({"nodeid": item.nodeid, "area": area, "tried": tried, "result": result,
                                  "outcome": final}, ensure_ascii=False) + "\n")
