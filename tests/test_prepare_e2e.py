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
         "--experiment-name", "prepare-e2e", "-P", f"source={src}", "-P", f"output={out}",
         "-P", "vocab_size=300", "-P", "block_size=16",
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


# -- one writer per output, and kill -9 at any point ------------------------------------------------

import signal  # noqa: E402 - the fault-injection tests' own imports
import time  # noqa: E402


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()  # the database exists before any run
    return env


def _prepare_proc(tmp_path: Path, out: Path, env: dict[str, str], seed: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lifecycle", "prepare", "--source", "builtin:pydoc", "--output", str(out),
         "--overwrite", "--vocab-size", "300", "--block-size", "16", "--max-documents", "150", "--seed", str(seed)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _complete(out: Path) -> str:
    """The digest of a complete prepared folder (every part there and readable); fails otherwise."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from lifecycle.data.card import read_card

    card = read_card(out)
    for split in ("train", "validation", "test"):
        assert len(load_from_disk(str(out / split))) == card["blocks"][split]
        assert sum(1 for _ in (out / "raw" / f"{split}.jsonl").open()) == card["splits"][split]
    assert len(AutoTokenizer.from_pretrained(str(out / "tokenizer"))) == card["vocab_size"]
    return card["digest"]


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> tuple[bool, str]:
    """SIGKILL ``proc`` as soon as ``condition()`` holds: (whether it was killed, not exited first; its stderr)."""
    deadline = time.monotonic() + timeout
    killed = False
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            hit = condition()
        except OSError:  # a folder vanished between two looks
            hit = False
        if hit:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    return killed, proc.communicate(timeout=timeout)[1]


def _temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.e2e
@pytest.mark.tried("prepare", "SIGKILL of a real `lifecycle prepare` right after it locked the output, while it wrote "
                   "the raw splits, after the pass (while logging to MLflow) and right after it swapped the "
                   "new folder in", "the output is the old or the new complete folder; the next run cleans the "
                   "temporaries up (with a warning) and succeeds")
def test_prepare_killed_at_any_point_leaves_old_or_new_output(tmp_path: Path) -> None:
    env = _env(tmp_path)
    out = tmp_path / "prepared"
    first = _prepare_proc(tmp_path, out, env, seed=1)
    assert first.wait(timeout=300) == 0, first.communicate()[1][-3000:]
    old = _complete(out)
    lock = out.with_name(f".{out.name}.lock")

    def temp_has(rel: str):
        return lambda: any((t / rel).exists() for t in _temps(out))

    inode = out.stat().st_ino
    phases = {"locked": lock.exists, "raw splits": temp_has("raw/train.jsonl"), "logging": temp_has("data_card.json"),
              "swapped": lambda: out.stat().st_ino != inode}
    seen = set()
    stderr = ""
    for name, condition in phases.items():
        proc = _prepare_proc(tmp_path, out, env, seed=2)
        killed, err = _kill_when(proc, condition)
        stderr += err
        assert killed or name == "swapped", f"the run ended before the {name!r} point"
        digest = _complete(out)
        seen.add(digest)
        assert digest == old or name == "swapped", name
    final = _prepare_proc(tmp_path, out, env, seed=2)
    stdout, err = final.communicate(timeout=300)
    assert final.returncode == 0, err[-3000:]
    new = _complete(out)
    assert new != old and json.loads(stdout.strip().splitlines()[-1])["digest"] == new
    assert seen <= {old, new}
    assert "left by an interrupted prepare" in stderr + err  # the killed runs' temporaries, removed
    assert not _temps(out) and not lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.tried("prepare", "a second `lifecycle prepare` into an output another prepare is writing",
                   "refused at once with exit 9 and one line naming the holder; the output is untouched")
def test_prepare_into_a_locked_output_is_refused(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    from lifecycle.data.publish import OutputLock

    out = tmp_path / "prepared"
    out.mkdir()
    (out / "keep.txt").write_text("theirs", encoding="utf-8")
    args = ["prepare", "--source", "builtin:pydoc", "--output", str(out), "--overwrite", "--vocab-size", "300",
            "--block-size", "16", "--max-documents", "60"]
    with OutputLock(out, what="a test"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 9
    assert len(err) == 1 and f"is being written by a test (pid {os.getpid()} on " in err[0], err
    assert (out / "keep.txt").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
    main(args)  # the lock is free again: the same command goes through
    assert (out / "data_card.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


@pytest.mark.e2e
@pytest.mark.tried("prepare", "two `lifecycle prepare` processes started at once into one output",
                   "one writes it, the other is refused with exit 9 (or runs after it); the output is one run's "
                   "complete result")
def test_concurrent_prepares_never_mix_results(tmp_path: Path) -> None:
    env = _env(tmp_path)
    out = tmp_path / "prepared"
    procs = [_prepare_proc(tmp_path, out, env, seed=s) for s in (1, 2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes in ([0, 0], [0, 9]), [r[2][-2000:] for r in results]
    digests = {json.loads(stdout.strip().splitlines()[-1])["digest"] for code, stdout, _ in results if code == 0}
    assert _complete(out) in digests
    for code, _, stderr in results:
        if code == 9:
            errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1 and "is being written by lifecycle prepare (pid " in errors[0], stderr
    assert not _temps(out) and not out.with_name(f".{out.name}.lock").exists()
