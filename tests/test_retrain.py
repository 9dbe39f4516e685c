"""Continuous training: ``mlflow run . -e retrain`` (in the session's history, tests/history.py),
what it recorded, ``lifecycle monitor --retrain-with`` on a retrain verdict, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lifecycle.registry.ledger import Ledger
from tests.cli import cli
from tests.history import RETRAIN_SETS, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _retrain_run(name: str, base_version: str = "1"):
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.model_name = '{name}' and tags.`lifecycle.stage` = 'retrain' "
                                            f"and tags.`retrain.base_version` = '{base_version}'",
                              order_by=["attributes.start_time ASC"])
    assert runs, f"no retrain run of {name}"
    return runs[0]


def test_prepare_config_inherits_the_production_data_settings():
    from lifecycle.config import to_dict
    from lifecycle.data.config import PackConfig, PrepareConfig, QualityConfig, SourceConfig, SplitConfig
    from lifecycle.retrain import prepare_config

    old = PrepareConfig(source=SourceConfig(uri="builtin:pydoc", max_documents=400), quality=QualityConfig(min_words=3),
                        split=SplitConfig(validation=0.1, test=0.2), pack=PackConfig(block_size=64), seed=7)
    card = {"config": to_dict(old), "block_size": 64, "digest": "d"}
    cfg = prepare_config(card, source="new.jsonl", text_column="body", tokenizer="models:/m/3",
                         against="runs:/abc/prepared", overrides=["prepare.pii.mode=drop"])
    assert cfg.source.uri == "new.jsonl" and cfg.source.text_column == "body" and cfg.source.max_documents is None
    assert cfg.tokenizer.name_or_path == "models:/m/3" and cfg.dedup.against == "runs:/abc/prepared"
    assert (cfg.quality.min_words, cfg.split.test, cfg.pack.block_size, cfg.seed) == (3, 0.2, 64, 7)
    assert cfg.pii.mode == "drop"


def test_a_partial_train_section_keeps_the_fine_tuning_defaults():
    from lifecycle.config import load_config
    from lifecycle.retrain import RetrainConfig

    cfg = load_config(RetrainConfig, None, ["train.eval_every=5"], **{"train.max_steps": 7})
    # Retrain's own defaults (a gentle learning rate), not TrainConfig's pre-training ones.
    t = cfg.train
    assert (t.eval_every, t.max_steps, t.learning_rate, t.warmup_steps) == (5, 7, 3e-4, 10)


def test_served_prompts_are_this_models_successful_requests_scrubbed(tmp_path):
    from lifecycle.errors import DataError
    from lifecycle.retrain import served_prompts

    def rec(**kw):
        return json.dumps({"ts": "2026-01-01T00:00:00+00:00", "latency_ms": 1.0, "model_name": "m",
                           "model_version": "1", "status": "ok", **kw})

    path = tmp_path / "records.jsonl"
    path.write_text("\n".join([
        rec(prompts=["call me at +44 20 7946 0958 about the harbor", "  "]),
        rec(model_version="2", prompts=["from version two, mail bob@example.org"]),
        rec(model_name="other", prompts=["another model's prompt"]),
        rec(status="invalid", prompts=["a refused request"]),
        rec(),  # served without text
    ]) + "\n", encoding="utf-8")
    texts, counts = served_prompts("m", records=str(path))
    assert texts == ["call me at <PHONE> about the harbor", "from version two, mail <EMAIL>"]
    # Every version's prompts (what users asked), counted per version: nothing mixed in unseen.
    assert counts == {"records": 4, "with_text": 2, "prompts": 2, "scrubbed": 2, "version/1": 1, "version/2": 1}
    with pytest.raises(DataError, match="no served prompts of other2"):
        served_prompts("other2", records=str(path))
    with pytest.raises(DataError, match="2026-01-02"):
        served_prompts("m", records=str(path), since="2026-01-02T00:00:00")


@pytest.mark.e2e
def test_retrain_entry_point_fine_tunes_production_with_lineage(lifecycle_history):
    h = lifecycle_history
    name, client = h["name"], MlflowClient()
    out = h["retrain_stdout"]
    assert "v1 -> v2 (6 served prompts added)" in out
    assert "promote_staging: promoted" in out
    # The test policy wants a person's approval for production: a refusal, not a failure.
    assert "promote_production: refused - required_tags" in out and "approved_by" in out

    parent = _retrain_run(name)
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} == {"prepare", "train", "evaluate", "evaluate_new_data",
                                                   "promote_staging", "promote_production"}
    by_name = {c.info.run_name: c for c in children}

    v1, v2 = client.get_model_version(name, "1"), client.get_model_version(name, "2")
    old_run, new_run = v1.tags["data_run_id"], v2.tags["data_run_id"]
    assert old_run and new_run and new_run != old_run
    # The lineage names both the production model's data and the new data.
    assert v2.tags["base_data_run_id"] == old_run and v2.tags["base_data_digest"] == v1.tags["data_digest"]
    assert v2.tags["lineage.data_run_ids"] == f"{old_run},{new_run}"
    assert v2.tags["base_model"] == f"models:/{name}/1" and v2.tags["base_model_version"] == "1"
    assert v2.tags["retrain_run_id"] == parent.info.run_id
    assert by_name["prepare"].info.run_id == new_run  # the prepare step is the new data run

    card = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{new_run}/data_card.json")).read_text())
    old_card = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{old_run}/data_card.json")).read_text())
    # Deduplicated against production's data, with production's tokenizer and split settings.
    assert card["dedup"]["exact_against"] >= 3 and card["dedup"]["reference_documents"] > 0
    assert card["tokenizer"]["trained"] is False and card["tokenizer"]["from"] == f"models:/{name}/1"
    assert card["vocab_size"] == old_card["vocab_size"] and card["block_size"] == old_card["block_size"]
    assert card["config"]["split"] == old_card["config"]["split"]
    assert card["config"]["seed"] == old_card["config"]["seed"]
    # Served prompts were added, and the e-mail address one of them carried never reached the data.
    assert parent.data.metrics["retrain/served_prompts"] == 6
    assert parent.data.metrics["retrain/served_version/1"] == 6 and "6 from version 1" in out
    raw = "".join(Path(mlflow.artifacts.download_artifacts(f"runs:/{new_run}/prepared/raw/{s}.jsonl")).read_text()
                  for s in ("train", "validation", "test"))
    assert "copper engine" in raw and "jane.doe@example.com" not in raw
    # Evaluated against production on the data production was evaluated on.
    assert v2.tags["eval_data_digest"] == v1.tags["eval_data_digest"]
    assert v2.tags["compare_baseline"] == f"models:/{name}/1" and "compare/loss_delta" in v2.tags
    assert v2.tags["retrain.new_data_eval_run_id"] == by_name["evaluate_new_data"].info.run_id
    assert "compare/loss_delta" in by_name["evaluate_new_data"].data.metrics
    refused = [e for e in Ledger(client).events(name) if e.action == "reject" and e.to_version == "2"]
    assert refused and refused[0].target == "production"
    assert any(g["gate"] == "required_tags" and g["status"] == "fail" for g in refused[0].gates)


@pytest.mark.e2e
def test_monitor_retrain_verdict_starts_continuous_training(lifecycle_history, tmp_path, capsys):
    h = lifecycle_history
    name = h["name"]
    cfg = tmp_path / "retrain.yaml"
    sets = {}
    for item in RETRAIN_SETS:
        key, value = item.split("=", 1)
        node = sets
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    sets["train"]["max_steps"] = 4
    sets.update({"workdir": str(tmp_path / "work"), "promote_to": "none", "evaluate_new_data": False})
    cfg.write_text(json.dumps(sets), encoding="utf-8")  # JSON is YAML
    before = len(MlflowClient().search_model_versions(f"name='{name}'"))
    code = cli(*["monitor", name, "--records", str(h["records"]), "--policy", str(h["policy"]), "--since", "all",
                 "--set", "semantic=false", "--retrain-with", str(h["new_data"]), "--retrain-config", str(cfg)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Verdict: retrain" in out and f"Retraining {name} with" in out
    new_version = str(before + 1)
    assert f"v1 -> v{new_version}" in out
    mv = MlflowClient().get_model_version(name, new_version)
    parent = MlflowClient().get_run(mv.tags["retrain_run_id"])
    monitor_run = parent.data.tags["retrain.monitor_run_id"]
    assert MlflowClient().get_run(monitor_run).data.tags["monitor.verdict"] == "retrain"
    # promote_to=none: nothing moved.
    assert str(MlflowClient().get_model_version_by_alias(name, "production").version) == "1"


@pytest.mark.e2e
def test_bad_input_is_refused_before_anything_is_registered(lifecycle_history, tmp_path, capsys):
    h = lifecycle_history
    name, client = h["name"], MlflowClient()
    versions = len(client.search_model_versions(f"name='{name}'"))
    fast = ["--policy", str(h["policy"]), "--workdir", str(tmp_path / "w"), "--max-steps", "2",
            *[a for s in RETRAIN_SETS for a in ("--set", s)]]

    assert cli(*["retrain", "no-such-model", "--new-data", str(h["new_data"]), *fast]) == 5
    assert "no-such-model" in capsys.readouterr().err
    assert cli(*["retrain", name, "--new-data", str(tmp_path / "missing.jsonl"), *fast]) == 4
    assert "source not found" in capsys.readouterr().err
    no_text = tmp_path / "no_text.jsonl"
    rec = json.loads(h["records"].read_text().splitlines()[0])
    rec.pop("prompts"), rec.pop("completions")
    no_text.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    assert cli(*["retrain", name, "--new-data", str(h["new_data"]), "--with-served-prompts", "--records",
                 str(no_text), *fast]) == 4
    assert "LIFECYCLE_INFERENCE_LOG_TEXT=1" in capsys.readouterr().err
    assert cli(*["retrain", name, "--new-data", str(h["new_data"]), "--set", "train.base_model=x", *fast]) == 2
    capsys.readouterr()
    # Only documents production was already trained on: nothing new to learn from.
    dupes = write_jsonl(tmp_path / "dupes.jsonl", h["old_docs"])
    assert cli(*["retrain", name, "--new-data", str(dupes), *fast]) == 4
    assert "documents were dropped" in capsys.readouterr().err
    assert len(client.search_model_versions(f"name='{name}'")) == versions
