"""A short but complete life of a tiny model, built once per session for the retrain and report tests.

v1 is trained on ``prepared_tiny``, evaluated, refused for production (no approval), approved and
promoted; it serves a few requests recorded with text. ``mlflow run . -e retrain`` then fine-tunes
it on new documents plus the served prompts (v2: staging yes, production waits for a person).
v2 is approved and promoted, production is rolled back to v1, and v1's window is monitored.
Every step is the real one (real training, evaluation, registry, serving engine, `mlflow run`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Fast evaluation settings (the gates only need loss and perplexity here).
EVAL_SETS = ["generation.num_prompts=2", "generation.max_new_tokens=4", "latency.enabled=false",
             "compare.bootstrap_samples=200", "loss.max_documents=20"]
RETRAIN_SETS = ["train.eval_every=5", "train.batch_size=8", "train.warmup_steps=2", "train.progress=false",
                "train.system_metrics=false", *[f"evaluate.{s}" for s in EVAL_SETS]]

POLICY = """\
description: test policy - staging on perplexity, production needs approval and no large regression
staging:
  thresholds:
    - {metric: eval/perplexity, op: "<=", value: 1000000, mode: enabled}
production:
  thresholds:
    - {metric: eval/perplexity, op: "<=", value: 1000000, mode: enabled}
  baseline: {metric: eval/loss, max_regression: 1.0, require_same_data: true, mode: enabled}
  required_tags: {tags: [approved_by], mode: enabled}
monitoring:
  monitor/input_drift_psi: {warn: 0.1, retrain: 0.25}
  monitor/error_rate: {warn: 0.05, retrain: 0.2}
  monitor/latency_p95_ms: {warn: 20000, retrain: 60000}
"""

_WORDS = ("river mountain forest cloud stone lantern harbor meadow signal thunder copper violet garden engine "
          "whisper orbit glacier compass falcon ember quartz willow tide beacon canyon").split()

#: What users asked the served model (one carries an e-mail address that must never be trained on).
PROMPTS = [
    "Tell me how the lantern by the harbor guides every boat home through the winter fog tonight",
    "Write a short story about a falcon that follows the river down from the glacier to the sea",
    "Please email the summary to jane.doe@example.com and describe the copper engine in some detail",
    "Explain why the quartz canyon glows at dusk when the tide turns and the beacon starts to blink",
    "Describe a walk through the willow meadow after the thunder storm has passed over the forest",
    "List the steps to repair an old compass found near the ember stones by the mountain trail",
]


def new_documents(n: int = 60, seed: int = 1) -> list[str]:
    """Documents on a topic the built-in corpus never mentions (a clear shift from it)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
                     for _ in range(rng.randint(3, 6))]
        docs.append(" ".join(sentences) + f" Entry {i}.")
    return docs


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """``{"text": ...}`` lines."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _serve(name: str, version: str, records: Path) -> None:
    from lifecycle.serving.engine import Engine
    from lifecycle.serving.records import InferenceRecorder
    from lifecycle.serving.settings import ServingConfig
    from lifecycle.tracking import resolve_model_dir

    rec = InferenceRecorder(records, model_name=name, model_version=version, include_text=True)
    cfg = ServingConfig(coalesce=False, cpu_threads=1, model_name=name, model_version=version)
    engine = Engine(resolve_model_dir(f"models:/{name}/{version}"), cfg, recorder=rec)
    try:
        for lo in range(0, len(PROMPTS), 2):
            engine.predict(PROMPTS[lo:lo + 2], {"max_new_tokens": 4})
    finally:
        engine.close()
        rec.close()


class Clock:
    """Prints how long each part of the history took (pytest shows it with -s or on failure)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def __call__(self, what: str) -> None:
        now = time.perf_counter()
        print(f"[history] {what}: {now - self.t:.1f}s")
        self.t = now


def build(prepared: Path, root: Path) -> dict[str, Any]:
    """Build the history under ``root``; return what the tests need to find it."""
    from mlflow.tracking import MlflowClient

    from lifecycle.config import load_config
    from lifecycle.errors import GateRejected
    from lifecycle.evaluate.config import EvalConfig
    from lifecycle.evaluate.run import evaluate_model
    from lifecycle.monitoring.config import MonitorConfig
    from lifecycle.monitoring.run import monitor
    from lifecycle.registry.promote import promote
    from lifecycle.registry.rollback import rollback
    from lifecycle.train.config import TrainConfig
    from lifecycle.train.run import train

    name = f"life-{uuid.uuid4().hex[:8]}"
    policy = root / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    client = MlflowClient()
    clock = Clock()

    cfg = TrainConfig(max_steps=10, batch_size=8, eval_every=5, warmup_steps=2, checkpoint_every=100,
                      model_name=name, output=str(root / "ckpt"), progress=False, system_metrics=False)
    v1 = train(cfg, str(prepared), overwrite=True)
    clock('train v1')
    evaluate_model(f"models:/{name}/{v1.version}", str(prepared), cfg=load_config(EvalConfig, None, EVAL_SETS),
                   progress=False)
    clock('evaluate v1')
    promote(name, v1.version, "staging", policy_path=str(policy))
    try:
        promote(name, v1.version, "production", policy_path=str(policy))
        raise AssertionError("production without approved_by must be refused")
    except GateRejected:
        pass
    client.set_model_version_tag(name, v1.version, "approved_by", "tester")
    promote(name, v1.version, "production", policy_path=str(policy))

    records = root / "records.jsonl"
    clock('promote v1')
    _serve(name, v1.version, records)
    clock('serve')

    # New data: unseen documents plus three documents production was trained on (deduplicated away).
    old = [json.loads(line)["text"] for line in (prepared / "raw" / "train.jsonl").read_text().splitlines()[:3]]
    new_data = write_jsonl(root / "new.jsonl", new_documents() + old)
    # The records are named explicitly: with LIFECYCLE_INFERENCE_LOG set, the evaluation's own
    # generations through the pyfunc model would be recorded into the same file.
    env = {k: v for k, v in os.environ.items() if k != "LIFECYCLE_INFERENCE_LOG"}
    env["OMP_NUM_THREADS"] = "1"  # torch's intra-op threads: one, as in the test process
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "retrain", "--env-manager", "local",
         "-P", f"name={name}", "-P", f"new_data={new_data}", "-P", "with_served_prompts=true",
         "-P", f"records={records}",
         "-P", f"policy={policy}", "-P", "max_steps=10", "-P", f"workdir={root / 'retrain'}",
         "-P", f"set={';'.join(RETRAIN_SETS)}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"mlflow run -e retrain failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")

    clock('mlflow run retrain')
    client.set_model_version_tag(name, "2", "approved_by", "tester")
    promote(name, "2", "production", policy_path=str(policy))
    rollback(name, reason="v2 answers worse on live traffic")
    mon = monitor(name, records=str(records), policy=str(policy), cfg=MonitorConfig(since="all", semantic=False))
    clock('promote, rollback, monitor')
    return {"name": name, "policy": policy, "records": records, "new_data": new_data, "root": root,
            "retrain_stdout": proc.stdout, "retrain_stderr": proc.stderr, "v1_train_run": v1.run_id,
            "monitor_run": mon.run_id, "old_docs": old}
