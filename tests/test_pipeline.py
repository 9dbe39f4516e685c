"""The whole lifecycle as one command: child runs of one parent, reuse of unchanged steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.cli import cli_output

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds per step on two cores; the real defaults are the README's main job.
FAST = ["--set", "prepare.source.max_documents=120", "--set", "prepare.tokenizer.vocab_size=512",
        "--set", "prepare.pack.block_size=64", "--set", "train.eval_every=10", "--set", "train.batch_size=8",
        "--set", "evaluate.generation.num_prompts=4", "--set", "evaluate.generation.max_new_tokens=8",
        "--set", "train.progress=false"]


def _invoke(args: list[str]) -> str:
    code, output = cli_output(*args)
    assert code == 0, output
    return output


@pytest.mark.e2e
def test_pipeline_runs_every_step_then_reuses_them(tracking_uri, tmp_path, unique_name):
    args = ["pipeline", "--model-name", unique_name, "--max-steps", "20", "--workdir", str(tmp_path / "work"), *FAST]
    first = _invoke(args)
    assert "reused no steps" in first
    assert f"Registered: models:/{unique_name}/1" in first
    assert "promote_staging: promoted" in first
    # Production waits for a person under the default policy (approved_by is required).
    assert "promote_production: refused" in first and "approved_by" in first
    assert f"lifecycle rollback {unique_name}" in first

    client = mlflow.MlflowClient()
    parent = mlflow.search_runs(filter_string="tags.`lifecycle.stage` = 'pipeline'", output_format="list")
    assert len(parent) == 1
    children = mlflow.search_runs(filter_string=f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'",
                                  output_format="list")
    assert {c.info.run_name for c in children} == {"prepare", "train", "evaluate", "promote_staging",
                                                   "promote_production"}
    mv = client.get_model_version(unique_name, "1")
    assert float(mv.tags["eval/perplexity"]) > 1 and mv.tags["data_digest"]
    assert str(client.get_model_version_by_alias(unique_name, "staging").version) == "1"

    second = _invoke(args)
    assert "[prepare] reused" in second and "[train] reused" in second and "[evaluate] reused" in second
    assert "reused prepare, train, evaluate" in second
    assert "already holds @staging" in second
    # Nothing new was trained or registered.
    assert len(client.search_model_versions(f"name='{unique_name}'")) == 1

    # A changed config reruns training (and what depends on it), but not the data preparation.
    third = _invoke([*args, "--set", "train.learning_rate=0.002"])
    assert "[prepare] reused" in third and "[train] running" in third and "[evaluate] running" in third
    assert f"Registered: models:/{unique_name}/2" in third


@pytest.mark.e2e
def test_main_entry_point_through_mlflow_run(tmp_path, unique_name):
    def tracking_files(folder: Path) -> set[tuple[str, int, int]]:
        """What MLflow's local defaults hold in a folder: files under ./mlruns and ./mlartifacts, and
        ./mlflow.db, with size and modification time (a user's earlier `mlflow run` may have left them)."""
        found = {(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                 for name in ("mlruns", "mlartifacts") for p in (folder / name).rglob("*") if p.is_file()}
        db = folder / "mlflow.db"
        return found | ({("mlflow.db", db.stat().st_size, db.stat().st_mtime_ns)} if db.exists() else set())

    checkout_before = tracking_files(REPO)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    sets = ";".join(a for a in FAST if a != "--set")
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local",
         "-P", f"model_name={unique_name}", "-P", "max_steps=10", "-P", f"workdir={tmp_path / 'work'}",
         "-P", f"set={sets}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Registered: models:/{unique_name}/1" in proc.stdout
    # The run's artifacts went where the tracking configuration says, not into ./mlruns of either folder;
    # what the checkout held before (a newcomer's `mlflow run .`) is left exactly as it was.
    assert not (tmp_path / "mlruns").exists()
    assert tracking_files(REPO) == checkout_before
