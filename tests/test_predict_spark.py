"""`lifecycle predict --engine spark`: mlflow.pyfunc.spark_udf on local Spark gives the in-process engine's
greedy outputs row for row; resume after a kill -9 or lost parts never duplicates a row; bad input is one
line with nothing written. Required in CI (LIFECYCLE_REQUIRE_SPARK=1); skips with the reason elsewhere."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests import servers
from tests.cli import cli, cli_output
from tests.test_predict import N_ROWS, logged_uri, prompts, pyfunc_dir, read_jsonl, write_input  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
# Two local cores: the suite shares the machine; the session itself is kept small by the product.
MASTER = "local[2]"


def _spark_missing() -> str | None:
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed (pip install -e '.[test,spark]')"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "no Java runtime (java on PATH or JAVA_HOME) for Spark"
    return None


@pytest.fixture(autouse=True)
def _needs_spark() -> None:
    servers.require("LIFECYCLE_REQUIRE_SPARK", _spark_missing())


def spark_cli(*args: str) -> tuple[int, str]:
    return cli_output("predict", *args, "--engine", "spark", "--master", MASTER)


def test_spark_equals_in_process_row_for_row(pyfunc_dir: Path, tmp_path: Path):  # noqa: F811
    from lifecycle.predict import predict_file

    src = write_input(tmp_path / "in.jsonl")
    predict_file(str(pyfunc_dir), src, tmp_path / "local.jsonl", batch_size=16, params={"max_new_tokens": 6},
                 progress=False)
    local = {r["id"]: r for r in read_jsonl(tmp_path / "local.jsonl")}
    out = tmp_path / "spark.parquet"
    code, text = spark_cli(str(pyfunc_dir), "--input", str(src), "--output", str(out), "--max-new-tokens", "6")
    assert code == 0, text
    assert f"Wrote {N_ROWS} row(s)" in text
    df = pd.read_parquet(out)
    assert list(df.columns) == ["id", "prompt", "text", "prompt_tokens", "completion_tokens", "finish_reason",
                                "truncated"]
    assert sorted(df["id"]) == sorted(local) and len(df) == N_ROWS
    for row in df.to_dict(orient="records"):
        mine = local[row["id"]]
        assert (row["prompt"], row["text"], int(row["completion_tokens"]), int(row["prompt_tokens"]),
                row["finish_reason"]) == (mine["prompt"], mine["text"], mine["completion_tokens"],
                                          mine["prompt_tokens"], mine["finish_reason"]), row["id"]
    # Same job again: nothing to do. Both engines share one job file, so the in-process engine agrees.
    code, text = spark_cli(str(pyfunc_dir), "--input", str(src), "--output", str(out), "--max-new-tokens", "6")
    assert code == 0 and f"Wrote 0 row(s) to {out} ({N_ROWS} already there)" in text, text
    code, text = cli_output("predict", str(pyfunc_dir), "--input", str(src), "--output", str(out),
                            "--max-new-tokens", "6")
    assert code == 0 and "Wrote 0 row(s)" in text, text
    # Parts lost (as a kill while they were being moved in leaves it): only the missing rows are redone.
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 2
    lost = len(pd.read_parquet(parts[0]))
    parts[0].unlink()
    code, text = spark_cli(str(pyfunc_dir), "--input", str(src), "--output", str(out), "--max-new-tokens", "6")
    assert code == 0 and f"Wrote {lost} row(s)" in text and f"({N_ROWS - lost} already there)" in text, text
    again = pd.read_parquet(out)
    assert sorted(again["id"]) == sorted(local) and again["id"].is_unique


def test_csv_without_ids_numbers_rows_like_in_process(logged_uri: str, tmp_path: Path):  # noqa: F811
    src = tmp_path / "in.csv"
    pd.DataFrame({"question": prompts(12), "note": ["a,b", 'say "hi"', "x\ny"] * 4}).to_csv(src, index=False)
    local, spark = tmp_path / "local.jsonl", tmp_path / "spark.parquet"
    assert cli("predict", logged_uri, "--input", str(src), "--output", str(local), "--prompt-column", "question",
               "--max-new-tokens", "3") == 0
    code, text = spark_cli(logged_uri, "--input", str(src), "--output", str(spark), "--prompt-column", "question",
                           "--max-new-tokens", "3", "--batch-size", "5",
                           "--spark-conf", "spark.sql.shuffle.partitions=2")
    assert code == 0, text
    got = pd.read_parquet(spark).sort_values("row")
    assert list(got["row"]) == list(range(12))
    assert list(got["text"]) == [r["text"] for r in read_jsonl(local)]


@pytest.mark.tried("predict", "--engine spark with a missing prompt or id column, an empty file, a non-string "
                   "prompt column, duplicate ids, a .jsonl output, a malformed --spark-conf, --master without spark, "
                   "a prompt the model refuses", "one-line error, exit 1, 2 or 4, no output, no job file, no lock "
                   "file or temporary folder left")
def test_spark_errors_are_one_line_and_write_nothing(pyfunc_dir: Path, tmp_path: Path):  # noqa: F811
    model = str(pyfunc_dir)
    out = tmp_path / "out.parquet"

    def run(*args: str) -> tuple[int, str]:
        code, text = spark_cli(model, "--output", str(out), *args)
        lines = [ln for ln in text.strip().splitlines() if ln.startswith("Error: ")]
        assert len(lines) == 1, text
        return code, lines[0]

    src = write_input(tmp_path / "in.jsonl", n=5)
    code, text = run("--input", str(src), "--prompt-column", "question")
    assert code == 4 and "no prompt column 'question'; columns present: id, prompt" in text, text
    code, text = run("--input", str(src), "--id-column", "key")
    assert code == 4 and "no id column 'key'" in text, text
    (tmp_path / "empty.jsonl").write_text("")
    code, text = run("--input", str(tmp_path / "empty.jsonl"))
    assert code == 4 and "empty input" in text, text
    (tmp_path / "blank.csv").write_text("prompt,id\n")
    code, text = run("--input", str(tmp_path / "blank.csv"))
    assert code == 4 and "empty input" in text, text
    pd.DataFrame({"prompt": [1, 2], "id": ["a", "b"]}).to_parquet(tmp_path / "ints.parquet")
    code, text = run("--input", str(tmp_path / "ints.parquet"))
    assert code == 4 and "not a non-empty string" in text, text
    dup = write_input(tmp_path / "dup.jsonl", n=3, ids=["a", "b", "a"])
    code, text = run("--input", str(dup))
    assert code == 4 and "duplicate id 'a'" in text, text
    code, text = spark_cli(model, "--input", str(src), "--output", str(tmp_path / "out.jsonl"))
    assert code == 2 and "--engine spark writes Parquet" in text, text
    code, text = run("--input", str(src), "--spark-conf", "no-equals-sign")
    assert code == 2 and "expected KEY=VALUE" in text, text
    code, text = cli_output("predict", model, "--input", str(src), "--output", str(out), "--master", "local[1]")
    assert code == 2 and "go with --engine spark" in text, text
    # A row the model refuses fails the Spark job: the model's own one-line message, nothing kept.
    long = write_input(tmp_path / "long.jsonl", n=2)
    long.write_text(long.read_text().replace('"prompt": "the"', '"prompt": "' + "the " * 3000 + '"'))
    code, text = run("--input", str(long), "--max-new-tokens", "2")
    assert code == 1 and text.startswith("Error: predict: prompt has 30") and "--truncate" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.jsonl", "empty.jsonl", "blank.csv", "ints.parquet", "dup.jsonl", "long.jsonl"])


@pytest.mark.e2e
@pytest.mark.tried("predict", "kill -9 of `lifecycle predict --engine spark` while Spark is scoring, then the same "
                   "command again", "the rerun removes the half-written temporary folder and completes; every id once")
def test_spark_run_killed_mid_job_resumes_without_duplicates(pyfunc_dir: Path, tmp_path: Path):  # noqa: F811
    src = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "lifecycle", "predict", str(pyfunc_dir), "--input", str(src), "--output", str(out),
           "--batch-size", "4", "--max-new-tokens", "16", "--engine", "spark", "--master", MASTER]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    # Spark's temporary output appears once the scoring tasks run; kill the driver then.
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.is_dir() and any(p.rglob("*")) for p in tmp_path.glob(f".{out.name}.tmp-*")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the JVM and Python workers it started
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not list(out.glob("part-*.parquet")), "a killed Spark job must leave no rows in the output"
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = list(pd.read_parquet(out)["id"])
    assert sorted(ids) == sorted(f"r{i}" for i in range(N_ROWS)) and len(ids) == len(set(ids))
    assert not list(tmp_path.glob(f".{out.name}.*")), "temporary folder or lock left behind"
