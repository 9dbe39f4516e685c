"""Hyperparameter search: the space file's validation, and a real 3-trial study with pruning.

The study runs the real training loop on the `tiny` preset for a few steps per trial, against a
fresh sqlite tracking database with the Optuna storage beside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lifecycle.errors import ConfigError
from lifecycle.optimize.space import base_mapping, check_extremes, load_space, parse_space

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tune_space.yaml"


def test_example_space_file_is_valid():
    space = load_space(EXAMPLE)
    assert space.names == ["learning_rate", "warmup_steps", "batch_size"]
    check_extremes(space, base_mapping(space))


@pytest.mark.parametrize("params, message", [
    ({"learning_rat": {"type": "float", "low": 1e-4, "high": 1e-2}},
     r"params\.learning_rat: unknown parameter 'learning_rat'; valid parameters \(TrainConfig keys\): preset, "),
    ({"lora.rank": {"type": "int", "low": 1, "high": 8}}, "unknown parameter 'lora.rank'"),
    ({"learning_rate": {"type": "float", "low": 1e-2, "high": 1e-4}}, r"empty range: low \(0\.01\) must be below high"),
    ({"warmup_steps": {"type": "int", "low": 5, "high": 5}}, "empty range"),
    ({"batch_size": {"type": "categorical", "choices": []}}, "empty range: give at least one choice"),
    ({"warmup_steps": {"type": "float", "low": 0, "high": 5}}, "warmup_steps is an integer key: use type: int"),
    ({"learning_rate": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "a log range needs low > 0"),
    ({"output": {"type": "categorical", "choices": ["a", "b"]}}, "set by the search for every trial"),
    ({"learning_rate": {"type": "float", "low": 1e-4, "hgh": 1e-2}}, r"params\.learning_rate\.hgh: unknown key"),
])
def test_bad_space_is_refused_with_the_parameter_named(params, message):
    with pytest.raises(ConfigError, match=message):
        parse_space({"params": params}, "space.yaml")


def test_values_training_would_refuse_fail_before_the_study():
    space = parse_space({"params": {"learning_rate": {"type": "categorical", "choices": [0.001, -1.0]}}}, "s.yaml")
    with pytest.raises(ConfigError,
                       match=r"params\.learning_rate: -1\.0 is not a valid value: learning_rate must be positive"):
        check_extremes(space, base_mapping(space))


def test_a_key_both_searched_and_set_is_refused():
    space = parse_space({"params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}}, "s.yaml")
    with pytest.raises(ConfigError, match="--set learning_rate: that key is searched"):
        base_mapping(space, None, ("learning_rate=0.01",))


def test_cli_refuses_a_bad_space_before_anything_exists(tmp_path, tracking_uri, prepared_tiny, capsys):
    from lifecycle.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"learning_rate": {"type": "float", "low": 0.01, "high": 0.001}}}))
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--data", str(prepared_tiny), "--space", str(space), "--trials", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "params.learning_rate: empty range" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "optuna.db").exists()


# -- a real study ---------------------------------------------------------------------------------

SPACE = {
    "params": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
               "warmup_steps": {"type": "int", "low": 0, "high": 4}},
    "fixed": {"preset": "tiny", "max_steps": 16, "batch_size": 4, "eval_every": 4, "eval_batches": 2},
    # One finished trial is enough for the median to exist; the first evaluation may prune.
    "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0},
    "sampler": {"seed": 0},
    # A good setting, a hopeless one (pruned), then a good one again.
    "enqueue": [{"learning_rate": 5e-3, "warmup_steps": 2}, {"learning_rate": 1e-5, "warmup_steps": 0},
                {"learning_rate": 4e-3, "warmup_steps": 2}],
}


@pytest.mark.e2e
def test_three_trial_study_prunes_registers_the_best_and_resumes(tmp_path, tracking_uri, prepared_tiny,
                                                                 unique_name, one_torch_thread):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    args = ["tune", "--data", str(prepared_tiny), "--space", str(space), "--model-name", unique_name,
            "--output", str(tmp_path / "trials"), "--experiment", unique_name]
    main([*args, "--trials", "2"])
    main([*args, "--trials", "3"])  # the same study, resumed: one more trial under the same parent

    import optuna

    study = optuna.load_study(study_name=f"{unique_name}-tune", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states[:2] == ["COMPLETE", "PRUNED"] and states[2] in ("COMPLETE", "PRUNED")
    pruned = study.trials[1]
    assert pruned.user_attrs["pruned_at"]["step"] == 4  # stopped at its first validation

    runs = mlflow.search_runs(experiment_names=[unique_name], output_format="list")
    parents = [r for r in runs if r.data.tags.get("lifecycle.stage") == "tune"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["optuna.trial_number"]: r for r in runs if "optuna.trial_number" in r.data.tags}
    assert set(children) == {"0", "1", "2"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert children["1"].info.status == "KILLED" and children["1"].data.tags["tune.state"] == "PRUNED"
    assert children["0"].info.status == "FINISHED" and children["0"].data.params["learning_rate"] == "0.005"

    client = MlflowClient()
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/optimization_history.png", "plots/param_importances.png"}
    assert parent.data.metrics["tune/trials_pruned"] == states.count("PRUNED")

    best = study.best_trial
    versions = sorted(client.search_model_versions(f"name='{unique_name}'"), key=lambda v: int(v.version))
    # Trial 0 was registered by the first invocation; the resume registers only a new best.
    assert [v.tags["tune_trial"] for v in versions] == (["0"] if best.number == 0 else ["0", str(best.number)])
    mv = versions[-1]
    assert mv.run_id == children[str(best.number)].info.run_id
    assert mv.tags["tune_trial"] == str(best.number) and mv.tags["tune_study"] == f"{unique_name}-tune"
    assert float(mv.tags["tune/learning_rate"]) == pytest.approx(best.params["learning_rate"])
    # Only the best trial's checkpoints are kept.
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == [f"trial-{best.number:04d}"]
