"""What the `lifecycle compress` tests share (tests/test_compress.py, tests/test_compress_distill.py):
the tiny parent they compress (built by conftest's module-scoped `compress_parent` fixture) and the
settings that keep each compress run short."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

#: A lean evaluation: the trade-off still measures loss, bits-per-byte and generation speed.
LEAN_EVAL = ["--set", "generation.num_prompts=4", "--set", "generation.max_new_tokens=8",
             "--set", "latency.batch_sizes=[1]", "--set", "latency.requests=3", "--set", "latency.max_new_tokens=16",
             "--set", "compare.bootstrap_samples=200"]


#: A short recovery: the point here is the plumbing, the benchmark measures the quality.
SHORT_DISTILL = ["--set", "distill.steps=6", "--set", "distill.eval_every=3", "--set", "distill.eval_batches=1"]
#: A short importance measurement, for what prunes (--method prune, distill --amount).
SHORT_PRUNE = ["--set", "prune.calibration_batches=2"]


def short_for(args: list[str]) -> list[str]:
    """The short settings that ``compress`` with ``args`` reads (it refuses a --set key it would ignore)."""
    method = args[args.index("--method") + 1]
    if method not in ("prune", "distill"):
        return []
    return SHORT_DISTILL + (SHORT_PRUNE if method == "prune" or "--amount" in args else [])



def train_parent(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model (3 layers) trained for a few steps on ``prepared`` and registered as version 1 of a fresh name.

    Returns its name, version, experiment id and a work folder. Each test module gets its own (the
    tests count a name's versions and runs), so conftest builds it once per module, not per session.
    """
    from mlflow.tracking import MlflowClient

    from lifecycle.train.config import ModelShape, TrainConfig
    from lifecycle.train.run import train

    name = f"lm-compress-{uuid.uuid4().hex[:8]}"
    work = tmp_path_factory.mktemp("compress")
    exp = MlflowClient().create_experiment(name, artifact_location=(work / "artifacts").as_uri())
    # Three layers, one more than the `tiny` preset: a fresh `--preset tiny` student is then smaller
    # than its teacher (compress refuses one that is not).
    cfg = TrainConfig(model=ModelShape(n_layer=3), max_steps=30, batch_size=8,
                      eval_every=10, eval_batches=2, warmup_steps=3, learning_rate=3e-3,
                      progress=False, system_metrics=False, output=str(work / "ckpt"), model_name=name, experiment=name)
    out = train(cfg, str(prepared))
    return {"name": name, "version": out.version, "experiment": exp, "work": work}
