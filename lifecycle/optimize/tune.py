"""``lifecycle tune``: an Optuna study over training hyperparameters, tracked in MLflow.

Layout in MLflow: one parent run (stage ``tune``) holds the study's summary, its trials table and
two PNGs (optimisation history, parameter importance); every trial is a nested child run in which
:func:`lifecycle.train.run.train` logs exactly what a plain training run logs. A median pruner
reads the validation loss as training reports it (through ``train``'s ``callbacks``) and stops
poor trials early: their child runs end ``KILLED`` with the tag ``tune.state=PRUNED``.

Resumable: the study lives in an Optuna RDB storage beside the tracking database
(``sqlite:///<dir of mlflow.db>/optuna.db``), keyed by ``--study-name``; running the same
command again continues to ``--trials`` in total under the same parent run. Trials left running by
a killed process are failed by Optuna's heartbeat check and retried once with the same params.

Each trial checkpoints into ``OUTPUT/trial-NNNN``; only the best finished trial's folder is kept,
and at the end its weights are registered as a new version of ``--model-name`` (from the best
trial's child run, so the version's run holds the trial's params) tagged with the study and trial.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lifecycle import tracking
from lifecycle.config import flatten
from lifecycle.errors import AcceleratorOutOfMemoryError, ConfigError, DataError, TrainingDivergedError
from lifecycle.optimize.space import Space, check_extremes, trial_config

log = logging.getLogger(__name__)

#: The objective: the best validation loss a trial reached (what ``train`` keeps as the model).
OBJECTIVE = "val/best_loss"
#: Trial failures the study survives (the trial is marked FAIL, the study goes on).
TRIAL_FAILURES = (TrainingDivergedError, AcceleratorOutOfMemoryError)
TAG_STATE = "tune.state"
HEARTBEAT_S = 10
GRACE_S = 30


@dataclass
class TuneOutcome:
    """What ``lifecycle tune`` reports."""

    study_name: str
    storage: str
    parent_run_id: str
    ran: int
    complete: int
    pruned: int
    failed: int
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    model_uri: str | None = None
    version: str | None = None
    resumed: bool = False


def default_storage(tracking_uri: str | None = None) -> str:
    """Optuna storage beside the tracking database: ``optuna.db`` next to a sqlite ``mlflow.db``.

    A tracking server (http) or another database gets ``sqlite:///optuna.db`` in the working
    directory: Optuna's tables cannot share MLflow's database (both keep an ``alembic_version``).
    """
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return f"sqlite:///{db.parent / 'optuna.db'}" if str(db.parent) not in ("", ".") else "sqlite:///optuna.db"
    return "sqlite:///optuna.db"


def space_digest(space: Space, base: Mapping[str, Any]) -> str:
    """What makes two runs the same study: the searched ranges and the shared training config."""
    blob = json.dumps({"params": [vars(p) for p in space.params], "base": base}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _quiet_optuna() -> Any:
    import optuna

    # Our progress bar and summary say what optuna's per-trial INFO lines would.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def pruning_callback(trial: Any) -> Any:
    """A ``train`` callback: report ``val/loss`` to the trial and raise ``TrialPruned`` when told."""
    import optuna

    def on_metrics(metrics: Mapping[str, float], step: int) -> None:
        if "val/loss" not in metrics:
            return
        value = float(metrics["val/loss"])
        trial.report(value, step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at", {"step": step, "val_loss": value})
            raise optuna.TrialPruned(f"val/loss {value:.4f} at step {step} is worse than the median of earlier trials")

    return on_metrics


class _Study:
    """The objective, the after-trial bookkeeping and the checkpoint folders of one study."""

    def __init__(self, space: Space, base: Mapping[str, Any], data: str, output: Path, model_name: str,
                 parent_run_id: str, experiment_id: str, bar: Any):
        self.space = space
        self.base = dict(base)
        self.data = data
        self.output = output
        self.model_name = model_name
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.bar = bar
        self.lock = threading.Lock()

    def controlled(self, number: int) -> dict[str, Any]:
        """What the search sets for every trial (see :data:`lifecycle.optimize.space.CONTROLLED`)."""
        return {"output": str(self.output / f"trial-{number:04d}"), "model_name": self.model_name,
                "log_model": False, "progress": False, "system_metrics": False,
                # One checkpoint, written at the last step (or an early stop): what gets registered.
                "checkpoint_every": 10 ** 9, "keep_checkpoints": 1}

    def objective(self, trial: Any) -> float:
        """Train one trial in its own nested MLflow run; the objective is its best validation loss."""
        import mlflow
        import optuna

        from lifecycle.train.run import train

        values = {p.name: p.suggest(trial) for p in self.space.params}
        cfg = trial_config(self.base, values, self.controlled(trial.number))
        trial.set_user_attr("output", cfg.output)
        # Worker threads have no active run: parent_run_id nests the child explicitly.
        child = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, parent_run_id=self.parent_run_id,
                                 experiment_id=self.experiment_id,
                                 tags={"optuna.trial_number": str(trial.number),
                                       "optuna.study": trial.study.study_name})
        run_id = child.info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            outcome = train(cfg, self.data, overwrite=True, callbacks=[pruning_callback(trial)])
        except optuna.TrialPruned:
            self._end(run_id, "PRUNED", "KILLED")
            raise
        except BaseException as exc:
            if interrupted(exc):
                # Stopped from outside (SIGTERM, Ctrl-C): not the trial's fault. The same params
                # run again first when the study is resumed, and this trial does not count.
                self._end(run_id, "INTERRUPTED", "KILLED")
                trial.study.enqueue_trial(trial.params, skip_if_exists=False)
            else:
                if isinstance(exc, TRIAL_FAILURES):
                    trial.set_user_attr("failure", str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__)
                self._end(run_id, "FAIL", "FAILED")
            raise
        value = outcome.best_val_loss
        if not math.isfinite(value):
            self._end(run_id, "FAIL", "FAILED")
            raise TrainingDivergedError(f"trial {trial.number} produced no finite validation loss")
        self._end(run_id, "COMPLETE", "FINISHED")
        return value

    @staticmethod
    def _end(run_id: str, state: str, status: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        MlflowClient().set_tag(run_id, TAG_STATE, state)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            MlflowClient().set_terminated(run_id, status)

    def after_trial(self, study: Any, trial: Any) -> None:
        """Log the trial's value on the parent run; keep only the best finished trial's checkpoints."""
        from mlflow.tracking import MlflowClient
        from optuna.trial import TrialState

        value = trial.value if trial.state == TrialState.COMPLETE else None
        if value is not None:
            MlflowClient().log_metric(self.parent_run_id, "tune/trial_value", float(value), step=trial.number)
        with self.lock:
            keep: str | None = None
            try:
                best = study.best_trial
                keep = best.user_attrs.get("output")
            except ValueError:  # no complete trial yet
                pass
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
                out = t.user_attrs.get("output")
                if out and out != keep and Path(out).exists():
                    shutil.rmtree(out, ignore_errors=True)
        if self.bar is not None:
            self.bar.update(1)
            try:
                self.bar.set_postfix(best=f"{study.best_value:.4f}", refresh=False)
            except ValueError:
                pass


def _mark_stale(study: Any, trial: Any) -> None:
    """Optuna failed a trial whose process died: end its MLflow run too, then retry it once."""
    from mlflow.tracking import MlflowClient
    from optuna.storages import RetryFailedTrialCallback

    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        try:
            MlflowClient().set_tag(run_id, TAG_STATE, "FAIL")
            MlflowClient().set_terminated(run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001 - the retry matters more than the bookkeeping
            log.warning("could not end the run of stale trial %d: %s", trial.number, exc)
    RetryFailedTrialCallback(max_retry=1)(study, trial)


def open_study(name: str, storage_url: str, space: Space, digest: str, data_digest: str) -> tuple[Any, bool]:
    """Create the study or load it for a resume (refusing one made with another space or data)."""
    optuna = _quiet_optuna()
    from optuna.storages import RDBStorage

    try:
        with warnings.catch_warnings():
            # The heartbeat is what makes a killed study resumable; optuna still calls it experimental.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                 heartbeat_stale_trial_callback=_mark_stale)
    except Exception as exc:  # noqa: BLE001 - a bad URL or an unreachable database
        raise ConfigError(f"cannot open the study storage {tracking.mask_secrets(storage_url)}: "
                          f"{tracking.mask_secrets(str(exc).splitlines()[0])}") from None
    pruner = optuna.pruners.MedianPruner(n_startup_trials=space.pruner.get("n_startup_trials", 2),
                                         n_warmup_steps=space.pruner.get("n_warmup_steps", 0),
                                         interval_steps=space.pruner.get("interval_steps", 1))
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    resumed = name in summaries
    seed = space.sampler.get("seed")
    if seed is not None and resumed:
        # A resumed process must not replay the first process's random draws: offset the seed.
        seed += summaries[name].n_trials
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.sampler.get("n_startup_trials", 10),
                                         constant_liar=True)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", pruner=pruner,
                                sampler=sampler, load_if_exists=True)
    if resumed:
        theirs = study.user_attrs.get("space_digest")
        if theirs and theirs != digest:
            raise ConfigError(f"study {name!r} in {tracking.mask_secrets(storage_url)} was made with another "
                              "search space or training config; resume it with the same --space/--config/--set, "
                              "or pick a new --study-name")
        if study.user_attrs.get("data_digest") not in (None, data_digest):
            raise DataError(f"study {name!r} was run on other data (digest {study.user_attrs['data_digest'][:12]}); "
                            "resume it on the same data, or pick a new --study-name")
    else:
        study.set_user_attr("space_digest", digest)
        study.set_user_attr("data_digest", data_digest)
        for point in space.enqueue:
            study.enqueue_trial(point, skip_if_exists=True)
    return study, resumed


def interrupted(exc: BaseException) -> bool:
    """SIGTERM/SIGINT reached the training loop (it raises TrainingInterrupted) or Ctrl-C elsewhere."""
    return isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TrainingInterrupted"


def _finished(study: Any) -> list[Any]:
    """Trials that count towards --trials: complete, pruned, or failed on their own account
    (diverged, out of memory). Interrupted and stale trials are run again instead."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=states)
            if t.state != TrialState.FAIL or "failure" in t.user_attrs]


def tune(data: str, space: Space, *, trials: int, base: Mapping[str, Any], jobs: int = 1,
         study_name: str | None = None, storage: str | None = None, model_name: str | None = None,
         output: str | Path | None = None, experiment: str | None = None, register: bool = True,
         timeout: float | None = None, progress: bool = True) -> TuneOutcome:
    """Run (or resume) the study until it holds ``trials`` finished trials; register the best."""
    import mlflow

    from lifecycle.train.config import DEFAULT_MODEL_NAME
    from lifecycle.train.run import resolve_data

    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("run `lifecycle tune` as one process, not under torchrun; --jobs runs trials in parallel")
    check_extremes(space, base)
    model_name = model_name or DEFAULT_MODEL_NAME
    name = study_name or f"{model_name}-tune"
    storage_url = storage or default_storage()
    out_root = Path(output) if output else Path("tune") / name
    _, lineage = resolve_data(data, search_runs=False)  # bad data fails before a study or run exists
    study, resumed = open_study(name, storage_url, space, space_digest(space, base), lineage.digest)
    done_before = len(_finished(study))
    to_run = max(0, trials - done_before)

    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    # The storage URL may hold a password (postgresql://user:pw@host/db): masked wherever it is shown.
    shown_storage = tracking.mask_secrets(storage_url)
    tags = {"optuna.study": name, "optuna.storage": shown_storage, tracking.TAG_DATA_DIGEST: lineage.digest}
    if parent_id and mlflow.active_run() is None and not os.environ.get("MLFLOW_RUN_ID") and _run_exists(parent_id):
        run_ctx: Any = mlflow.start_run(run_id=parent_id)
    else:
        run_ctx = tracking.stage_run("tune", run_name=name, tags=tags, experiment=experiment)
    with run_ctx as parent:
        parent_id = parent.info.run_id
        mlflow.set_tags(tags)
        study.set_user_attr("mlflow_parent_run_id", parent_id)
        _log_params_once(parent_id, tracking.mask_mapping({
            "tune.space": space.path, "tune.study": name, "tune.storage": shown_storage, "tune.data": data,
            "tune.params": ", ".join(space.names), **{f"tune.base.{k}": v for k, v in flatten(dict(base)).items()}}))
        mlflow.log_param(f"tune.trials.{done_before}", trials)  # one per invocation: the trials asked for
        from tqdm.auto import tqdm

        with tqdm(total=to_run, desc="tune", unit="trial", disable=not progress or to_run == 0,
                  dynamic_ncols=True) as bar:
            runner = _Study(space, base, data, out_root, model_name, parent_id, parent.info.experiment_id, bar)
            try:
                if to_run:
                    study.optimize(runner.objective, n_trials=to_run, n_jobs=jobs, timeout=timeout,
                                   catch=TRIAL_FAILURES, callbacks=[runner.after_trial])
            except BaseException as exc:
                if interrupted(exc):
                    mlflow.set_tag("tune.state", "INTERRUPTED")
                    mlflow.end_run("KILLED")
                raise
        outcome = _summarise(study, name, shown_storage, parent_id, len(_finished(study)) - done_before, resumed)
        _log_summary(study, outcome)
        if register and outcome.best_trial is not None:
            outcome.model_uri, outcome.version = register_best(study, space, base, data, runner, parent_id)
    return outcome


def _run_exists(run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - a deleted run or another tracking server: start a new parent
        return False


def _log_params_once(run_id: str, params: Mapping[str, Any]) -> None:
    """Log params the run does not hold yet (a resumed parent already has them)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    existing = MlflowClient().get_run(run_id).data.params
    fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def _summarise(study: Any, name: str, storage: str, parent_id: str, ran: int, resumed: bool) -> TuneOutcome:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    outcome = TuneOutcome(study_name=name, storage=storage, parent_run_id=parent_id, ran=ran,
                          complete=states.count(TrialState.COMPLETE), pruned=states.count(TrialState.PRUNED),
                          failed=states.count(TrialState.FAIL), resumed=resumed)
    if outcome.complete:
        best = study.best_trial
        outcome.best_trial, outcome.best_value, outcome.best_params = best.number, float(best.value), dict(best.params)
    return outcome


def _history_points(study: Any) -> list[tuple[int, float, str]]:
    points = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name
        if state == "COMPLETE":
            points.append((t.number, float(t.value), state))
        elif t.intermediate_values:
            points.append((t.number, float(t.intermediate_values[max(t.intermediate_values)]), state))
    return points


def _log_summary(study: Any, outcome: TuneOutcome) -> None:
    """Metrics, the trials table and the two PNGs on the parent run."""
    import mlflow
    import optuna

    from lifecycle.optimize.plots import plot_history, plot_importances

    metrics = {"tune/trials_complete": outcome.complete, "tune/trials_pruned": outcome.pruned,
               "tune/trials_failed": outcome.failed}
    mlflow.set_tag("tune.state", "FINISHED")
    if outcome.best_value is not None:
        metrics["tune/best_val_loss"] = outcome.best_value
        mlflow.set_tag("tune.best_trial", str(outcome.best_trial))
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    rows = [{"trial": t.number, "state": t.state.name, "value": t.value,
             **{f"param.{k}": v for k, v in t.params.items()},
             "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""),
             "pruned_at_step": (t.user_attrs.get("pruned_at") or {}).get("step")}
            for t in study.get_trials(deepcopy=False)]
    with tempfile.TemporaryDirectory(prefix="lifecycle-tune-") as tmp:
        if rows:
            mlflow.log_table(data={k: [r.get(k) for r in rows] for k in rows[0]}, artifact_file="tune/trials.json")
        png = plot_history(_history_points(study), Path(tmp) / "optimization_history.png",
                           title=f"study {outcome.study_name}: {outcome.complete} complete, {outcome.pruned} pruned")
        mlflow.log_artifact(str(png), artifact_path="plots")
        try:
            # fANOVA (a random forest over the trials; scikit-learn comes with mlflow): optuna's
            # default PED-ANOVA needs many trials and reports equal shares for a small study.
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except (ValueError, RuntimeError, ImportError) as exc:
            # fANOVA needs at least two complete trials that differ in some parameter.
            log.info("no parameter importance: %s", exc)
            mlflow.set_tag("tune.importance", f"not computed: {str(exc).splitlines()[0][:200]}")
        else:
            if importances:
                png = plot_importances(importances, Path(tmp) / "param_importances.png",
                                       title=f"study {outcome.study_name}: importance on {OBJECTIVE}")
                mlflow.log_artifact(str(png), artifact_path="plots")
                mlflow.log_metrics({f"tune/importance.{k}": float(v) for k, v in importances.items()})


def register_best(study: Any, space: Space, base: Mapping[str, Any], data: str, runner: _Study,
                  parent_id: str) -> tuple[str | None, str | None]:
    """Register the best trial's weights from its checkpoint, in its own child run (once per trial)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.train.checkpoint import CheckpointManager
    from lifecycle.train.finetune import finalize_model, load_starting_point
    from lifecycle.train.model import save_model_dir
    from lifecycle.train.run import register, resolve_data

    best = study.best_trial
    done = study.user_attrs.get("registered", {})
    if str(best.number) in done:
        log.info("trial %d is already registered as %s", best.number, done[str(best.number)])
        uri = done[str(best.number)]
        return uri, uri.rsplit("/", 1)[-1]
    cfg = trial_config(base, best.params, runner.controlled(best.number))
    latest = CheckpointManager(cfg.output).latest()
    if latest is None:
        raise DataError(f"the best trial's checkpoint is gone ({cfg.output}); it cannot be registered. "
                        "Keep --output between runs of a study")
    ck = CheckpointManager.load(latest)
    prepared, lineage = resolve_data(data)
    start = load_starting_point(cfg, prepared.tokenizer, prepared.block_size)
    start.model.load_state_dict(ck["best"] if ck["best"] is not None else ck["model"])
    child_id = best.user_attrs["mlflow_run_id"]
    with tempfile.TemporaryDirectory(prefix="lifecycle-tune-best-") as tmp:
        model = finalize_model(start.model, cfg.lora, None)
        model_dir = save_model_dir(model.to("cpu"), start.tokenizer, Path(tmp) / "model")
        with mlflow.start_run(run_id=child_id, nested=True):
            uri, version = register(model_dir, cfg, child_id, lineage, start.base_model, float(best.value))
            mlflow.set_tag("registered_model_version", uri)
    client = MlflowClient()
    tags = {"tune_study": study.study_name, "tune_trial": str(best.number), "tune_parent_run_id": parent_id,
            "tune/objective": f"{OBJECTIVE}={float(best.value)!r}",
            **{f"tune/{k}": str(v) for k, v in best.params.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    mlflow.set_tag("best_model_version", uri)
    study.set_user_attr("registered", {**done, str(best.number): uri})
    return uri, version
