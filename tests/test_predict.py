"""`lifecycle predict`: batched output equals one-at-a-time pyfunc output, kill -9 and resume, the
one-line errors, JSONL and Parquet outputs, and the MLproject entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.cli import cli, cli_output
from tests.test_serving import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
N_ROWS = 200
WORDS = ["the", "class", "def", "module", "return", "import", "value", "list", "string", "object"]


@pytest.fixture(scope="module")
def logged_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The project's pyfunc model of a tiny GPT-2, logged once: its ``models:/m-...`` URI."""
    import mlflow

    from lifecycle.serving import log_model

    tmp = tmp_path_factory.mktemp("predict-model")
    exp = mlflow.create_experiment(f"predict-{time.time_ns()}", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = log_model(make_tiny_model(tmp / "tiny"), model_config={"cpu_threads": 1})
    return info.model_uri


@pytest.fixture(scope="module")
def pyfunc_dir(logged_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model downloaded to a local pyfunc folder."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(logged_uri, dst_path=str(tmp_path_factory.mktemp("pyfunc"))))


def prompts(n: int = N_ROWS) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 6)) for i in range(n)]


def write_input(path: Path, n: int = N_ROWS, ids: list | None = None) -> Path:
    df = pd.DataFrame({"id": ids if ids is not None else [f"r{i}" for i in range(n)], "prompt": prompts(n)})
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict(orient="records")))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batched_equals_one_at_a_time_in_process(pyfunc_dir: Path, tmp_path: Path):
    import mlflow.pyfunc

    from lifecycle.predict import predict_file

    src = write_input(tmp_path / "in.jsonl")
    out = predict_file(str(pyfunc_dir), src, tmp_path / "out.jsonl", batch_size=16,
                       params={"max_new_tokens": 6}, progress=False)
    assert (out.written, out.skipped, out.total) == (N_ROWS, 0, N_ROWS)
    rows = read_jsonl(tmp_path / "out.jsonl")
    model = mlflow.pyfunc.load_model(str(pyfunc_dir), model_config={"coalesce": False})
    single = [model.predict([p], params={"max_new_tokens": 6}).iloc[0].to_dict() for p in prompts()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(N_ROWS)]
    assert [r["prompt"] for r in rows] == prompts()
    assert [r["text"] for r in rows] == [s["text"] for s in single]
    assert [r["completion_tokens"] for r in rows] == [int(s["completion_tokens"]) for s in single]
    assert {"finish_reason", "prompt_tokens", "truncated"} <= set(rows[0])
    # The same job again: nothing to do, nothing written twice.
    again = predict_file(str(pyfunc_dir), src, tmp_path / "out.jsonl", params={"max_new_tokens": 6}, progress=False)
    assert (again.written, again.skipped) == (0, N_ROWS)
    assert len(read_jsonl(tmp_path / "out.jsonl")) == N_ROWS


def test_parquet_in_and_out_csv_in_row_numbers_and_torn_line(logged_uri: str, pyfunc_dir: Path, tmp_path: Path):
    src = write_input(tmp_path / "in.parquet", n=20, ids=list(range(100, 120)))
    out = tmp_path / "out.parquet"
    assert cli("predict", logged_uri, "--input", str(src), "--output", str(out), "--batch-size", "8",
               "--max-new-tokens", "4") == 0
    assert len(list(out.glob("part-*.parquet"))) == 3
    df = pd.read_parquet(out)
    assert sorted(df["id"]) == list(range(100, 120)) and {"prompt", "text"} <= set(df.columns)

    csv_src = tmp_path / "in.csv"
    pd.DataFrame({"question": prompts(10)}).to_csv(csv_src, index=False)
    jsonl = tmp_path / "rows.jsonl"
    assert cli("predict", str(pyfunc_dir), "--input", str(csv_src), "--output", str(jsonl),
               "--prompt-column", "question", "--max-new-tokens", "3") == 0
    rows = read_jsonl(jsonl)
    assert [r["row"] for r in rows] == list(range(10))
    # A torn last line (a kill mid-write) is dropped with a warning and that row written again.
    keep = jsonl.read_bytes().splitlines(keepends=True)
    jsonl.write_bytes(b"".join(keep[:7]) + keep[7][:9])
    code, text = cli_output("predict", str(pyfunc_dir), "--input", str(csv_src), "--output", str(jsonl),
                            "--prompt-column", "question", "--max-new-tokens", "3")
    assert code == 0 and "Wrote 3 row(s)" in text, text
    assert [r["row"] for r in read_jsonl(jsonl)] == list(range(10))


def _rows_written(out: Path) -> int:
    if out.suffix == ".parquet":
        return 2 * len(list(out.glob("part-*.parquet"))) if out.is_dir() else 0
    return out.read_bytes().count(b"\n") if out.exists() else 0


@pytest.mark.e2e
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_killed_run_resumes_with_every_id_once(pyfunc_dir: Path, tmp_path: Path, suffix: str):
    src = write_input(tmp_path / "in.jsonl")
    out = tmp_path / f"out{suffix}"
    cmd = [sys.executable, "-m", "lifecycle", "predict", str(pyfunc_dir), "--input", str(src), "--output", str(out),
           "--batch-size", "2", "--max-new-tokens", "16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if _rows_written(out) >= N_ROWS // 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 0 < _rows_written(out) < N_ROWS
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = list(pd.read_parquet(out)["id"]) if suffix == ".parquet" else [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(N_ROWS)) and len(ids) == len(set(ids))


def test_errors_are_one_line_and_write_nothing(pyfunc_dir: Path, tmp_path: Path):
    model = str(pyfunc_dir)
    out = tmp_path / "out.jsonl"

    def run(*args: str) -> tuple[int, str]:
        code, text = cli_output("predict", model, "--output", str(out), *args)
        return code, text.strip()

    code, text = run("--input", str(tmp_path / "missing.jsonl"))
    assert code == 4 and "input not found" in text and len(text.splitlines()) == 1
    (tmp_path / "empty.jsonl").write_text("")
    code, text = run("--input", str(tmp_path / "empty.jsonl"))
    assert code == 4 and "empty" in text
    src = write_input(tmp_path / "in.jsonl", n=5)
    code, text = run("--input", str(src), "--prompt-column", "question")
    assert code == 4 and "'question'" in text and "columns present: id, prompt" in text
    code, text = run("--input", str(src), "--id-column", "key")
    assert code == 4 and "'key'" in text and "columns present: id, prompt" in text
    dup = write_input(tmp_path / "dup.jsonl", n=3, ids=["a", "b", "a"])
    code, text = run("--input", str(dup))
    assert code == 4 and "duplicate id 'a'" in text
    code, text = cli_output("predict", model, "--input", str(src), "--output", str(tmp_path / "out.csv"))
    assert code == 2 and "unknown extension .csv" in text
    assert not out.exists() and not (tmp_path / "out.jsonl.job.json").exists()
    # An output of another job (other params) is refused, then replaced with --overwrite.
    assert cli("predict", model, "--input", str(src), "--output", str(out), "--max-new-tokens", "2") == 0
    code, text = run("--input", str(src), "--max-new-tokens", "3")
    assert code == 6 and "another job" in text and "--overwrite" in text
    assert cli("predict", model, "--input", str(src), "--output", str(out), "--max-new-tokens", "3",
               "--overwrite") == 0
    assert len(read_jsonl(out)) == 5


@pytest.mark.e2e
def test_mlflow_run_entry_point(pyfunc_dir: Path, tmp_path: Path):
    src = write_input(tmp_path / "in.jsonl", n=6)
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "predict", "--env-manager", "local",
         "-P", f"model_uri={pyfunc_dir}", "-P", f"input={src}", "-P", f"output={out}", "-P", "max_new_tokens=3",
         "-P", "batch_size=4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["id"] for r in read_jsonl(out)] == [f"r{i}" for i in range(6)]
