"""``lifecycle monitor`` end to end in-process: a registered tiny model with lineage to
``prepared_tiny``, inference records written by the real serving engine, verdicts and exit codes,
the logged MLflow run, and each bad input. The ``mlflow run -e monitor`` test is marked e2e."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lifecycle.monitoring.reference import load_reference
from tests.cli import cli

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """Monitoring thresholds for the tests (the default policy only thresholds PSI and latency)."""
    p = tmp_path_factory.mktemp("policy") / "monitor.yaml"
    p.write_text(
        "monitoring:\n"
        "  monitor/input_drift_psi: {warn: 0.1, retrain: 0.25}\n"
        "  monitor/input_drift_ks: {warn: 0.25, retrain: 0.5}\n"
        "  monitor/error_rate: {warn: 0.05, retrain: 0.2}\n"
        "  monitor/latency_p95_ms: {warn: 20000, retrain: 60000}\n"
        "  monitor/unknown_token_rate: {warn: 0.05, retrain: 0.2}\n"
        "  monitor/semantic_drift_bpb_delta: {warn: 1.0, retrain: 2.0}\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def registered(prepared_tiny: Path, tmp_path_factory) -> dict:
    """A tiny model on prepared_tiny's tokenizer, registered @production with data_run_id lineage."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoTokenizer

    from lifecycle.serving import log_model
    from lifecycle.train.model import build_model, save_model_dir

    tok = AutoTokenizer.from_pretrained(str(prepared_tiny / "tokenizer"))
    model_dir = save_model_dir(build_model("tiny", tok, seed=0), tok, tmp_path_factory.mktemp("mon") / "model")
    name = f"mon-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="data") as data_run:
        mlflow.log_artifacts(str(prepared_tiny), artifact_path="prepared")
    with mlflow.start_run(run_name="train"):
        info = log_model(model_dir, registered_model_name=name, tags={"data_run_id": data_run.info.run_id})
    client = MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, "production", version)
    # A second version with no lineage tag (for the missing-reference test).
    mv = client.get_model_version(name, version)
    v2 = client.create_model_version(name, mv.source, run_id=mv.run_id)
    return {"name": name, "version": version, "v2": str(v2.version), "model_dir": model_dir}


@pytest.fixture(scope="module")
def segments(prepared_tiny: Path) -> list[str]:
    return load_reference(prepared_tiny).segments


def _engine(reg: dict, path: Path, *, version: str | None = None, text: bool = True):
    from lifecycle.serving.engine import Engine
    from lifecycle.serving.records import InferenceRecorder
    from lifecycle.serving.settings import ServingConfig

    version = version or reg["version"]
    rec = InferenceRecorder(path, model_name=reg["name"], model_version=version, include_text=text)
    cfg = ServingConfig(coalesce=False, cpu_threads=1, model_name=reg["name"], model_version=version)
    return Engine(reg["model_dir"], cfg, recorder=rec)


def _serve(engine, prompts: list[str], per_request: int = 20, **params) -> None:
    for lo in range(0, len(prompts), per_request):
        engine.predict(prompts[lo:lo + per_request], {"max_new_tokens": 4, **params})


def _age(path: Path, first_n: int, hours: float) -> None:
    """Move the first ``first_n`` records ``hours`` into the past (an earlier window of the same log)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if i < first_n:
            ts = datetime.fromisoformat(rec["ts"]) - timedelta(hours=hours)
            rec["ts"] = ts.isoformat(timespec="milliseconds")
        out.append(json.dumps(rec))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def similar_log(registered, segments, tmp_path_factory) -> Path:
    """Prompts drawn from the reference population: 3 requests two days ago, 9 in the last day."""
    path = tmp_path_factory.mktemp("records") / "similar.jsonl"
    prompts = random.Random(7).choices(segments, k=240)
    eng = _engine(registered, path)
    try:
        _serve(eng, prompts, truncate=True)
    finally:
        eng.close()
    _age(path, 3, 48)
    return path



def test_similar_window_is_ok_and_logged(registered, similar_log, policy, capsys):
    from mlflow.tracking import MlflowClient

    code = cli(*["monitor", registered["name"], "--records", str(similar_log), "--policy", str(policy)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Verdict: ok (all thresholds respected)" in out
    run_id = out.strip().splitlines()[-1].split()[-1]
    run = MlflowClient().get_run(run_id)
    m = run.data.metrics
    assert m["monitor/request_count"] == 9 and m["monitor/baseline_request_count"] == 3
    assert m["monitor/error_rate"] == 0.0
    assert m["monitor/input_drift_psi"] < 0.1 and m["monitor/input_drift_ks"] < 0.25
    assert 0.0 <= m["monitor/token_js"] <= 1.0
    assert m["monitor/latency_p50_ms"] <= m["monitor/latency_p95_ms"] <= m["monitor/latency_p99_ms"]
    assert m["monitor/completion_tokens_total"] > 0 and m["monitor/prompt_tokens_total"] > 0
    assert abs(m["monitor/semantic_drift_bpb_delta"]) < 1.0
    for key in ("completion_length_psi", "finish_reason_shift", "unknown_token_rate"):
        assert f"monitor/{key}" in m
    assert run.data.tags["monitor.verdict"] == "ok"
    assert run.data.tags["lifecycle.stage"] == "monitor"
    assert run.data.params["resolved.reference"].startswith("runs:/")
    arts = {a.path for a in MlflowClient().list_artifacts(run_id)} | {
        a.path for a in MlflowClient().list_artifacts(run_id, "plots")}
    assert {"verdict.json", "plots/prompt_length_drift.png", "plots/latency_over_time.png",
            "plots/completion_length_drift.png"} <= arts


def test_long_prompts_and_errors_give_retrain(registered, segments, policy, tmp_path, capsys):
    from lifecycle.serving.requests import InvalidRequest

    path = tmp_path / "drifted.jsonl"
    rng = random.Random(3)
    longs = [" ".join(rng.sample(segments, 12)) for _ in range(40)]
    eng = _engine(registered, path)
    try:
        _serve(eng, longs, truncate=True)  # served, cut to the context: long prompts
        for text in longs[:6]:  # refused: the same prompts without truncation
            with pytest.raises(InvalidRequest):
                eng.predict([text], {"max_new_tokens": 4})
    finally:
        eng.close()
    code = cli(*["monitor", registered["name"], "--records", str(path), "--policy", str(policy)])
    out = capsys.readouterr().out
    assert code == 11, out
    verdict = next(line for line in out.splitlines() if line.startswith("Verdict:"))
    assert verdict.startswith("Verdict: retrain")
    assert "monitor/error_rate=0.75 >= retrain 0.2" in verdict
    assert "monitor/input_drift_psi=" in verdict and "monitor/input_drift_ks=" in verdict


def test_warn_exit_code_and_default_policy(registered, similar_log, tmp_path, capsys):
    p = tmp_path / "tight.yaml"
    p.write_text("monitoring:\n  monitor/latency_p50_ms: {warn: 0.001}\n  monitor/error_rate: {retrain: 0.5}\n",
                 encoding="utf-8")
    assert cli(*["monitor", registered["name"], "--records", str(similar_log), "--policy", str(p),
                 "--set", "semantic=false"]) == 10
    out = capsys.readouterr().out
    assert "Verdict: warn (monitor/latency_p50_ms=" in out
    # The project's default policy is read when --policy is not given.
    code = cli(*["monitor", registered["name"], "--records", str(similar_log), "--set", "semantic=false"])
    assert code in (0, 10, 11) and "Verdict:" in capsys.readouterr().out


def test_without_recorded_text_token_metrics_are_unavailable(registered, segments, policy, tmp_path, capsys):
    path = tmp_path / "notext.jsonl"
    eng = _engine(registered, path, text=False)
    try:
        _serve(eng, random.Random(1).sample(segments, 60), truncate=True)
    finally:
        eng.close()
    assert "prompts" not in json.loads(path.read_text().splitlines()[0])
    code = cli(*["monitor", registered["name"], "--records", str(path), "--policy", str(policy)])
    out = capsys.readouterr().out
    assert "Unavailable (thresholded but not measurable): monitor/semantic_drift_bpb_delta, " \
           "monitor/unknown_token_rate" in out
    assert "prompt text was not recorded" in out
    assert code in (0, 10), out  # 60 prompts: PSI may warn on sampling noise, never retrain


def test_other_versions_are_refused_or_separated(registered, similar_log, policy, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    lines = similar_log.read_text(encoding="utf-8").splitlines()
    other = json.loads(lines[-1])
    other["model_version"] = "99"
    mixed.write_text("\n".join(lines + [json.dumps(other)]) + "\n", encoding="utf-8")
    code = cli(*["monitor", registered["name"], "--records", str(mixed), "--policy", str(policy),
                 "--set", "semantic=false"])
    err = capsys.readouterr().err
    assert code == 4
    assert f"{registered['name']} v99 (1)" in err and "--version-mismatch separate" in err
    code = cli(*["monitor", registered["name"], "--records", str(mixed), "--policy", str(policy),
                 "--version-mismatch", "separate", "--set", "semantic=false"])
    assert code == 0, capsys.readouterr()


def test_empty_window_missing_reference_and_unknown_version(registered, similar_log, policy, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    name = registered["name"]
    runs_before = len(MlflowClient().search_runs([MlflowClient().get_experiment_by_name("Default").experiment_id]))
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    assert cli(*["monitor", name, "--records", str(similar_log), "--since", future, "--policy", str(policy)]) == 4
    assert "no inference records" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert cli(*["monitor", name, "--records", str(empty), "--policy", str(policy)]) == 4
    assert "the records file holds none" in capsys.readouterr().err

    v2_log = tmp_path / "v2.jsonl"
    rec = json.loads(similar_log.read_text().splitlines()[-1])
    rec["model_version"] = registered["v2"]
    v2_log.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    assert cli(*["monitor", name, "--version", registered["v2"], "--records", str(v2_log),
                 "--policy", str(policy)]) == 5
    assert "has no data_run_id tag" in (err := capsys.readouterr().err) and "--reference DATA" in err
    assert cli(*["monitor", name, "--version", registered["v2"], "--records", str(v2_log), "--policy",
                 str(policy), "--reference", str(tmp_path / "nowhere")]) == 5
    assert "--reference DATA" in capsys.readouterr().err

    assert cli(*["monitor", name, "--alias", "champion", "--records", str(similar_log)]) == 5
    assert f"no such alias @champion (versions of {name}" in capsys.readouterr().err
    assert cli(*["monitor", name, "--records", str(similar_log), "--since", "soon"]) == 2
    # Bad input leaves no half-written run behind.
    runs_after = len(MlflowClient().search_runs([MlflowClient().get_experiment_by_name("Default").experiment_id]))
    assert runs_after == runs_before


@pytest.mark.e2e
def test_mlflow_run_entry_point_monitor(registered, similar_log, policy):
    env = {**os.environ, "LIFECYCLE_INFERENCE_LOG": str(similar_log)}
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "monitor", "--env-manager", "local",
         "-P", f"name={registered['name']}", "-P", f"policy={policy}", "-P", "set=semantic=false"],
        capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Verdict: ok" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_entry_point_script_exits_with_the_verdict_code(registered, similar_log, tmp_path):
    tight = tmp_path / "tight.yaml"
    tight.write_text("monitoring:\n  monitor/latency_p50_ms: {warn: 0.001}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "entrypoints/monitor.py", f"name={registered['name']}", f"records={similar_log}",
         f"policy={tight}", "since=", "set=semantic=false"],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 10, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Verdict: warn (monitor/latency_p50_ms=" in proc.stdout


#: One server worker appending inference records: ``n`` records (forever when negative), each
#: with a completion of ``big`` characters (large lines span many pages: a kill can tear them).
_WRITER = r"""
import sys
from lifecycle.serving.records import InferenceRecorder
path, name, version, tag, n, big = sys.argv[1:7]
rec = InferenceRecorder(path, model_name=name, model_version=version, include_text=True,
                        scrubber=lambda text: (text, {}))
i = 0
print("ready", flush=True)
while int(n) < 0 or i < int(n):
    rec.record(latency_ms=1.0 + i % 7, batch_size=1, params={"writer": tag, "i": i},
               rows=[{"prompt_tokens": 5 + i % 11, "completion_tokens": 3, "finish_reason": "stop",
                      "truncated": False}],
               prompts=["the quick brown fox jumps over the lazy dog"], completions=["y" * int(big)])
    i += 1
"""


@pytest.mark.tried("monitoring", "inference records appended by several worker processes at once, one of them "
                   "SIGKILLed mid-run while writing 256 KiB records, then a torn line and a restarted writer",
                   "no record of a live writer is lost or interleaved; damaged lines are skipped and counted "
                   "(monitor/records_skipped) and monitor still gives its verdict")
def test_concurrent_writers_and_a_kill_then_monitor_still_decides(registered, policy, tmp_path, capsys):
    import signal
    import time

    from mlflow.tracking import MlflowClient

    from lifecycle.monitoring.records import load_records

    path = tmp_path / "crash.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def writer(tag: str, n: int, big: int) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), registered["name"], registered["version"],
                                 tag, str(n), str(big)], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    killed = writer("K", -1, 256 * 1024)
    live = [writer(tag, 300, 64) for tag in ("A", "B")]
    time.sleep(0.3)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    for proc in live:
        assert proc.wait(timeout=120) == 0
    # A server killed mid-line by the old buffered writer, then restarted: it appends again.
    whole = json.dumps({"ts": datetime.now(timezone.utc).isoformat(), "model_name": registered["name"],
                        "model_version": registered["version"], "latency_ms": 2.0, "rows": []})
    with open(path, "ab") as fh:
        fh.write(whole[: len(whole) // 2].encode() + b"\xe2\x82")  # torn inside a UTF-8 character too
    assert writer("C", 20, 64).wait(timeout=120) == 0

    read = load_records(path)
    by_writer: dict[str, list[int]] = {}
    for rec in read.records:
        by_writer.setdefault(rec["params"]["writer"], []).append(rec["params"]["i"])
    # Every record of the writers that lived is there, once, whole and in each writer's order.
    for tag, n in (("A", 300), ("B", 300), ("C", 20)):
        assert by_writer[tag] == list(range(n)), tag
    # The killed writer's records are whole up to where it died (at most its last one torn).
    assert by_writer["K"] == list(range(len(by_writer["K"])))
    assert all(len(r["completions"][0]) == 256 * 1024 for r in read.records if r["params"]["writer"] == "K")
    assert 1 <= len(read.skipped) <= 2, read.skipped

    code = cli("monitor", registered["name"], "--records", str(path), "--policy", str(policy),
               "--set", "semantic=false")
    out = capsys.readouterr().out
    assert code in (0, 10, 11), out
    assert "Verdict:" in out
    run_id = out.strip().splitlines()[-1].split()[-1]
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert metrics["monitor/records_skipped"] == len(read.skipped)
    assert metrics["monitor/request_count"] == len(read.records)
