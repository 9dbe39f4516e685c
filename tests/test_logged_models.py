"""MLflow 3 logged models against a real `mlflow server`: every evaluated checkpoint of a training run is a
logged model with its val/ metrics, ranked by `search_logged_models`; the registered version is the best
(or the last) of them and says which; evaluation puts its metrics on that model, against the evaluation
data; the prepared data is a dataset input of both runs; a checkpoint never registered loads and
registers later."""

from __future__ import annotations

import json

import pytest

from tests.cli import cli, cli_output

ORDER = [{"field_name": "metrics.val/loss", "ascending": True}]
EVAL_FAST = ["generation.num_prompts=2", "generation.max_new_tokens=4", "latency.requests=2", "latency.warmup=0",
             "latency.max_new_tokens=4", "compare.bootstrap_samples=200"]


def _inputs(client, run_id: str, context: str) -> list:
    return [d for d in client.get_run(run_id).inputs.dataset_inputs
            if any(t.key == "mlflow.data.context" and t.value == context for t in d.tags)]


def _train(prepared, tmp_path, name: str, experiment: str, *extra: str) -> None:
    code, out = cli_output("train", "--data", str(prepared), "--max-steps", "9", "--batch-size", "4",
                           "--output", str(tmp_path / f"ck-{name}-{len(extra)}"), "--model-name", name,
                           "--set", "eval_every=3", "--set", "eval_batches=2", "--set", "progress=false",
                           "--set", "system_metrics=false", "--set", f"experiment={experiment}", *extra)
    assert code == 0, out


@pytest.mark.e2e
def test_three_checkpoints_three_ranked_logged_models_and_the_best_registered(
        mlflow_server, prepared_tiny, tmp_path, monkeypatch, unique_name, one_torch_thread):
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from lifecycle.tracking import resolve_model_dir, version_model_id
    from lifecycle.train.logged_models import TAG_REGISTERED, TAG_STEP, register_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient()
    _train(prepared_tiny, tmp_path, unique_name, unique_name)
    version = client.get_model_version(unique_name, "1")
    run_id = version.run_id
    exp = client.get_run(run_id).info.experiment_id

    ranked = mlflow.search_logged_models(experiment_ids=[exp], filter_string=f"source_run_id = '{run_id}'",
                                         order_by=ORDER, output_format="list")
    assert sorted(int(m.tags[TAG_STEP]) for m in ranked) == [3, 6, 9]
    losses = [next(x.value for x in m.metrics if x.key == "val/loss") for m in ranked]
    assert losses == sorted(losses)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "val/loss")}
    assert sorted(history) == [3, 6, 9], "val/loss logged once per evaluation, not once more for the model"
    for model, loss in zip(ranked, losses):
        step = int(model.tags[TAG_STEP])
        assert loss == history[step]
        assert {x.key for x in model.metrics} >= {"val/loss", "val/perplexity"}
        assert str(model.status).endswith("READY") and model.source_run_id == run_id

    # The registered version is the best checkpoint's own logged model, now with the pyfunc packaging.
    best = ranked[0]
    assert version_model_id(version) == best.model_id
    assert version.tags[TAG_REGISTERED] == "best" and version.tags[TAG_STEP] == best.tags[TAG_STEP]
    assert client.get_run(run_id).data.metrics["val/best_step"] == float(best.tags[TAG_STEP])
    assert client.get_logged_model(best.model_id).tags[TAG_REGISTERED] == "best"
    out = mlflow.pyfunc.load_model(f"models:/{unique_name}/1").predict(["def f("], params={"max_new_tokens": 2})
    assert len(out) == 1 and isinstance(out["text"][0], str)

    # The prepared data is the training run's input, with the data card's digest.
    from lifecycle.lineage import DIGEST_CHARS, TAG_FULL_DIGEST

    digest = json.loads((prepared_tiny / "data_card.json").read_text())["digest"]
    (train_input,) = _inputs(client, run_id, "training")
    assert train_input.dataset.digest == digest[:DIGEST_CHARS]
    assert {t.key: t.value for t in train_input.tags}[TAG_FULL_DIGEST] == digest

    # Evaluating the version puts its eval/ metrics on the version's logged model, against the evaluation data.
    assert cli("evaluate", "--model", f"models:/{unique_name}/1", "--data", str(prepared_tiny),
               "--experiment", unique_name, *[a for item in EVAL_FAST for a in ("--set", item)]) == 0
    version = client.get_model_version(unique_name, "1")
    eval_run = client.get_run(version.tags["eval_run_id"])
    (eval_input,) = _inputs(client, eval_run.info.run_id, "evaluation")
    assert eval_input.dataset.digest == eval_run.data.tags["eval_data_digest"][:DIGEST_CHARS]
    on_model = {m.key: m for m in client.get_logged_model(best.model_id).metrics}
    assert on_model["eval/perplexity"].value == eval_run.data.metrics["eval/perplexity"]
    assert on_model["eval/perplexity"].dataset_digest == eval_input.dataset.digest
    assert on_model["eval/perplexity"].run_id == eval_run.info.run_id
    assert float(version.tags["eval/perplexity"]) == pytest.approx(eval_run.data.metrics["eval/perplexity"])
    assert "val/loss" in on_model  # the checkpoint's own validation metrics stay

    # A checkpoint training did not register: its weights load as they are, and it registers later.
    other = ranked[-1]
    weights = AutoModelForCausalLM.from_pretrained(resolve_model_dir(f"models:/{other.model_id}"))
    assert weights.config.n_layer >= 1
    info = register_checkpoint(other.model_id, unique_name)
    v2 = client.get_model_version(unique_name, str(info.registered_model_version))
    assert version_model_id(v2) == other.model_id and v2.tags[TAG_STEP] == other.tags[TAG_STEP]
    out = mlflow.pyfunc.load_model(f"models:/{unique_name}/{v2.version}").predict(["x"], params={"max_new_tokens": 2})
    assert len(out) == 1


@pytest.mark.e2e
def test_register_checkpoint_last_registers_the_last_step(mlflow_server, prepared_tiny, tmp_path, monkeypatch,
                                                          unique_name, one_torch_thread):
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from lifecycle.tracking import resolve_model_dir, version_model_id
    from lifecycle.train.logged_models import TAG_REGISTERED, TAG_STEP, run_checkpoints

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient()
    # Early stopping that no evaluation can satisfy: step 3 is the best, training stops after step 6.
    _train(prepared_tiny, tmp_path, unique_name, unique_name, "--set", "register_checkpoint=last",
           "--set", "early_stopping_patience=1", "--set", "early_stopping_min_delta=100")
    version = client.get_model_version(unique_name, "1")
    assert version.tags[TAG_REGISTERED] == "last" and version.tags[TAG_STEP] == "6"
    assert client.get_run(version.run_id).data.metrics["val/best_step"] == 3.0
    model = client.get_logged_model(version_model_id(version))
    assert model.tags[TAG_STEP] == "6"
    last = [m.value for m in client.get_metric_history(version.run_id, "val/loss") if m.step == 6]
    assert [x.value for x in model.metrics if x.key == "val/loss"] == last
    # The registered weights are step 6's, not the best weights the loop restored at the end.
    step3 = run_checkpoints(client, version.run_id)[3].model_id
    registered = AutoModelForCausalLM.from_pretrained(resolve_model_dir(f"models:/{unique_name}/1")).state_dict()
    best = AutoModelForCausalLM.from_pretrained(resolve_model_dir(f"models:/{step3}")).state_dict()
    assert not all(torch.equal(registered[k], best[k]) for k in registered)


def test_register_checkpoint_rule_is_validated():
    from lifecycle.errors import ConfigError
    from lifecycle.train.config import TrainConfig

    with pytest.raises(ConfigError, match="best or last"):
        TrainConfig(register_checkpoint="newest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs log_checkpoints=true"):
        TrainConfig(register_checkpoint="last", log_checkpoints=False)


def test_a_resumed_run_logs_each_checkpoint_once(prepared_tiny, tmp_path, tracking_uri, unique_name,
                                                 one_torch_thread):
    """Resuming a run (here: a finished one, for more steps) finds the checkpoints it logged by tag and
    makes models only for the new evaluations; the version registered after it is still the best one."""
    from mlflow.tracking import MlflowClient

    from lifecycle.tracking import version_model_id
    from lifecycle.train.logged_models import TAG_REGISTERED, run_checkpoints

    args = ["train", "--data", str(prepared_tiny), "--batch-size", "4", "--output", str(tmp_path / "ck"),
            "--model-name", unique_name, "--set", "eval_every=3", "--set", "eval_batches=2",
            "--set", "progress=false", "--set", "system_metrics=false"]
    code, out = cli_output(*args, "--max-steps", "6")
    assert code == 0, out
    client = MlflowClient()
    run_id = client.get_model_version(unique_name, "1").run_id
    first = {step: m.model_id for step, m in run_checkpoints(client, run_id).items()}
    assert sorted(first) == [3, 6]
    code, out = cli_output(*args, "--max-steps", "9", "--resume")
    assert code == 0, out
    v2 = client.get_model_version(unique_name, "2")
    assert v2.run_id == run_id
    after = {step: m.model_id for step, m in run_checkpoints(client, run_id).items()}
    assert sorted(after) == [3, 6, 9] and {s: after[s] for s in (3, 6)} == first
    assert len(client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id],
                                           filter_string=f"source_run_id = '{run_id}'")) == 3
    best_step = int(client.get_run(run_id).data.metrics["val/best_step"])
    assert version_model_id(v2) == after[best_step] and v2.tags[TAG_REGISTERED] == "best"
