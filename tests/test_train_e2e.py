"""Training end to end with real processes: SIGTERM and SIGKILL then --resume, torchrun, `mlflow run`."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle.train.checkpoint import CheckpointManager
from lifecycle.train.config import TrainConfig
from lifecycle.train.run import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e

#: Shared by the uninterrupted and the interrupted runs: only --output differs.
SETTINGS = dict(max_steps=40, batch_size=4, eval_every=8, eval_batches=2, checkpoint_every=4, warmup_steps=4,
                progress=False, system_metrics=False, log_model=False)


def _cli_args(data: Path, output: Path, settings: dict, experiment: str) -> list[str]:
    args = [sys.executable, "-m", "lifecycle", "train", "--data", str(data), "--output", str(output)]
    for key, value in {**settings, "experiment": experiment}.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, (f"training exited ({proc.returncode}) before {path.name}: "
                                     f"{proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.02)


def _wait_port_free(port: int, timeout: float = 60) -> None:
    """The stopped server's workers may hold the port for a moment after the parent exits."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            # As the server binds: connections in TIME_WAIT (the server closed them) don't count,
            # only a process still listening does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                assert time.monotonic() < deadline, f"port {port} still busy after {timeout}s"
        time.sleep(0.2)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_sigterm_then_sigkill_at_a_random_step_resume_to_the_uninterrupted_result(prepared_tiny, tmp_path, unique_name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    straight = train(TrainConfig(**SETTINGS, output=str(tmp_path / "straight"), experiment=unique_name),
                     str(prepared_tiny))

    out = tmp_path / "interrupted"
    args = _cli_args(prepared_tiny, out, SETTINGS, unique_name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # 1. Preemption: SIGTERM writes a checkpoint at the step it lands on and exits with 143.
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "step-00000004", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped = CheckpointManager(out).latest()
    state = CheckpointManager.read_state(stopped)
    assert f"Stopped by SIGTERM after step {state['step']}" in err
    run_id = state["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, state["step"] + 1))

    # 2. A hard kill at a random step of the resumed run: no handler runs, the last checkpoint stays.
    rng = random.Random()
    # A tiny step takes milliseconds: leave at least 16 steps (four checkpoint writes) after the
    # target so that the kill always lands inside the run, wherever the SIGTERM above stopped it.
    target = rng.choice([s for s in (8, 12, 16, 20, 24) if s > state["step"]] or [24])
    proc = subprocess.Popen(args + ["--resume"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(out / f"step-{target:08d}", proc)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = CheckpointManager.read_state(CheckpointManager(out).latest())["step"]
    assert killed_at < SETTINGS["max_steps"], "the run finished before the kill; the test did not interrupt anything"

    # 3. Resume again (in process) to the end: same run, same numbers, every step exactly once.
    resumed = train(TrainConfig(**SETTINGS, output=str(out), experiment=unique_name), str(prepared_tiny), resume=True)
    assert resumed.run_id == run_id and resumed.resumed_from == killed_at
    assert client.get_run(run_id).info.status == "FINISHED"
    assert abs(resumed.best_val_loss - straight.best_val_loss) < 1e-4
    for key in ("train/loss", "train/lr", "val/loss"):
        got, want = _history(client, run_id, key), _history(client, straight.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in want], f"{key}: duplicated or missing steps"
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-4, key


def test_torchrun_two_cpu_processes_match_one_with_the_same_global_batch(prepared_tiny, tmp_path, unique_name):
    from mlflow.tracking import MlflowClient

    settings = {**SETTINGS, "max_steps": 4, "eval_every": 2, "checkpoint_every": 4}
    single = train(TrainConfig(**{**settings, "batch_size": 8}, output=str(tmp_path / "one"), experiment=unique_name),
                   str(prepared_tiny))
    args = _cli_args(prepared_tiny, tmp_path / "two", settings, unique_name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args[1:]]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_ids = re.findall(r"; run ([0-9a-f]{32})", done.stdout)
    assert len(run_ids) == 1, f"only rank 0 reports and logs: {done.stdout}"
    client = MlflowClient()
    run = client.get_run(run_ids[0])
    assert (run.data.params["world_size"], run.data.params["global_batch"]) == ("2", "8")
    assert len(client.search_runs([run.info.experiment_id])) == 2  # the single-process run and this one
    # Tolerance: the two layouts sum the same numbers in a different order (float32 rounding).
    for key in ("train/loss", "val/loss", "train/grad_norm"):
        got, want = _history(client, run.info.run_id, key), _history(client, single.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert max(abs(a - b) / max(1.0, abs(b)) for (_, a), (_, b) in zip(got, want)) < 1e-4, (key, got, want)


def test_mlflow_run_entry_point_trains_and_registers(prepared_tiny, tmp_path, unique_name):
    from mlflow.tracking import MlflowClient

    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
           "--experiment-name", unique_name,
           "-P", f"data={prepared_tiny}", "-P", "max_steps=4", "-P", "batch_size=4", "-P", f"output={tmp_path / 'ck'}",
           "-P", f"model_name={unique_name}", "-P", "set=eval_every=2;eval_batches=2;progress=false"]
    done = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"models:/{unique_name}/1" in done.stdout
    client = MlflowClient()
    version = client.get_model_version(unique_name, "1")
    run = client.get_run(version.run_id)
    # One run: the one `mlflow run` created, which the command joined.
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert run.info.status == "FINISHED" and run.data.tags["lifecycle.stage"] == "train"
    assert version.tags["train_run_id"] == run.info.run_id
    assert run.data.params["max_steps"] == "4"


def test_tracking_server_outage_mid_run_loses_no_metrics(prepared_tiny, tmp_path, unique_name):
    from mlflow.tracking import MlflowClient

    from tests import servers

    work = tmp_path / "server"
    backend = f"sqlite:///{work / 'backend.db'}"
    server = servers.start_mlflow_server(backend, work)
    port = int(server.url.rsplit(":", 1)[1])
    out = tmp_path / "ck"
    # log_model: the evaluations' checkpoint models go through the outage too.
    settings = {**SETTINGS, "max_steps": 60, "checkpoint_every": 5, "eval_every": 20, "log_model": True}
    # MLflow's own HTTP retries would block each log_batch for minutes; few and short ones hand
    # the outage to AsyncMetricLogger's retry loop, which is what is under test.
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONUNBUFFERED": "1",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    proc = subprocess.Popen(_cli_args(prepared_tiny, out, settings, unique_name), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "step-00000005", proc)
        server.stop()  # the tracking server goes away while the loop keeps training
        assert proc.poll() is None, "training finished before the outage began"
        _wait_port_free(port)
        # Same backend and port; a fresh folder for the new server's log and artifacts.
        server = servers.start_mlflow_server(backend, tmp_path / "server2", port=port)
        stdout, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, stderr[-3000:]
        assert "Connection refused" in stderr  # the outage was real and seen by the client
        run_id = re.findall(r"; run ([0-9a-f]{32})", stdout)[0]
        client = MlflowClient(server.url)
        for key, every in (("train/loss", 1), ("train/lr", 1), ("val/loss", 20)):
            assert [s for s, _ in _history(client, run_id, key)] == list(range(every, 61, every)), key
        assert client.get_run(run_id).info.status == "FINISHED"
        # Every evaluation's checkpoint model made it too, with its val/loss linked (retried through the outage).
        from lifecycle.train.logged_models import run_checkpoints

        models = run_checkpoints(client, run_id)
        assert sorted(models) == [20, 40, 60]
        assert all(any(m.key == "val/loss" for m in model.metrics) for model in models.values())
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
