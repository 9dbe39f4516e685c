"""Training outputs under faults, with real `lifecycle train` processes: SIGKILL in the middle of a
checkpoint write (several points of it), and two trainers on one checkpoint folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle.train.checkpoint import STATE_FILE, CheckpointManager

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e

#: A long run that is always killed before its end; every step writes a checkpoint in the
#: background, so a write is nearly always in flight. `small` makes each write ~50 MB (fsynced),
#: wide enough a window to land inside.
LONG = dict(preset="small", max_steps=5000, batch_size=4, eval_every=100000, eval_batches=1, checkpoint_every=1,
            keep_checkpoints=3, warmup_steps=2, progress=False, system_metrics=False, log_model=False)


def _args(data: Path, output: Path, experiment: str, **overrides) -> list[str]:
    args = [sys.executable, "-m", "lifecycle", "train", "--data", str(data), "--output", str(output)]
    for key, value in {**LONG, "experiment": experiment, **overrides}.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _complete(out: Path) -> list[int]:
    """Steps of the complete checkpoints, each checked to load whole and to say its own step."""
    steps = []
    for path in CheckpointManager(out).checkpoints():
        ck = CheckpointManager.load(path)
        assert ck["state"]["step"] == int(path.name.split("-")[1]), path
        steps.append(ck["state"]["step"])
    return steps


#: Points inside one write, as seen from outside: the temp folder exists; the weights are written
#: and the optimizer file is being written; every file is written and the rename is next.
POINTS = {
    "temp folder made": lambda files: True,
    "optimizer state being written": lambda files: "optim.pt" in files and STATE_FILE not in files,
    "before the rename": lambda files: STATE_FILE in files,
}


def _kill_at(proc: subprocess.Popen, out: Path, point: str, after_step: int, timeout: float = 240) -> bool:
    """SIGKILL ``proc`` the moment one of its writes of a step past ``after_step`` is at ``point``.

    Returns whether the kill left that write's temp folder behind (it landed inside the write).
    """
    wanted = POINTS[point]
    prefix, suffix = ".tmp-step-", f"-{proc.pid}"
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"training exited ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no write of {proc.pid} seen at '{point}' within {timeout}s"
        try:
            entries = list(os.scandir(out))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.name.startswith(prefix) and entry.name.endswith(suffix):
                step = int(entry.name[len(prefix):].split("-")[0])
                try:
                    files = set(os.listdir(entry.path))
                except FileNotFoundError:
                    continue  # renamed between the two calls
                if step > after_step and wanted(files):
                    proc.send_signal(signal.SIGKILL)
                    proc.communicate(timeout=60)
                    return Path(entry.path).is_dir()
        time.sleep(0.0005)


@pytest.mark.tried("train", "SIGKILL of `lifecycle train` inside a checkpoint write: temp folder just made, "
                   "optimizer file half-written, all files written but not yet renamed",
                   "--resume continues from the newest complete checkpoint; a partial one is never read")
def test_sigkill_inside_a_checkpoint_write_resumes_from_the_last_complete_one(prepared_tiny, tmp_path, unique_name):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "ck"
    run_id = None
    landed = []
    resumed_from = 0
    for i, point in enumerate(POINTS):
        proc = _start(_args(prepared_tiny, out, unique_name) + (["--resume"] if i else []), tmp_path)
        landed.append(_kill_at(proc, out, point, after_step=resumed_from + 1))
        steps = _complete(out)
        assert steps and max(steps) > resumed_from, f"{point}: no complete checkpoint past {resumed_from}"
        state = CheckpointManager.read_state(CheckpointManager(out).latest())
        if run_id is None:
            run_id = state["run_id"]
        assert state["run_id"] == run_id
        if i:  # the killed process had resumed from the newest complete checkpoint of the one before
            assert MlflowClient().get_run(run_id).data.tags["resumed_from_step"] == str(resumed_from)
        resumed_from = max(steps)
    assert any(landed), "no kill landed inside a write: the test interrupted nothing"
    # The last resume runs to the end (max_steps may change on resume).
    final = resumed_from + 2
    proc = _start(_args(prepared_tiny, out, unique_name, max_steps=final) + ["--resume"], tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"Trained {final} steps (resumed from step {resumed_from})" in stdout and f"run {run_id}" in stdout
    assert max(_complete(out)) == final
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    history = [m.step for m in MlflowClient().get_metric_history(run_id, "train/loss")]
    assert sorted(history) == list(range(1, final + 1)), "every step logged exactly once"


@pytest.mark.tried("train", "two `lifecycle train` processes on one --output (the second with --overwrite); "
                   "then the first is killed with SIGKILL",
                   "the second exits 9 with one line naming the first (pid, host, run, start) and touches nothing; "
                   "after the kill the lock is taken over with a warning and --resume continues")
def test_two_trainers_on_one_output_the_second_is_refused(prepared_tiny, tmp_path, unique_name):
    out = tmp_path / "ck"
    first = _start(_args(prepared_tiny, out, unique_name, checkpoint_every=10), tmp_path)
    deadline = time.monotonic() + 240
    while not CheckpointManager(out).checkpoints():
        assert first.poll() is None, first.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run_id = CheckpointManager.read_state(CheckpointManager(out).checkpoints()[0])["run_id"]
    second = subprocess.run(_args(prepared_tiny, out, unique_name) + ["--overwrite"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert second.returncode == 9, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    message = [line for line in lines if line.startswith("Error:")]
    assert len(message) == 1 and message == lines[-1:], second.stderr
    found = re.search(r"in use by another trainer \(pid (\d+) on (\S+), run (\w+), started (\S+)\)", message[0])
    assert found, message[0]
    assert (int(found[1]), found[3]) == (first.pid, run_id)
    assert first.poll() is None and CheckpointManager(out).checkpoints(), "the refused trainer changed nothing"

    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    killed_at = CheckpointManager.read_state(CheckpointManager(out).latest())["step"]
    third = subprocess.run(_args(prepared_tiny, out, unique_name, checkpoint_every=10,
                                 max_steps=killed_at + 2) + ["--resume"],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the lock" in third.stderr and f"pid {first.pid} " in third.stderr
    assert f"resumed from step {killed_at}" in third.stdout and f"run {run_id}" in third.stdout
