"""Evaluation stage end to end: registered tiny models, version tags, champion vs challenger,
bad input through the CLI, and the MLproject entry point.

Models are built from config here and trained for a few optimizer steps on the prepared train
split; they are logged with the real pyfunc model (lifecycle.serving.log_model) and registered.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.cli import cli

ROOT = Path(__file__).resolve().parents[1]

#: Small but complete: every metric is computed, just on fewer prompts and requests.
FAST = ["generation.num_prompts=4", "generation.max_new_tokens=8", "latency.requests=2", "latency.warmup=0",
        "latency.max_new_tokens=8", "compare.bootstrap_samples=500"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fast_flags() -> list[str]:
    return [arg for item in FAST for arg in ("--set", item)]



def _train(model, prepared: Path, steps: int = 40, seed: int = 0):
    """A few AdamW steps on the prepared train split: better than random, in seconds."""
    import numpy as np
    import torch
    from datasets import load_from_disk

    blocks = np.asarray(load_from_disk(str(prepared / "train")).with_format("numpy")["input_ids"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.from_numpy(blocks[rng.integers(0, len(blocks), size=16)])
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def _foreign_tokenizer():
    from lifecycle.data.sources import pydoc_documents
    from lifecycle.data.tokenizer import train_tokenizer

    return train_tokenizer([[d for _, d in zip(range(60), pydoc_documents())]], vocab_size=300)


@pytest.fixture(scope="module")
def model_dirs(prepared_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """untrained / trained (same tokenizer as the data) / foreign (another tokenizer) folders."""
    from transformers import AutoTokenizer

    from lifecycle.train.model import build_model, save_model_dir

    root = tmp_path_factory.mktemp("eval-models")
    tok = AutoTokenizer.from_pretrained(str(prepared_tiny / "tokenizer"))
    dirs = {
        "untrained": save_model_dir(build_model("tiny", tok, seed=0), tok, root / "untrained"),
        "trained": save_model_dir(_train(build_model("tiny", tok, seed=0), prepared_tiny), tok, root / "trained"),
    }
    dirs["short"] = save_model_dir(build_model("tiny", tok, seed=0, n_positions=32), tok, root / "short")
    foreign = _foreign_tokenizer()
    dirs["foreign"] = save_model_dir(build_model("tiny", foreign, seed=0), foreign, root / "foreign")
    return dirs


def _experiment(name: str, artifacts: Path) -> str:
    """An experiment whose artifacts live under ``artifacts`` (a sqlite store's default is
    ./mlruns in the working directory, which must not appear in the checkout)."""
    from mlflow import MlflowClient

    return MlflowClient().create_experiment(name, artifact_location=artifacts.as_uri())


@pytest.fixture(scope="module")
def experiment_id(tmp_path_factory: pytest.TempPathFactory):
    """This module's runs go to their own experiment (MLFLOW_EXPERIMENT_ID), artifacts in tmp."""
    exp = _experiment(f"eval-tests-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("eval-artifacts"))
    old = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = exp
    yield exp
    if old is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = old


@pytest.fixture(scope="module")
def registered(model_dirs: dict[str, Path], experiment_id: str) -> str:
    """NAME with v1 untrained (@production), v2 trained, v3 with a foreign tokenizer."""
    import mlflow
    from mlflow import MlflowClient

    from lifecycle.serving import log_model

    name = f"lm-eval-{uuid.uuid4().hex[:8]}"
    for key in ("untrained", "trained", "foreign"):
        with mlflow.start_run(run_name=f"register-{key}"):
            log_model(model_dirs[key], registered_model_name=name)
    MlflowClient().set_registered_model_alias(name, "production", "1")
    return name


def _tags(name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(name, version).tags)


def _run(run_id: str):
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id)


def test_evaluate_registered_version_writes_tags(registered: str, prepared_tiny: Path, capsys):
    card = json.loads((prepared_tiny / "data_card.json").read_text())
    # v1 holds @production itself: no baseline to compare with.
    assert cli("evaluate", "--model", f"models:/{registered}@production", "--data", str(prepared_tiny),
               *_fast_flags()) == 0
    out = capsys.readouterr().out
    assert "Checks: all passed" in out and f"Tagged models:/{registered}/1" in out
    tags = _tags(registered, "1")
    run = _run(tags["eval_run_id"])
    for metric in ("loss", "perplexity", "bits_per_byte", "rougeL", "bleu", "exact_match", "latency_p50_ms",
                   "latency_p95_ms", "tokens_per_s", "latency_p95_ms_bs8", "tokens_per_s_bs1",
                   "loss_tokens_per_s", "check_non_empty", "check_max_new_tokens", "check_deterministic",
                   "check_no_pii_echo"):
        assert float(tags[f"eval/{metric}"]) == pytest.approx(run.data.metrics[f"eval/{metric}"]), metric
    assert tags["eval_data_digest"] == card["digest"] == run.data.tags["eval_data_digest"]
    assert run.data.tags["lifecycle.stage"] == "evaluate"
    # On the CPU the measurements run in fp32, and say so on the run and on the version.
    assert tags["eval_precision"] == run.data.tags["eval_precision"] == run.data.params["eval.precision"] == "fp32"
    # An untrained model is near uniform over the vocabulary: loss ~ ln(V).
    assert float(tags["eval/loss"]) == pytest.approx(__import__("math").log(card["vocab_size"]), rel=0.1)
    assert float(tags["eval/perplexity"]) > 100 and 0 < float(tags["eval/bits_per_byte"]) < 16
    assert not any(k.startswith("compare/") for k in tags) and "compare_baseline" not in tags
    from mlflow.artifacts import download_artifacts

    results = json.loads(Path(download_artifacts(f"runs:/{run.info.run_id}/eval/results.json")).read_text())
    assert results["data_digest"] == card["digest"] and len(results["checks"]["challenger"]) == 4


def test_trained_challenger_beats_untrained_champion(registered: str, prepared_tiny: Path):
    # No --baseline: the default is the @production version (v1, untrained).
    assert cli("evaluate", "--model", f"models:/{registered}/2", "--data", str(prepared_tiny), *_fast_flags()) == 0
    tags = _tags(registered, "2")
    assert tags["compare_baseline"] == f"models:/{registered}/1"
    assert tags["compare_paired_on"] == "blocks"
    loss_delta = float(tags["compare/loss_delta"])
    low, high = float(tags["compare/loss_delta_ci_low"]), float(tags["compare/loss_delta_ci_high"])
    assert loss_delta < 0 and low <= loss_delta <= high < 0
    assert float(tags["compare/bits_per_byte_delta"]) < 0 and float(tags["compare/bits_per_byte_delta_ci_high"]) < 0
    assert float(tags["compare/win_rate"]) > 0.5
    run = _run(tags["eval_run_id"])
    m = run.data.metrics
    assert m["compare/loss_delta"] == pytest.approx(m["eval/loss"] - m["baseline/loss"])
    assert run.data.tags["compare_data_digest"] == tags["eval_data_digest"]
    from mlflow import MlflowClient

    files = {f.path for f in MlflowClient().list_artifacts(run.info.run_id, "compare")}
    assert {"compare/comparison.json", "compare/comparison.png"} <= files


def _empty_split_copy(prepared: Path, dest: Path) -> Path:
    from datasets import Dataset, Features, Sequence, Value

    shutil.copytree(prepared, dest)
    shutil.rmtree(dest / "test")
    Dataset.from_dict({"input_ids": []}, features=Features({"input_ids": Sequence(Value("int64"))})).save_to_disk(
        str(dest / "test"))
    return dest


def test_bad_input_is_refused_with_one_line_and_no_tags(registered: str, model_dirs: dict[str, Path],
                                                        prepared_tiny: Path, tmp_path: Path, capsys):
    bad_prompts = tmp_path / "prompts.jsonl"
    bad_prompts.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c"\n')
    empty = _empty_split_copy(prepared_tiny, tmp_path / "empty")
    cases = [
        (["--model", f"models:/{registered}/99", "--data", str(prepared_tiny)], 5,
         f"no such version 99 (versions of {registered}: 1, 2, 3"),
        (["--model", f"models:/{registered}/3", "--data", str(prepared_tiny)], 4, "different tokenizer"),
        (["--model", f"models:/{registered}/1", "--data", str(empty)], 4, "split 'test' is empty"),
        (["--model", f"models:/{registered}/1", "--data", str(prepared_tiny), "--prompts", str(bad_prompts)], 4,
         f"{bad_prompts}:2: invalid JSON"),
        (["--model", f"models:/{registered}/1", "--data", str(prepared_tiny), "--set", "generation.num_prompts=0"],
         2, "generation.num_prompts must be positive"),
        (["--model", f"models:/{registered}/1", "--data", str(tmp_path / "nowhere.txt")], 4, "source not found"),
        (["--model", str(model_dirs["short"]), "--data", str(prepared_tiny)], 4,
         "blocks of 64 tokens but"),
    ]
    before = {v: _tags(registered, v) for v in ("1", "2", "3")}
    capsys.readouterr()
    for args, code, message in cases:
        assert cli("evaluate", *args) == code, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert {v: _tags(registered, v) for v in ("1", "2", "3")} == before


def test_raw_text_against_a_baseline_with_another_tokenizer(model_dirs: dict[str, Path], tmp_path: Path):
    """Different tokenizers: blocks do not pair, so the bootstrap pairs documents' bits/byte."""
    from mlflow import MlflowClient

    from lifecycle.data.sources import pydoc_documents
    from lifecycle.evaluate.dataset import text_digest

    docs = [d for _, d in zip(range(200), pydoc_documents())][150:158]
    text = tmp_path / "held_out.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    exp = f"eval-raw-{uuid.uuid4().hex[:6]}"
    _experiment(exp, tmp_path / "artifacts")
    assert cli("evaluate", "--model", str(model_dirs["foreign"]), "--data", str(text),
               "--baseline", str(model_dirs["trained"]), "--experiment", exp, *_fast_flags()) == 0
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert run.data.tags["compare_paired_on"] == "documents_bits_per_byte"
    assert run.data.tags["eval_data_digest"] == text_digest([d for d in docs if d.strip()])
    m = run.data.metrics
    assert m["compare/loss_delta_ci_low"] == m["compare/bits_per_byte_delta_ci_low"]
    assert m["compare/bits_per_byte_delta"] == pytest.approx(m["eval/bits_per_byte"] - m["baseline/bits_per_byte"])
    assert m["eval/num_documents"] == m["baseline/num_documents"] == len(docs)


@pytest.mark.e2e
def test_mlflow_run_entry_point(registered: str, prepared_tiny: Path, tmp_path: Path, experiment_id: str):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sets = ";".join(FAST)
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "evaluate", "--env-manager", "local",
         "--experiment-id", experiment_id,
         "-P", f"model=models:/{registered}/2", "-P", f"data={prepared_tiny}", "-P", "no_baseline=true",
         "-P", f"set={sets}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = _tags(registered, "2")
    run = _run(tags["eval_run_id"])
    assert run.data.tags.get("mlflow.project.entryPoint") == "evaluate"
    assert "eval/bits_per_byte" in run.data.metrics
    assert not any(k.startswith("compare/") for k in tags)  # --no-baseline: stale comparison tags removed
    assert run.info.experiment_id == experiment_id and not (tmp_path / "mlruns").exists()
