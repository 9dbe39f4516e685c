"""`lifecycle train --time-budget` under torchrun: every rank runs the same planned steps (issue #17).

Real `torchrun --nproc_per_node 2` runs of the `tiny` preset over gloo on the CPU. Only rank 0
talks to MLflow; each rank says what it did in its own log line (`-v`), so the test compares the
ranks' own accounts. As in tests/test_train_budget.py, the time itself gets only a loose bound
(1.5 x the budget): a shared machine's load decides the rest.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.train.checkpoint import CheckpointManager

pytestmark = pytest.mark.e2e

SETTINGS = dict(batch_size=4, eval_every=40, eval_batches=2, checkpoint_every=40, warmup_steps=5,
                progress="false", system_metrics="false", log_model="false")
#: Written by Trainer.fit on every rank of a torchrun run.
RANK_LINE = re.compile(r"rank (\d) of 2: (\d+) steps \(planned (\d+)\), last lr (\S+), evaluated at steps (\[.*\])")


def _torchrun(data: Path, out: Path, cwd: Path, *extra: str, monitor_s: float = 0.1) -> subprocess.CompletedProcess:
    """``monitor_s``: how often torchrun looks at its workers; once it sees one fail it SIGTERMs the rest."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", str(monitor_s),
           "-m", "lifecycle", "-v", "train", "--data", str(data), "--output", str(out), *extra]
    for key, value in SETTINGS.items():
        cmd += ["--set", f"{key}={value}"]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


def _ranks(stderr: str) -> dict[int, tuple[int, int, float, list[int]]]:
    """Each rank's (steps, planned steps, last LR, evaluated steps), from its log line."""
    found = {}
    for rank, steps, planned, lr, evals in RANK_LINE.findall(stderr):
        assert int(rank) not in found, f"rank {rank} reported twice"
        found[int(rank)] = (int(steps), int(planned), float(lr), ast.literal_eval(evals))
    assert sorted(found) == [0, 1], f"both ranks report: {stderr[-3000:]}"
    return found


def _metric(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_torchrun_budget_runs_the_same_planned_steps_on_every_rank(prepared_tiny, tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "ck"
    done = _torchrun(prepared_tiny, out, tmp_path, "--time-budget", "8s")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _ranks(done.stderr)
    assert ranks[0] == ranks[1], "the ranks ran, evaluated or ended differently"
    steps, planned, last_lr, evals = ranks[0]
    assert steps == planned >= 1
    assert evals[-1] == steps and all(s % SETTINGS["eval_every"] == 0 for s in evals[:-1])

    client = MlflowClient()
    run_id = re.findall(r"; run ([0-9a-f]{32})", done.stdout)[0]
    run = client.get_run(run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["world_size"] == "2" and params["time_budget"] == "8s"
    assert metrics["train/steps"] == metrics["train/planned_steps"] == steps
    # The plan is applied before each optimizer step on every rank, so the last step is at the floor
    # even when the planner shortened the run after the step before it.
    floor = float(params["learning_rate"]) * float(params["min_lr_ratio"])
    assert _metric(client, run_id, "train/lr")[-1] == (steps, pytest.approx(floor))
    assert last_lr == pytest.approx(floor)
    assert [s for s, _ in _metric(client, run_id, "val/loss")] == evals
    assert metrics["train/time_used_s"] <= 8.0 * 1.5, "loose bound: catches a loop that ignores its budget"
    assert CheckpointManager(out).latest().name.endswith(f"{steps:08d}")


def test_torchrun_resume_continues_the_remaining_budget(prepared_tiny, tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "ck"
    # Stopped by --max-steps well inside the budget, then resumed without it: the rest of the budget.
    first = _torchrun(prepared_tiny, out, tmp_path, "--time-budget", "8s", "--max-steps", "6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _ranks(first.stderr)[0][:2] == (6, 6)
    used_before = CheckpointManager.read_state(CheckpointManager(out).latest())["time_used_s"]
    assert 0 < used_before < 8.0

    again = _torchrun(prepared_tiny, out, tmp_path, "--time-budget", "8s", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(resumed from step 6)" in again.stdout
    ranks = _ranks(again.stderr)
    assert ranks[0] == ranks[1]
    steps, planned, _, _ = ranks[0]
    assert steps == planned > 6
    run_id = re.findall(r"; run ([0-9a-f]{32})", again.stdout)[0]
    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    # The resumed loop's clock starts from the time the first part used: one budget for the two.
    assert used_before < metrics["train/time_used_s"] <= 8.0 * 1.5
    assert metrics["train/steps"] == metrics["train/planned_steps"] == steps
    floor = metrics["train/lr"]  # the last logged LR is the last step's
    params = client.get_run(run_id).data.params
    assert floor == pytest.approx(float(params["learning_rate"]) * float(params["min_lr_ratio"]))


def test_torchrun_budget_too_small_is_refused_by_every_rank_before_any_run(prepared_tiny, tmp_path, tracking_uri):
    import mlflow

    # Looked at every 5 s, so that each rank's exit code is its own: torchrun SIGTERMs the ranks
    # still running when it sees one fail.
    done = _torchrun(prepared_tiny, tmp_path / "o", tmp_path, "--time-budget", "0.001", monitor_s=5)
    assert done.returncode != 0
    refusals = [x for x in done.stderr.splitlines() if x.startswith("Error: ")]
    assert len(refusals) == 1 and "too small" in refusals[0] and "give at least" in refusals[0], done.stderr[-3000:]
    # torchrun's summary names each failed rank with its exit code: both refused with the usage code.
    # Rank 1 prints nothing (only rank 0 reports errors): exit 2 is its own refusal. Each rank ends
    # about 0.3 s after refusing (train_cmd.exit_promptly skips the final GC walk, which took 2-3 s
    # per rank here and let torchrun, looking 5 s later on a loaded machine, kill rank 0 with -15).
    exits = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)", done.stderr))
    assert exits == {"0": "2", "1": "2"}, done.stderr[-3000:]
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert not (tmp_path / "o").exists()  # the lock's folder too: removed by the refusing rank 0
