"""The prepare stage end to end: one MLflow run with params, metrics, artifacts and lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.cli import main
from lifecycle.data.synthetic import generate_documents

REPO = Path(__file__).resolve().parents[1]




def _cli(args: list[str]) -> dict:
    from tests.cli import cli_output

    code, output = cli_output("prepare", *args)
    assert code == 0, output
    line = output[output.rindex('{"output"'):]
    return json.loads(line.splitlines()[0])


def test_prepare_records_one_run_with_lineage(tmp_path: Path, tracking_uri: str, artifacts_in_tmp: str) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    out = tmp_path / "p1"
    summary = _cli(["--source", "builtin:pydoc", "--output", str(out), "--vocab-size", "400",
                    "--block-size", "32", "--max-documents", "120"])
    card = json.loads((out / "data_card.json").read_text())
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_id for r in runs] == [summary["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["data_digest"] == card["digest"] == summary["digest"]
    assert run.data.tags["lifecycle.stage"] == "prepare"
    assert run.data.params["source"] == "builtin:pydoc" and run.data.params["cfg.pack.block_size"] == "32"
    m = run.data.metrics
    assert m["data/documents_read"] == 120 and m["data/documents_kept"] == card["counts"]["documents_kept"]
    assert m["data/tokens/train"] == card["tokens"]["train"] and m["data/throughput_mb_s"] > 0
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"data_card.json", "plots", "prepared", "samples"} <= top
    prepared = {a.path for a in client.list_artifacts(run.info.run_id, "prepared")}
    assert {"prepared/train", "prepared/validation", "prepared/test", "prepared/raw", "prepared/tokenizer",
            "prepared/data_card.json"} <= prepared
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/document_lengths.png"]
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and card["digest"].startswith(inputs[0].dataset.digest)

    # Continuous training: new data deduplicated against, and tokenized with, the logged data.
    out2 = tmp_path / "p2"
    uri = f"runs:/{summary['run_id']}/prepared"
    _cli(["--source", "builtin:pydoc", "--output", str(out2), "--block-size", "32", "--max-documents", "208",
          "--dedup-against", uri, "--tokenizer", uri])
    card2 = json.loads((out2 / "data_card.json").read_text())
    assert card2["dedup"]["exact_against"] == card["counts"]["documents_kept"]
    assert card2["tokenizer"]["trained"] is False and card2["vocab_size"] == card["vocab_size"]
    assert (out2 / "tokenizer" / "tokenizer.json").read_text() == (out / "tokenizer" / "tokenizer.json").read_text()


def test_unknown_run_uri_is_not_found(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--output", str(tmp_path / "o"), "--dedup-against", "runs:/0123456789abcdef/prepared"])
    assert exc.value.code == 5
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_mlflow_run_entry_point(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                           for d in generate_documents(150, seed=4, chinese_share=0.2)), encoding="utf-8")
    out = tmp_path / "prepared"
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    # Artifacts go to the temporary folder, not to ./mlruns of the repository (mlflow run's cwd).
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).create_experiment(
        "prepare-e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "prepare", "--env-manager", "local",
         "--experiment-name", "prepare-e2e", "-P", f"source={src}", "-P", f"output={out}", "-P", "vocab_size=300", "-P", "block_size=16",
         "-P", "set=split.validation=0.2;split.test=0.2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "data_card.json").read_text())
    assert card["counts"]["documents_kept"] == 150 and card["block_size"] == 16
    check = subprocess.run(
        [sys.executable, "-c", (
            "import json, mlflow\n"
            "from mlflow.tracking import MlflowClient\n"
            "runs = mlflow.search_runs(search_all_experiments=True, output_format='list')\n"
            "r = runs[0]\n"
            "arts = [a.path for a in MlflowClient().list_artifacts(r.info.run_id, 'prepared')]\n"
            "print(json.dumps({'n': len(runs), 'status': r.info.status, 'tags': r.data.tags,\n"
            "  'params': r.data.params, 'metrics': r.data.metrics, 'arts': arts}))\n")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]
    info = json.loads(check.stdout.strip().splitlines()[-1])
    assert info["n"] == 1 and info["status"] == "FINISHED"  # mlflow run's run, joined by the command
    assert info["tags"]["data_digest"] == card["digest"]
    assert info["params"]["cfg.split.validation"] == "0.2"
    assert info["metrics"]["data/documents_kept"] == 150
    assert "prepared/train" in info["arts"] and "prepared/data_card.json" in info["arts"]
