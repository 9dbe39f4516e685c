"""Training stage: config, sample order, checkpoints, the loop, faults, and the CLI with MLflow.

Everything runs the real code on the `tiny` preset for a handful of steps; the end-to-end tests
(SIGKILL resume, torchrun, `mlflow run`) live in tests/test_train_e2e.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lifecycle.config import load_config
from lifecycle.errors import (
    AcceleratorOutOfMemoryError,
    ConfigError,
    DataError,
    OutputExistsError,
    TrainingDivergedError,
)
from lifecycle.train.budget import Schedule
from lifecycle.train.checkpoint import CheckpointManager
from lifecycle.train.config import TrainConfig
from lifecycle.train.data import SampleOrder, load_prepared
from lifecycle.train.distributed import DistContext
from lifecycle.train.finetune import load_starting_point, tokenizer_mismatch
from lifecycle.train.loop import Trainer, oom_error

#: Small, fast settings shared by the tests (few validation batches keep evaluation cheap).
FAST = dict(max_steps=8, batch_size=4, eval_every=4, eval_batches=2, checkpoint_every=4, warmup_steps=2,
            progress=False, system_metrics=False, log_model=False)


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**FAST, "output": str(tmp_path / "ckpt"), **kw})


def _trainer(cfg: TrainConfig, data, *, log=None, resume_from=None) -> Trainer:
    start = load_starting_point(cfg, data.tokenizer, data.block_size)
    return Trainer(cfg, start.model, data, ctx=DistContext(device=torch.device("cpu")), log=log,
                   checkpoints=CheckpointManager(cfg.output, keep=cfg.keep_checkpoints), resume_from=resume_from)


@pytest.fixture(scope="module")
def data(prepared_tiny):
    return load_prepared(prepared_tiny)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=8"], "unknown config key lora.rank; valid keys: lora.r, lora.alpha"),
    (["max_step=3"], "unknown config key max_step; valid keys: preset, base_model"),
    (["preset=huge"], "preset: 'huge' is not one of tiny, small, gpt2"),
    (["lora.r=8"], "LoRA fine-tunes an existing model: give --base-model"),
    (["batch_size=0"], "batch_size must be a positive integer"),
    (["min_lr_ratio=2"], r"min_lr_ratio must be in \[0, 1\]"),
])
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, overrides)


def test_flags_override_file_and_set_overrides_flags(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("max_steps: 50\nlearning_rate: 0.01\nlora:\n  alpha: 8\n")
    cfg = load_config(TrainConfig, f, ["learning_rate=0.002"], max_steps=7, learning_rate=0.5, seed=3)
    assert (cfg.max_steps, cfg.learning_rate, cfg.seed, cfg.lora.alpha, cfg.lora.enabled) == (7, 0.002, 3, 8.0, False)


def test_cli_unknown_key_is_a_usage_error(prepared_tiny, tmp_path):
    from lifecycle.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(prepared_tiny), "--set", "lora.rank=8", "--output", str(tmp_path)])
    assert exc.value.code == 2


def test_schedule_warms_up_then_decays_to_the_floor():
    lam = [Schedule("cosine", 4, 20, 0.1)(s) for s in range(21)]
    assert lam[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lam[4:], lam[5:]))
    assert lam[20] == pytest.approx(0.1)
    assert lam[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine


# -- data order ---------------------------------------------------------------------------------


def test_sample_order_two_ranks_see_one_global_batch():
    one = SampleOrder(37, seed=5, micro_batch=8)
    ranks = [SampleOrder(37, seed=5, micro_batch=4, world_size=2, rank=r) for r in (0, 1)]
    accum = [SampleOrder(37, seed=5, micro_batch=2, grad_accum=2, world_size=2, rank=r) for r in (0, 1)]
    for step in range(12):  # crosses several epochs of 37 rows
        full = one.micro_batch_rows(step, 0).tolist()
        shards = ranks[0].micro_batch_rows(step, 0).tolist() + ranks[1].micro_batch_rows(step, 0).tolist()
        assert sorted(full) == sorted(shards)
        split = [o.micro_batch_rows(step, a).tolist() for a in (0, 1) for o in accum]
        assert sorted(full) == sorted(sum(split, []))


def test_sample_order_is_a_permutation_per_epoch_and_a_pure_function_of_position():
    order = SampleOrder(10, seed=1, micro_batch=5)
    stream = torch.cat([order.micro_batch_rows(s, 0) for s in range(6)]).tolist()
    for epoch in range(3):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each epoch reshuffles
    fresh = SampleOrder(10, seed=1, micro_batch=5)
    assert fresh.micro_batch_rows(4, 0).tolist() == stream[20:25]  # resuming needs no replay
    assert order.samples_consumed(6) == 30


# -- checkpoints --------------------------------------------------------------------------------


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    (tmp_path / ".tmp-step-00000009-1").mkdir(parents=True)  # what a kill mid-write leaves
    (tmp_path / ".tmp-step-00000009-1" / "model.pt").write_bytes(b"partial")
    for step in (3, 6, 9):
        mgr.save(step, model_state={"w": torch.full((2,), float(step))}, optimizer_state={}, scheduler_state={},
                 trainer_state={"step": step})
    assert [p.name for p in mgr.checkpoints()] == ["step-00000006", "step-00000009"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    loaded = CheckpointManager.load(mgr.latest())
    assert loaded["state"]["step"] == 9 and loaded["model"]["w"].tolist() == [9.0, 9.0]
    assert loaded["best"] is None and "torch" in loaded["rng"]


# -- the loop -----------------------------------------------------------------------------------


def test_resumed_loop_matches_an_uninterrupted_one_exactly(data, tmp_path):
    cfg = _cfg(tmp_path)
    straight_log: dict[tuple[str, int], float] = {}
    straight = _trainer(cfg, data, log=lambda m, s: straight_log.update({(k, s): v for k, v in m.items()})).fit()
    # A kill after step 5 would leave the step-4 checkpoint: continue from it in a fresh model.
    ckpt = CheckpointManager(cfg.output).checkpoints()[0]
    assert ckpt.name == "step-00000004"
    resumed_log: dict[tuple[str, int], float] = {}
    resumed = _trainer(cfg, data, log=lambda m, s: resumed_log.update({(k, s): v for k, v in m.items()}),
                       resume_from=ckpt).fit()
    assert resumed.steps == straight.steps == 8
    assert resumed.last_val_loss == straight.last_val_loss
    assert sorted(resumed_log) == sorted(k for k in straight_log if k[1] > 4)
    for key, value in resumed_log.items():
        assert value == straight_log[key] or key[0] == "train/tokens_per_s"
    assert straight.best_val_loss < straight_log[("train/loss", 1)]  # it learned something


def test_early_stopping_keeps_the_best_weights(data, tmp_path):
    # A min_delta no later evaluation can beat: the first evaluation stays the best one.
    cfg = _cfg(tmp_path, max_steps=40, eval_every=2, early_stopping_patience=2, early_stopping_min_delta=100.0)
    trainer = _trainer(cfg, data)
    result = trainer.fit()
    assert result.stopped_early and result.steps == 6 and result.best_step == 2
    assert trainer.evaluate() == pytest.approx(result.best_val_loss, abs=1e-6)
    assert result.last_val_loss != result.best_val_loss


def test_divergence_stops_with_the_last_good_checkpoint(data, tmp_path):
    cfg = _cfg(tmp_path, learning_rate=1e30, warmup_steps=0, max_grad_norm=0.0, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError,
                       match=r"diverged at step 2: loss is nan; last good checkpoint: .*step-00000001"):
        _trainer(cfg, data).fit()
    assert [p.name for p in CheckpointManager(cfg.output).checkpoints()] == ["step-00000001"]


def test_out_of_memory_message_suggests_accumulation(tmp_path):
    err = oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                    _cfg(tmp_path, batch_size=16, grad_accum=2))
    assert isinstance(err, AcceleratorOutOfMemoryError) and err.exit_code == 13
    assert "--batch-size 8 --set grad_accum=4" in str(err)


# -- bad data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("remove, message", [
    ("validation", "has no validation/ split"),
    ("tokenizer", "has no tokenizer/ folder"),
])
def test_incomplete_prepared_data_is_refused(prepared_tiny, tmp_path, remove, message):
    broken = tmp_path / "data"
    shutil.copytree(prepared_tiny, broken)
    shutil.rmtree(broken / remove)
    with pytest.raises(DataError, match=message):
        load_prepared(broken)


def test_finetuning_refuses_data_from_another_tokenizer(data, tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lifecycle.train.model import build_model, save_model_dir

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a completely different corpus, tiny and odd"] * 50, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    other = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                    bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    base = save_model_dir(build_model("tiny", other, seed=0), other, tmp_path / "base")
    assert tokenizer_mismatch(data.tokenizer, data.tokenizer) is None
    assert "vocabulary sizes differ" in tokenizer_mismatch(data.tokenizer, other)
    cfg = _cfg(tmp_path, base_model=str(base))
    with pytest.raises(DataError, match=r"prepare it again with `lifecycle prepare --tokenizer .*base"):
        load_starting_point(cfg, data.tokenizer, data.block_size)


# -- with MLflow --------------------------------------------------------------------------------


def _cli(args: list[str]) -> tuple[int, str]:
    from tests.cli import cli_output

    return cli_output(*args)


def test_train_logs_and_registers_then_finetunes_with_lora(prepared_tiny, tmp_path, unique_name):
    from mlflow.tracking import MlflowClient

    code, out = _cli(["train", "--data", str(prepared_tiny), "--max-steps", "6", "--batch-size", "4",
                      "--output", str(tmp_path / "ck"), "--model-name", unique_name, "--seed", "7",
                      "--set", "eval_every=3", "--set", "eval_batches=2", "--set", "progress=false"])
    assert code == 0, out
    assert f"models:/{unique_name}/1" in out.splitlines()
    client = MlflowClient()
    version = client.get_model_version(unique_name, "1")
    run = client.get_run(version.run_id)
    card = json.loads((prepared_tiny / "data_card.json").read_text())
    assert version.tags["data_digest"] == card["digest"] == run.data.tags["data_digest"]
    assert version.tags["train_run_id"] == run.info.run_id and version.tags["base_model"] == "scratch:tiny"
    assert version.tags["data_run_id"], "the prepare run is found by its data digest"
    assert run.info.run_id in version.description and run.data.params["seed"] == "7"
    assert run.data.params["lora.r"] == "0" and run.data.params["max_steps"] == "6"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 7))
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 6
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [3, 6]
    val = client.get_metric_history(run.info.run_id, "val/loss")[-1].value
    assert client.get_metric_history(run.info.run_id, "val/perplexity")[-1].value == pytest.approx(math.exp(val))
    assert "plots/training_curves.png" in [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert run.info.status == "FINISHED"

    # The continuous-training case: fine-tune what production serves, with LoRA merged back in.
    client.set_registered_model_alias(unique_name, "production", "1")
    code, out = _cli(["train", "--data", str(prepared_tiny), "--base-model", f"models:/{unique_name}@production",
                      "--max-steps", "4", "--batch-size", "4", "--output", str(tmp_path / "ck2"),
                      "--model-name", unique_name, "--set", "lora.r=4", "--set", "eval_every=4",
                      "--set", "eval_batches=2", "--set", "progress=false", "--set", "system_metrics=false"])
    assert code == 0, out
    assert f"models:/{unique_name}/2" in out.splitlines()
    v2 = client.get_model_version(unique_name, "2")
    assert v2.tags["base_model"] == f"models:/{unique_name}@production"
    from transformers import AutoModelForCausalLM

    from lifecycle.tracking import resolve_model_dir

    merged = AutoModelForCausalLM.from_pretrained(resolve_model_dir(f"models:/{unique_name}/2"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    params = client.get_run(v2.run_id).data.params
    assert int(params["model.trainable_parameters"]) < int(params["model.parameters"]) / 5


def test_existing_checkpoints_need_resume_or_overwrite(prepared_tiny, tmp_path, tracking_uri):
    from lifecycle.train.run import train

    cfg = _cfg(tmp_path, max_steps=2, checkpoint_every=2, eval_every=2)
    train(cfg, str(prepared_tiny))
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        train(cfg, str(prepared_tiny))
    with pytest.raises(ConfigError, match=r"--resume with a different config \(learning_rate"):
        train(TrainConfig(**{**cfg.__dict__, "learning_rate": 0.5}), str(prepared_tiny), resume=True)


def test_divergence_marks_the_run_failed(prepared_tiny, tmp_path, tracking_uri):
    import mlflow

    from lifecycle.train.run import train

    cfg = _cfg(tmp_path, learning_rate=1e30, warmup_steps=0, max_grad_norm=0.0, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError):
        train(cfg, str(prepared_tiny))
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "train/loss")] == [1]
