"""Helpers for the registry tests: real registered model versions with evaluation tags."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

MLMODEL = """artifact_path: model
flavors:
  python_function:
    loader_module: mlflow.pyfunc.model
    python_version: 3.11.7
{signature}"""
SIGNATURE = """signature:
  inputs: '[{"type": "string", "name": "prompt", "required": true}]'
  outputs: '[{"type": "string", "name": "text", "required": true}]'
"""

GOOD_TAGS = {"eval/perplexity": "40.0", "eval/loss": "3.0", "eval/bits_per_byte": "1.5", "eval/check_nonempty": "1",
             "eval/check_stops": "1", "eval/latency_p95_ms": "120", "eval_data_digest": "d" * 64,
             "approved_by": "alice", "eval_run_id": "r0", "data_digest": "a" * 64}


def make_source(client: Any, experiment: str, *, signature: bool = True, size: int = 2048) -> tuple[str, str]:
    """Log a small model folder (MLmodel + weights) in a run; return (source URI, run id)."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    folder = Path(tempfile.mkdtemp()) / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text(MLMODEL.format(signature=SIGNATURE if signature else ""))
    (folder / "weights.bin").write_bytes(b"\0" * size)
    run = client.create_run(exp_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    return f"{run.info.artifact_uri}/model", run.info.run_id


def make_version(client: Any, name: str, tags: dict[str, str] | None = None, *, signature: bool = True,
                 source: tuple[str, str] | None = None) -> str:
    """Register a new version of ``name`` (created if needed) tagged as the evaluation stage would."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    src, run_id = source or make_source(client, f"{name}-runs", signature=signature)
    mv = client.create_model_version(name, src, run_id, tags={**GOOD_TAGS, **(tags or {})})
    return str(mv.version)


def _child(argv: list[str], barrier: Any, log_path: str, queue: Any) -> None:
    import os
    import sys

    from mlflow.utils import request_utils

    # The parent's pooled HTTP connections must not be shared across processes.
    request_utils._cached_get_request_session.cache_clear()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    barrier.wait(timeout=60)
    from tests.cli import cli

    try:
        code = cli(*argv)
    except BaseException:  # noqa: BLE001 - report a crash as exit 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    queue.put((argv, code, Path(log_path).read_text(errors="replace")))


def run_at_once(commands: list[list[str]], workdir: Path) -> list[tuple[list[str], int, str]]:
    """Run each CLI command in its own (forked) process, released together by a barrier.

    Forking after ``import mlflow`` keeps 20 processes affordable on a 2-core machine; each child
    opens its own HTTP connections. Returns (argv, exit code, output) per command.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(commands))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(argv, barrier, str(workdir / f"proc{i}.log"), queue))
             for i, argv in enumerate(commands)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return results
