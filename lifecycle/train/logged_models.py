"""Every evaluated checkpoint as an MLflow 3 logged model of the training run, with its validation metrics.

At each evaluation (``eval_every`` and the last step) the weights the loop holds are written as a
Hugging Face folder and uploaded to a new logged model of the run (``mlflow.initialize_logged_model``,
then ``log_model_artifacts`` under ``artifacts/model``, then ``READY``): the same place the
project's pyfunc model keeps its weights, and nothing more. No code copy, requirements or signature:
a checkpoint that is never registered stays cheap, yet it can be loaded (``resolve_model_dir``
finds the folder) and packaged and registered later (:func:`register_checkpoint`). The step's
validation metrics go to MLflow once, with the model's id (``Metric(model_id=...)``), so they are the
run's metrics and the model's both, and ``mlflow.search_logged_models(order_by=[{"field_name":
"metrics.val/loss", "ascending": True}])`` ranks the checkpoints.

The registered version is the pyfunc packaging of one of them, logged into that same logged model
(``log_model(model_id=...)``): the best checkpoint (lowest ``val/loss``) or the last one
(``register_checkpoint: best|last``), named on the version by the tags below.
"""

from __future__ import annotations

import copy
import logging
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

#: Logged-model (and version) tags.
TAG_KIND = "lifecycle.kind"
TAG_STEP = "lifecycle.checkpoint_step"
#: On the registered version and its logged model: ``best`` or ``last``, the rule that chose it.
TAG_REGISTERED = "lifecycle.registered_checkpoint"
KIND_CHECKPOINT = "checkpoint"
#: Where the Hugging Face folder lives inside a logged model (where the pyfunc packaging puts it too).
WEIGHTS_PATH = "artifacts/model"
#: The metric that marks an evaluation.
VAL_LOSS = "val/loss"


@dataclass(frozen=True)
class Checkpoint:
    """One logged checkpoint: its logged model id, step and validation loss."""

    model_id: str
    step: int
    val_loss: float


def run_checkpoints(client: Any, run_id: str) -> dict[int, Any]:
    """The checkpoint logged models of ``run_id`` by step (a resumed run finds those it already logged)."""
    from lifecycle.tracking import filter_literal

    run = client.get_run(run_id)
    found: dict[int, Any] = {}
    token = None
    while True:
        page = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = {filter_literal(run_id)}", max_results=100, page_token=token)
        for model in page:
            tags = model.tags or {}
            if tags.get(TAG_KIND) == KIND_CHECKPOINT and str(tags.get(TAG_STEP, "")).isdigit():
                found[int(tags[TAG_STEP])] = model
        token = page.token
        if not token:
            return found


def snapshot(model: Any) -> Any:
    """The model's weights as they are now, on the host: a CPU state dict, or for LoRA a merged CPU copy
    (every later stage loads plain weights). The loop goes on changing the originals."""
    from lifecycle.train.finetune import is_lora

    if is_lora(model):
        return copy.deepcopy(model).to("cpu").merge_and_unload()
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_weights(model: Any, weights: Any, tokenizer: Any, out: Path) -> Path:
    """A :func:`snapshot` of ``model`` as a Hugging Face folder (``model`` gives only its config)."""
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(weights, dict):
        model.save_pretrained(out, state_dict=weights, safe_serialization=True)
    else:
        weights.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


class CheckpointModels:
    """The loop's metric sink, wrapped: an evaluation's metrics go out linked to a new checkpoint model.

    At an evaluation the weights are copied to the host on the loop's thread; one writer thread
    creates the logged model, uploads the folder and then queues the metrics with its id to
    ``sink(metrics, step, model_id=...)`` (:class:`~lifecycle.train.callbacks.MetricSink`). So the
    loop never waits on the tracking server: an outage is retried with backoff, as metrics are, and
    at most one snapshot waits behind the one being uploaded (the next evaluation waits for it).
    :meth:`close` waits (bounded) for what is in flight and raises
    :class:`~lifecycle.errors.TrackingUnavailableError` if a checkpoint could not be delivered; its
    metrics still go out, unlinked, rather than being lost. Steps a resumed run already logged find
    their model by tag instead of making a second one; a model left ``PENDING`` by a killed run gets
    its weights again.
    """

    def __init__(self, sink: Callable[..., None], *, run_id: str, model: Any, tokenizer: Any,
                 tags: Mapping[str, str] | None = None, resumed: bool = False, max_wait_on_close: float = 120.0):
        from mlflow.tracking import MlflowClient

        self._sink = sink
        self._client = MlflowClient()
        self.run_id = run_id
        self._model = model
        self._tokenizer = tokenizer
        self._tags = dict(tags or {})
        self._max_wait = max_wait_on_close
        self._deadline: float | None = None
        self._error: Exception | None = None
        self.models: dict[int, Checkpoint] = {}
        self._ids: dict[int, str] = {}
        self._known = run_checkpoints(self._client, run_id) if resumed else {}
        for step, found in self._known.items():
            self._ids[step] = found.model_id  # made by this run before it was killed: reused, never doubled
            loss = (found.metrics and next((m.value for m in found.metrics if m.key == VAL_LOSS), None))
            if loss is not None and str(found.status).endswith("READY"):
                self.models[step] = Checkpoint(found.model_id, step, float(loss))
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._work, name="lifecycle-checkpoint-models", daemon=True)
        self._thread.start()

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        """Forward ``metrics``; an evaluation's go out once its checkpoint model exists, linked to it."""
        if VAL_LOSS not in metrics:
            self._sink(metrics, step)
            return
        ready = self.models.get(step)
        if ready is not None:
            self._sink(metrics, step, model_id=ready.model_id)
            return
        self._queue.put((step, dict(metrics), snapshot(self._model)))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            step, metrics, weights = item
            model_id, delay = None, 1.0
            while model_id is None:
                try:
                    model_id = self._log(step, weights)
                except Exception as exc:  # noqa: BLE001 - retried like metrics; surfaced by close()
                    if self._deadline is not None and time.monotonic() > self._deadline:
                        self._error = exc
                        break
                    log.warning("checkpoint model for step %d not logged yet (%s); retrying", step, exc)
                    time.sleep(delay)
                    delay = min(30.0, delay * 2)
            if model_id is not None:
                self.models[step] = Checkpoint(model_id, step, float(metrics[VAL_LOSS]))
            self._sink(metrics, step, model_id=model_id)

    def _log(self, step: int, weights: Any) -> str:
        from mlflow.entities import LoggedModelStatus

        if step not in self._ids:
            self._ids[step] = self._client.create_logged_model(
                experiment_id=self._client.get_run(self.run_id).info.experiment_id, name=f"checkpoint-{step}",
                source_run_id=self.run_id, model_type=KIND_CHECKPOINT,
                tags={**self._tags, TAG_KIND: KIND_CHECKPOINT, TAG_STEP: str(step)}).model_id
        model_id = self._ids[step]
        with tempfile.TemporaryDirectory(prefix="lifecycle-checkpoint-") as tmp:
            folder = save_weights(self._model, weights, self._tokenizer, Path(tmp) / "model")
            self._client.log_model_artifacts(model_id, str(folder), artifact_path=WEIGHTS_PATH)
        self._client.finalize_logged_model(model_id, LoggedModelStatus.READY)
        return model_id

    def close(self) -> None:
        """Deliver the checkpoints in flight (waiting at most ``max_wait_on_close`` for the server)."""
        if self._thread.is_alive():
            self._deadline = time.monotonic() + self._max_wait
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            from lifecycle.errors import TrackingUnavailableError

            raise TrackingUnavailableError(f"checkpoint models could not be logged: {self._error}")

    def choose(self, rule: str, best_step: int) -> tuple[Checkpoint, str] | None:
        """The checkpoint to register under ``rule``, and the rule; None when no evaluation was logged.

        ``best`` is the loop's best step (the weights it restores, early stopping's ``min_delta``
        included), ``last`` the newest evaluated step.
        """
        if not self.models:
            return None
        if rule == "last":
            return self.models[max(self.models)], "last"
        if best_step in self.models:
            return self.models[best_step], "best"
        return min(self.models.values(), key=lambda c: (c.val_loss, c.step)), "best"


def download_weights(model_id: str, dest: Path) -> Path:
    """A checkpoint model's Hugging Face folder, downloaded to ``dest``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.tracking import find_hf_model_dir

    # models:/<model_id>/<path> is read as a registered name and stage; the artifact location is not.
    root = MlflowClient().get_logged_model(model_id).artifact_location.rstrip("/")
    path = mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{WEIGHTS_PATH}", dst_path=str(dest))
    return find_hf_model_dir(Path(path))


def register_checkpoint(model_id: str, name: str, *, rule: str = "chosen by hand",
                        tags: Mapping[str, str] | None = None) -> Any:
    """Package checkpoint ``model_id`` as the project's pyfunc model (into the same logged model) and
    register it as a new version of ``name``; the ModelInfo. For a checkpoint training did not register."""
    from mlflow.tracking import MlflowClient

    from lifecycle.serving import log_model

    found = MlflowClient().get_logged_model(model_id)
    step = int(found.tags.get(TAG_STEP, "0"))
    with tempfile.TemporaryDirectory(prefix="lifecycle-register-") as tmp:
        folder = download_weights(model_id, Path(tmp))
        info = log_model(folder, name="model", registered_model_name=name, model_id=model_id, step=step,
                         tags={**dict(tags or {}), TAG_REGISTERED: rule, TAG_STEP: str(step)})
    MlflowClient().set_logged_model_tags(model_id, {TAG_REGISTERED: rule})
    return info


def registration_args(chosen: tuple[Checkpoint, str] | None) -> dict[str, Any]:
    """``log_model`` arguments that package the chosen checkpoint's own logged model (none: a new one)."""
    if chosen is None:
        return {}
    ckpt, rule = chosen
    return {"model_id": ckpt.model_id, "step": ckpt.step,
            "tags": {TAG_REGISTERED: rule, TAG_STEP: str(ckpt.step)}}
