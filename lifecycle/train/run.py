"""The training stage as one MLflow run: data in, a registered model version out.

Orchestration only: resolve the data, pick the starting model, run :class:`~lifecycle.train.loop.
Trainer` with an asynchronous metric sink, then (rank 0) log the model through
:func:`lifecycle.serving.log_model`, register it and tag the version with its lineage. Under
torchrun every rank trains; only rank 0 talks to MLflow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lifecycle import tracking
from lifecycle.config import flatten, to_dict
from lifecycle.errors import ConfigError, DataError, NotFoundError, OutputExistsError
from lifecycle.train.checkpoint import STATE_FILE, CheckpointManager
from lifecycle.train.config import DEFAULT_CHECKPOINT_ROOT, RESUME_MUTABLE_KEYS, TrainConfig
from lifecycle.train.data import PreparedData, load_prepared
from lifecycle.train.lock import OutputLock

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What ``lifecycle train`` reports (rank 0; other ranks get ``run_id=None``)."""

    run_id: str | None
    model_uri: str | None
    version: str | None
    steps: int
    best_val_loss: float
    best_step: int
    stopped_early: bool
    resumed_from: int | None
    checkpoint_dir: str | None = None


@dataclass
class DataLineage:
    """Where the training data came from."""

    path: Path
    uri: str
    digest: str
    run_id: str


def _run_id_of_uri(uri: str) -> str:
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/", 1)[0]
    return ""


def _find_prepare_run(digest: str) -> str:
    """The prepare run that produced ``digest`` (best effort; '' when none is found)."""
    if not digest:
        return ""
    import mlflow

    try:
        runs = mlflow.search_runs(search_all_experiments=True, max_results=1, output_format="list",
                                  filter_string=f"tags.{tracking.TAG_DATA_DIGEST} = '{digest}' and "
                                                f"tags.`{tracking.TAG_STAGE}` = 'prepare'",
                                  order_by=["attributes.start_time DESC"])
    except Exception as exc:  # noqa: BLE001 - lineage is a nicety; never fail training over it
        log.debug("search for the prepare run failed: %s", exc)
        return ""
    return runs[0].info.run_id if runs else ""


def resolve_data(uri: str, *, search_runs: bool = True) -> tuple[PreparedData, DataLineage]:
    """Load prepared data from a folder or a ``runs:/`` URI, with its lineage."""
    path = tracking.resolve_artifact(uri, what="prepared data")
    data = load_prepared(path)
    run_id = _run_id_of_uri(uri) or str(data.card.get("run_id", "") or "")
    if not run_id and search_runs:
        run_id = _find_prepare_run(data.digest)
    return data, DataLineage(path=Path(path), uri=uri, digest=data.digest, run_id=run_id)


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    """Refuse to resume with a config that would change the numbers (max_steps may grow)."""
    now, before = flatten(to_dict(cfg)), flatten(saved)
    # An unset learning_rate (--preset auto) is resolved later by the same pure rule as before.
    changed = sorted(k for k in set(now) | set(before)
                     if k.split(".")[0] not in RESUME_MUTABLE_KEYS and now.get(k) != before.get(k)
                     and not (k == "learning_rate" and now.get(k) == ""))
    if changed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"--resume with a different config ({diffs}); resume with the original settings, "
                          "or start over with --overwrite")


#: What a run folder under ``checkpoints/`` may be called: an MLflow run id (letters, digits, - and _).
_RUN_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def run_folder(root: str | Path, run_id: str) -> Path:
    """``root/<run_id>``; a run id that is not a plain folder name is refused (never re-read as a path)."""
    if not isinstance(run_id, str) or not _RUN_FOLDER.fullmatch(run_id):
        raise ConfigError(f"--resume-run: {run_id!r} is not a run id (letters, digits, '-' and '_', as MLflow "
                          f"prints them; the folders under {root}/ are named by run id)")
    return Path(root) / run_id


def latest_run_folder(root: str | Path) -> Path | None:
    """The run folder under ``root`` whose newest complete checkpoint was written last."""
    best: tuple[float, Path] | None = None
    base = Path(root)
    if not base.is_dir():
        return None
    for folder in base.iterdir():
        if not (folder.is_dir() and _RUN_FOLDER.fullmatch(folder.name)):
            continue
        latest = CheckpointManager(folder).latest()
        if latest is None:
            continue
        try:
            written = (latest / STATE_FILE).stat().st_mtime
        except OSError:
            continue
        if best is None or written > best[0]:
            best = (written, folder)
    return best[1] if best else None


def checkpoint_folder(cfg: TrainConfig, *, resume: bool, resume_run: str | None) -> Path | None:
    """Where this run's checkpoints live; None for a new default run (``checkpoints/<run_id>/`` once it exists).

    An explicit ``output`` is used as it is. Without one every run has its own folder under
    ``checkpoints/``: ``--resume`` continues the run that saved last, ``--resume-run ID`` a given one.
    """
    if resume_run is not None:
        if cfg.output is not None:
            raise ConfigError("--resume-run picks a run folder under checkpoints/; with --output, use --resume "
                              "(it continues the checkpoints in --output)")
        folder = run_folder(DEFAULT_CHECKPOINT_ROOT, resume_run)
        if CheckpointManager(folder).latest() is None:
            known = sorted(p.name for p in Path(DEFAULT_CHECKPOINT_ROOT).glob("*") if CheckpointManager(p).latest())
            raise NotFoundError(f"--resume-run {resume_run}: no checkpoint in {folder}"
                                + (f" (runs with checkpoints: {', '.join(known[:10])})" if known else ""))
        return folder
    if cfg.output is not None:
        return Path(cfg.output)
    if resume:
        folder = latest_run_folder(DEFAULT_CHECKPOINT_ROOT)
        if folder is None:
            log.warning("--resume: no checkpoint under %s/, starting a new run", DEFAULT_CHECKPOINT_ROOT)
        return folder
    return None


def _start_run(cfg: TrainConfig, run_id: str | None, tags: dict[str, str]) -> tuple[Any, bool]:
    """Open the MLflow run (a new one, the resumed one, or the one `mlflow run` made)."""
    import mlflow

    system = cfg.system_metrics and importlib.util.find_spec("psutil") is not None
    tags = tracking.mask_mapping(tags)  # base model and data URIs may carry user:password@
    if run_id is None and mlflow.active_run() is not None:
        mlflow.set_tags(tags)
        return mlflow.active_run(), False
    experiment_id = None
    if run_id is None and cfg.experiment and not os.environ.get("MLFLOW_RUN_ID"):
        experiment_id = tracking.get_or_create_experiment(cfg.experiment)
    try:
        run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, tags=None if run_id else tags,
                               log_system_metrics=system)
    except Exception as exc:  # noqa: BLE001
        raise tracking.translate_mlflow_error(exc, "cannot start the training run") from None
    if run_id:
        mlflow.set_tags(tags)
    return run, True


def register(model_dir: Path, cfg: TrainConfig, run_id: str, lineage: DataLineage, base_model: str,
             best_val: float, chosen: Any = None) -> tuple[str, str]:
    """Log the model as the project's pyfunc model and register a version with lineage tags.

    ``chosen`` (checkpoint, rule): package into that checkpoint's logged model, tagged with the rule.
    """
    from mlflow.tracking import MlflowClient

    from lifecycle.serving import log_model
    from lifecycle.train.logged_models import registration_args

    lineage_tags = tracking.mask_mapping({
        tracking.TAG_DATA_DIGEST: lineage.digest,
        tracking.TAG_DATA_RUN: lineage.run_id,
        tracking.TAG_TRAIN_RUN: run_id,
        tracking.TAG_BASE_MODEL: base_model or f"scratch:{cfg.preset}",
    })
    extra = registration_args(chosen)
    tags = {**lineage_tags, **extra.pop("tags", {})}
    info = log_model(model_dir, name="model", registered_model_name=cfg.model_name, tags=tags, **extra)
    version = str(info.registered_model_version)
    client = MlflowClient()  # log_model already put the tags on the version
    if extra:
        client.set_logged_model_tags(extra["model_id"], tags)  # a checkpoint's model was made without them
    origin = (f"fine-tuned from {tracking.mask_secrets(base_model)}" if base_model
              else f"trained from scratch ({cfg.preset} preset)")
    data_from = f"data run {lineage.run_id}" if lineage.run_id else f"data {tracking.mask_secrets(lineage.uri)}"
    client.update_model_version(
        cfg.model_name, version,
        description=(f"Causal LM {origin} by training run {run_id} on {data_from} (digest {lineage.digest[:16]}); "
                     f"{f'{cfg.max_steps} steps' if cfg.time_budget is None else 'time budget ' + cfg.time_budget}"
                     f", best val/loss {best_val:.4f}."))
    return f"models:/{cfg.model_name}/{version}", version


def train(cfg: TrainConfig, data_uri: str, *, resume: bool = False, overwrite: bool = False,
          callbacks: Sequence[Callable[[Mapping[str, float], int], None]] = (),
          resume_run: str | None = None) -> TrainOutcome:
    """Train (or resume) under ``cfg`` on ``data_uri``; register the result as ``cfg.model_name``.

    Checkpoints go to ``cfg.output`` when it is set, else to ``checkpoints/<run_id>/``; ``resume``
    continues the latest checkpoint there (without ``output``: of the run that saved last), and
    ``resume_run`` the run folder ``checkpoints/<resume_run>/``. One trainer at a time may write a
    folder: a second one is refused with :class:`~lifecycle.errors.ConcurrencyError`.

    ``callbacks`` see every metric the loop reports, ``(metrics, step)``, right after MLflow's
    sink (rank 0); one that raises stops training and the exception propagates (the
    hyperparameter search raises ``optuna.TrialPruned`` from here on the validation loss).
    """
    from lifecycle.train import distributed

    ctx = distributed.setup(cfg.device)
    try:
        with contextlib.ExitStack() as stack:
            return _train(cfg, data_uri, ctx, stack, resume=resume or resume_run is not None,
                          resume_run=resume_run, overwrite=overwrite, callbacks=callbacks)
    finally:
        ctx.close()


def _chain(sink: Any, callbacks: Sequence[Callable[[Mapping[str, float], int], None]]) -> Any:
    """The loop's ``log``: the MLflow sink first (so a stopping callback's metric is kept), then the callbacks."""
    if not callbacks:
        return sink

    def log(metrics: Mapping[str, float], step: int) -> None:
        if sink is not None:
            sink(metrics, step)
        for callback in callbacks:
            callback(metrics, step)

    return log


def _train(cfg: TrainConfig, data_uri: str, ctx: Any, stack: contextlib.ExitStack, *, resume: bool,
           resume_run: str | None, overwrite: bool,
           callbacks: Sequence[Callable[[Mapping[str, float], int], None]] = ()) -> TrainOutcome:
    # The prepare run is looked up (an MLflow query, which creates the tracking database) only once
    # every refusal below has had its say: a refused run leaves nothing behind.
    data, lineage = resolve_data(data_uri, search_runs=False)
    folder: Path | None = None
    if ctx.is_main:
        folder = checkpoint_folder(cfg, resume=resume, resume_run=resume_run)
    folder = ctx.broadcast_object(folder)
    lock: OutputLock | None = None
    if folder is not None and ctx.is_main:
        # Before looking at the folder: a second trainer must not clear or resume the first's checkpoints.
        lock = stack.enter_context(OutputLock(folder))
    ctx.barrier()
    latest: Path | None = None
    resume_ck: dict[str, Any] | None = None
    resume_state: dict[str, Any] | None = None
    if folder is not None:
        ckpts = CheckpointManager(folder, keep=cfg.keep_checkpoints)
        latest = ckpts.latest()
    if latest is not None and not resume:
        if not overwrite:
            raise OutputExistsError(f"{folder} already holds checkpoints (latest {latest.name}); continue that "
                                    "run with --resume, or start over with --overwrite")
        if ctx.is_main:
            ckpts.clear()
        ctx.barrier()
        latest = None
    if resume and latest is not None:
        found = ckpts.load_latest()  # skips (and names) a damaged newest checkpoint
        if found is None:
            raise DataError(f"--resume: every checkpoint in {folder} is damaged (see the warnings); start over "
                            "with --overwrite")
        latest, resume_ck = found
        resume_state = resume_ck["state"]
        check_resume_config(cfg, resume_state.get("config", {}))
        if resume_state.get("data_digest") and resume_state["data_digest"] != lineage.digest:
            raise DataError(f"--resume with different data: the checkpoint was trained on digest "
                            f"{resume_state['data_digest'][:16]}, {data_uri} has {lineage.digest[:16]}")
        if int(resume_state.get("world_size", 1)) != ctx.world_size:
            raise ConfigError(f"the checkpoint was written by {resume_state.get('world_size')} processes; "
                              f"resume with the same --nproc_per_node (now {ctx.world_size})")
    elif resume and folder is not None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", folder)

    from lifecycle.train.finetune import finalize_model, load_starting_point

    start = load_starting_point(cfg, data.tokenizer, data.block_size, train_tokens=int(data.train.numel()),
                                world_size=ctx.world_size, resumed=resume_state.get("config") if resume_state else None)
    probe = None
    if cfg.time_budget is not None:
        # Timed before any run or checkpoint exists: a budget too small for one step changes nothing.
        # Under torchrun rank 0 times it and every rank judges the same figures, so every rank
        # refuses (or plans) alike; the trainer's planner starts from them too.
        from lifecycle.train.budget import probe_step, start_planner, too_small

        device = ctx.device or _cpu()
        probe = ctx.broadcast_object(probe_step(cfg, start.model, data, device) if ctx.is_main else None)
        # A resume is judged by what is left of the budget: an exhausted one is refused the same way.
        step = int(resume_state["step"]) if resume_state else 0
        used = float(resume_state.get("time_used_s", 0.0)) if resume_state else 0.0
        refused = too_small(start_planner(cfg, start.model, data, device, probe), cfg.time_budget, step, used)
        if refused is not None:
            raise refused
    if ctx.is_main and not lineage.run_id:
        lineage.run_id = _find_prepare_run(lineage.digest)
    if (data.sft and getattr(data.tokenizer, "chat_template", None)
            and not getattr(start.tokenizer, "chat_template", None)):
        # The examples were rendered with the data's chat template: the model must carry it, so
        # serving renders chat requests the same way.
        start.tokenizer.chat_template = data.tokenizer.chat_template
    run_id = resume_state.get("run_id") if resume_state else None
    mlrun, own_run, logger, sink, ckpt_models = None, False, None, None, None
    if ctx.is_main:
        tags = {tracking.TAG_STAGE: "train", tracking.TAG_CODE_VERSION: tracking.code_version(),
                tracking.TAG_DATA_DIGEST: lineage.digest, tracking.TAG_DATA_RUN: lineage.run_id,
                tracking.TAG_BASE_MODEL: start.base_model or f"scratch:{cfg.preset}", "data_uri": lineage.uri,
                "data_format": "sft" if data.sft else "lm"}
        if resume_state:
            tags["resumed_from_step"] = str(resume_state["step"])
        mlrun, own_run = _start_run(cfg, run_id, tags)
        run_id = mlrun.info.run_id
    run_id = ctx.broadcast_object(run_id)
    if folder is None:
        folder = run_folder(DEFAULT_CHECKPOINT_ROOT, run_id)
        if ctx.is_main:
            try:
                lock = stack.enter_context(OutputLock(folder, run_id=run_id))
            except BaseException as exc:
                _fail_run(exc, None, own_run)
                raise
        ctx.barrier()
        ckpts = CheckpointManager(folder, keep=cfg.keep_checkpoints)
    elif lock is not None:
        lock.update(run_id=run_id)
    try:
        if ctx.is_main:
            import mlflow
            from mlflow.tracking import MlflowClient

            from lifecycle.train.callbacks import MetricSink, last_logged_steps, replay

            n_params = sum(p.numel() for p in start.model.parameters())
            n_train = sum(p.numel() for p in start.model.parameters() if p.requires_grad)
            if resume_state is None:
                params = {**flatten(cfg), "data.block_size": data.block_size, "data.train_blocks": len(data.train),
                          "data.validation_blocks": len(data.validation), "world_size": ctx.world_size,
                          "global_batch": cfg.batch_size * cfg.grad_accum * ctx.world_size,
                          "model.parameters": n_params, "model.trainable_parameters": n_train,
                          **start.shape_params}
                # `mlflow run` already logged the MLproject parameters, empty ones as ''; MLflow
                # refuses to change a param, so a resolved value that differs goes under resolved.*
                existing = MlflowClient().get_run(run_id).data.params
                mlflow.log_params({(k if existing.get(k, v) == v else f"resolved.{k}"): v
                                   for k, v in tracking.mask_mapping(params).items()})
                from lifecycle.lineage import CONTEXT_TRAINING, log_data_input

                log_data_input(lineage.uri, lineage.digest, context=CONTEXT_TRAINING)
            mlflow.set_tag("checkpoint_dir", str(folder))
            logger = tracking.AsyncMetricLogger(run_id)
            already = last_logged_steps(MlflowClient(), run_id) if resume_state else {}
            if resume_state:
                replay(logger, resume_state.get("history", {}), already)
            sink = MetricSink(logger, already)
            if cfg.log_checkpoints and cfg.log_model:  # log_model=false (tune's trials): no models at all
                from lifecycle.train.logged_models import CheckpointModels

                sink = ckpt_models = CheckpointModels(sink, run_id=run_id, model=start.model, tokenizer=start.tokenizer,
                                                      tags={tracking.TAG_DATA_DIGEST: lineage.digest},
                                                      resumed=bool(resume_state))

        from lifecycle.train.loop import Trainer

        trainer = Trainer(cfg, start.model, data, ctx=ctx, log=_chain(sink, callbacks if ctx.is_main else ()),
                          checkpoints=ckpts, resume_from=resume_ck, probe=probe,
                          extra_state={"run_id": run_id, "data_digest": lineage.digest, "data_run_id": lineage.run_id,
                                       "base_model": start.base_model})
        result = trainer.fit()
        ctx.barrier()
        if not ctx.is_main:
            return TrainOutcome(None, None, None, result.steps, result.best_val_loss, result.best_step,
                                result.stopped_early, resume_state["step"] if resume_state else None)
        ctx.close()  # rank 0 alone from here: model logging must not hold the process group open
        if ckpt_models is not None:
            ckpt_models.close()  # its metrics go through the logger: first
        logger.close()
        logger = None
        outcome = _finish(cfg, run_id, result, start, lineage, finalize_model, ckpt_models)
        outcome.resumed_from = resume_state["step"] if resume_state else None
        outcome.checkpoint_dir = str(folder)
        if own_run:
            import mlflow

            mlflow.end_run("FINISHED")
        return outcome
    except BaseException as exc:
        if ctx.is_main:
            _fail_run(exc, logger, own_run, ckpt_models)
        raise


def _finish(cfg: TrainConfig, run_id: str, result: Any, start: Any, lineage: DataLineage,
            finalize_model: Any, checkpoints: Any = None) -> TrainOutcome:
    """Rank 0 after the loop: summary metrics, curves PNG, model folder, registration."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.train.model import save_model_dir
    from lifecycle.train.plots import plot_curves

    client = MlflowClient()
    summary = {"train/steps": float(result.steps)}
    if math.isfinite(result.best_val_loss):
        summary.update({"val/best_loss": result.best_val_loss, "val/best_step": float(result.best_step)})
    mlflow.log_metrics(summary, step=result.steps)
    # The plot reads MLflow's history so a resumed run's PNG shows the whole run.
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
               for key in ("train/loss", "val/loss", "train/lr")}
    with tempfile.TemporaryDirectory(prefix="lifecycle-train-") as tmp:
        png = plot_curves(history, Path(tmp) / "training_curves.png", title=f"run {run_id[:8]}")
        mlflow.log_artifact(str(png), artifact_path="plots")
        model = finalize_model(result.model, cfg.lora, Path(tmp) / "lora_adapter")
        if (Path(tmp) / "lora_adapter").is_dir():
            mlflow.log_artifacts(str(Path(tmp) / "lora_adapter"), artifact_path="lora_adapter")
        model_uri, version = None, None
        if cfg.log_model:
            chosen = checkpoints.choose(cfg.register_checkpoint, result.best_step) if checkpoints else None
            held = result.best_step if result.best_step >= 0 else result.steps  # the weights the loop ended with
            if chosen is not None and chosen[0].step != held:
                from lifecycle.train.logged_models import download_weights

                model_dir = download_weights(chosen[0].model_id, Path(tmp) / "chosen")
            else:
                model_dir = save_model_dir(model.to("cpu"), start.tokenizer, Path(tmp) / "model")
            model_uri, version = register(model_dir, cfg, run_id, lineage, start.base_model, result.best_val_loss,
                                          chosen)
            mlflow.set_tag("registered_model_version", model_uri)
    return TrainOutcome(run_id=run_id, model_uri=model_uri, version=version, steps=result.steps,
                        best_val_loss=result.best_val_loss, best_step=result.best_step,
                        stopped_early=result.stopped_early, resumed_from=None)


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


def _fail_run(exc: BaseException, logger: Any, own_run: bool, ckpt_models: Any = None) -> None:
    """Deliver queued checkpoint models and metrics, then end the run KILLED (signal) or FAILED (anything else)."""
    import mlflow

    from lifecycle.train.loop import TrainingInterrupted

    try:
        if ckpt_models is not None:
            ckpt_models.close()
    except Exception as close_exc:  # noqa: BLE001 - the original error matters more
        log.error("checkpoint models could not be delivered: %s", close_exc)
    try:
        if logger is not None:
            logger.close()
    except Exception as close_exc:  # noqa: BLE001 - the original error matters more
        log.error("metrics could not be delivered: %s", close_exc)
    if own_run and mlflow.active_run() is not None:
        mlflow.end_run("KILLED" if isinstance(exc, (TrainingInterrupted, KeyboardInterrupt)) else "FAILED")
