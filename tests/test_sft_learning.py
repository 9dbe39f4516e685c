"""A tiny model measurably learns an instruction task, end to end through the stages a user runs.

The task (generated here): chat records asking to reverse four letters, e.g. user "reverse k q z a"
-> assistant "a z q k". Held-out test prompts are letter sequences the model never saw, so exact
match measures the learned transformation, not memorised answers. `lifecycle prepare` detects the
chat records, renders them with the default template and writes it into the tokenizer folder;
`lifecycle train` trains the `tiny` preset on the responses only; `lifecycle.evaluate` scores the
trained version against the untrained model on the held-out prompts; the registered pyfunc model,
loaded with mlflow.pyfunc.load_model, renders `messages` with the same template and answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _task(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = [rng.choice(LETTERS) for _ in range(4)]
        rows.append({"messages": [{"role": "user", "content": "reverse " + " ".join(w)},
                                  {"role": "assistant", "content": " ".join(reversed(w))}]})
    return rows


def _cli(args: list[str]) -> None:
    from tests.cli import cli

    code = cli(*args)
    assert code == 0, f"lifecycle {args[0]} exited {code}"


def test_tiny_model_learns_the_task_and_serves_chat_with_the_same_template(tmp_path: Path, artifacts_in_tmp,
                                                                            unique_name, one_torch_thread):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.data.chat import DEFAULT_CHAT_TEMPLATE
    from lifecycle.evaluate.config import CompareConfig, EvalConfig, GenerationConfig, LatencyConfig
    from lifecycle.evaluate.run import evaluate_model
    from lifecycle.train.data import load_prepared
    from lifecycle.train.model import build_model, save_model_dir

    src = tmp_path / "reverse.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _task(1500)), encoding="utf-8")
    data = tmp_path / "prepared"
    _cli(["prepare", "--source", str(src), "--output", str(data), "--vocab-size", "300", "--block-size", "32"])
    card = json.loads((data / "data_card.json").read_text())
    assert card["format"] == "sft" and card["sft"]["chat_template"] == "default"
    assert card["splits"]["test"] >= 40

    # The untrained model: the same preset and tokenizer, fresh weights.
    prepared = load_prepared(data)
    untrained = save_model_dir(build_model("tiny", prepared.tokenizer, seed=42), prepared.tokenizer,
                               tmp_path / "untrained")

    _cli(["train", "--data", str(data), "--model-name", unique_name, "--max-steps", "200", "--batch-size", "32",
          "--learning-rate", "3e-3", "--output", str(tmp_path / "ckpt"), "--set", "eval_every=100",
          "--set", "warmup_steps=10", "--set", "system_metrics=false", "--set", "progress=false"])

    cfg = EvalConfig(latency=LatencyConfig(enabled=False),
                     generation=GenerationConfig(num_prompts=40, max_new_tokens=12),
                     compare=CompareConfig(bootstrap_samples=200, default_to_production=False))
    out = evaluate_model(f"models:/{unique_name}/1", str(data), cfg=cfg, baseline=str(untrained), progress=False)
    run = MlflowClient().get_run(out.run_id)
    trained_em, untrained_em = out.metrics["exact_match"], run.data.metrics["baseline/exact_match"]
    print(f"exact match on {int(out.metrics['num_prompts'])} held-out prompts: untrained {untrained_em:.3f}, "
          f"trained {trained_em:.3f}; "
          f"response loss {run.data.metrics['baseline/loss']:.3f} -> {out.metrics['loss']:.3f}")
    assert untrained_em <= 0.05
    assert trained_em >= 0.6 and trained_em - untrained_em >= 0.5
    assert out.metrics["loss"] < run.data.metrics["baseline/loss"] / 4
    assert run.data.tags["data_format"] == "sft"
    # The table people read in the UI: prompt, reference and answer per held-out example.
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=out.run_id, artifact_path="eval/examples.json",
                                                                dst_path=str(tmp_path / "dl"))).read_text())
    assert {"prompt", "reference", "answer", "exact_match", "baseline_answer"} <= set(table["columns"])
    assert len(table["data"]) == 40

    # Serving: the registered pyfunc model renders `messages` with the template it was trained with.
    model = mlflow.pyfunc.load_model(f"models:/{unique_name}/1")
    assert model.unwrap_python_model().engine.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    held_out = [json.loads(line) for line in (data / "raw" / "test.jsonl").read_text().splitlines()][:10]
    right = 0
    for example in held_out:
        answer = model.predict({"messages": example["messages"][:-1]}, params={"max_new_tokens": 12})["text"][0]
        right += answer.strip() == example["response"]
    print(f"served chat: {right}/10 held-out requests answered right")
    assert right >= 6, f"{right}/10 chat requests answered right"
