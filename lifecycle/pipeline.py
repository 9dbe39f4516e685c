"""The whole lifecycle as one command: prepare -> train -> evaluate -> staging -> production.

One parent MLflow run with a child run per step. A step whose inputs (data digest or source
fingerprint, resolved config, code version) match an earlier successful step is reused instead of
rerun: MLflow's ``multistep_workflow`` example keys its cache on parameters alone and so misses
code changes; ours puts the code version into the key. ``--force`` reruns everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import mlflow
from mlflow.tracking import MlflowClient

from lifecycle.config import config_digest, flatten, to_dict
from lifecycle.data.card import read_card
from lifecycle.data.config import PackConfig, PrepareConfig, TokenizerConfig
from lifecycle.data.prepare import prepare as prepare_data
from lifecycle.errors import ConfigError, DataError, GateRejected
from lifecycle.evaluate.config import EvalConfig
from lifecycle.evaluate.run import evaluate_model
from lifecycle.registry.promote import promote as promote_version
from lifecycle.tracking import code_version, mask_mapping, mask_secrets, stage_run
from lifecycle.train.config import TrainConfig
from lifecycle.train.run import train as train_model

TAG_CACHE_KEY = "lifecycle.cache_key"
TAG_OUTPUTS = "lifecycle.outputs"
TAG_REUSED_FROM = "lifecycle.reused_from"
STEPS = ("prepare", "train", "evaluate", "promote_staging", "promote_production")


def _default_prepare() -> PrepareConfig:
    # The main job's corpus is small (CPython's docs, ~0.5 MB): a 4k vocabulary and 128-token
    # blocks keep enough blocks per split for a meaningful validation loss.
    return PrepareConfig(tokenizer=TokenizerConfig(vocab_size=4096), pack=PackConfig(block_size=128))


def _default_train() -> TrainConfig:
    return TrainConfig(preset="tiny", max_steps=300, batch_size=16, learning_rate=3e-3, eval_every=50,
                       checkpoint_every=100)


@dataclass
class PipelineConfig:
    """The main job: every stage's config plus what ties them together."""

    #: Registered model name the pipeline trains and promotes.
    model_name: str = "lifecycle-lm"
    #: Local folder for the prepared data and the checkpoints.
    workdir: str = "outputs"
    #: Promotion policy file (None: registry_policies/default.yaml).
    policy: Optional[str] = None
    #: How far to promote: production only happens where the policy allows it without a person.
    promote_to: Literal["none", "staging", "production"] = "production"
    prepare: PrepareConfig = field(default_factory=_default_prepare)
    train: TrainConfig = field(default_factory=_default_train)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ConfigError("model_name must not be empty")


@dataclass
class StepResult:
    """One step of the pipeline: what it produced and whether it was reused."""

    name: str
    run_id: str | None
    outputs: dict[str, Any]
    reused: bool = False
    status: str = "done"


@dataclass
class PipelineOutcome:
    """What the pipeline did, for the CLI's closing summary."""

    run_id: str
    steps: list[StepResult]
    model_name: str
    version: str | None
    metrics: dict[str, float]
    production: str | None


def source_fingerprint(uri: str) -> str:
    """Identify the source's content cheaply: sizes and mtimes of local files, else the URI.

    For ``builtin:pydoc`` the corpus changes only with the Python version.
    """
    if uri.startswith("builtin:"):
        return f"{uri}@python{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    path = Path(uri).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for p in files:
            st = p.stat()
            h.update(f"{p.relative_to(path) if path.is_dir() else p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"local:{h.hexdigest()[:16]}"
    return uri  # hf:..., runs:/..., models:/...: identified by their URI


def cache_key(step: str, *parts: Any) -> str:
    """Key of a step: its name, the code version and everything that determines its result."""
    blob = json.dumps([step, code_version(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def find_cached(key: str, experiment_id: str) -> Any | None:
    """The newest FINISHED run of ``experiment_id`` tagged with ``key``, or None."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_CACHE_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    return runs[0] if runs else None


class StepRunner:
    """Child runs of one parent run, each reused when an identical earlier step exists.

    The building blocks shared by :class:`Pipeline` and continuous training
    (:mod:`lifecycle.retrain`): each step method takes the stage's config and inputs explicitly.
    """

    #: Said in the ledger's reason of a promotion ("lifecycle pipeline", "lifecycle retrain").
    reason = "pipeline"

    def __init__(self, model_name: str, *, policy: str | None = None, force: bool = False,
                 echo: Callable[[str], None] = print):
        self.model_name = model_name
        self.policy = policy
        self.force = force
        self.echo = echo
        self.steps: list[StepResult] = []

    def _step(self, name: str, key: str | None, fn: Callable[[], dict[str, Any]],
              valid: Callable[[dict[str, Any]], bool] = lambda _: True) -> StepResult:
        parent = mlflow.active_run()
        if key and not self.force:
            cached = find_cached(key, parent.info.experiment_id)
            if cached is not None:
                outputs = json.loads(cached.data.tags.get(TAG_OUTPUTS, "{}"))
                if valid(outputs):
                    self.echo(f"[{name}] reused run {cached.info.run_id} (same inputs, config and code)")
                    mlflow.set_tag(f"{TAG_REUSED_FROM}.{name}", cached.info.run_id)
                    result = StepResult(name, cached.info.run_id, outputs, reused=True)
                    self.steps.append(result)
                    return result
        self.echo(f"[{name}] running")
        tags = {TAG_CACHE_KEY: key} if key else {}
        with mlflow.start_run(run_name=name, nested=True, tags=tags) as child:
            outputs = fn()
            mlflow.set_tag(TAG_OUTPUTS, mask_secrets(json.dumps(outputs, default=str)))
        result = StepResult(name, child.info.run_id, outputs)
        self.steps.append(result)
        return result

    # -- the steps ------------------------------------------------------------------------------
    def run_prepare(self, cfg: PrepareConfig, output: Path, *, name: str = "prepare",
                    key_extra: tuple[Any, ...] = ()) -> StepResult:
        """Prepare ``cfg.source`` into ``output``; outputs ``data`` (local), ``data_uri``, ``digest``, ``run_id``."""
        key = cache_key(name, to_dict(cfg), source_fingerprint(cfg.source.uri), *key_extra)

        def run() -> dict[str, Any]:
            outcome = prepare_data(cfg, output, overwrite=True, run_name=name)
            return {"data": str(outcome.output), "data_uri": f"runs:/{outcome.run_id}/prepared",
                    "digest": outcome.card["digest"], "run_id": outcome.run_id}

        def still_there(outputs: dict[str, Any]) -> bool:
            try:
                card = read_card(outputs.get("data", ""), required=False)
            except DataError:  # a damaged card is as good as gone
                card = {}
            if card and card.get("digest") == outputs.get("digest"):
                return True
            # The local folder is gone or replaced: train from the run's artifact instead.
            outputs["data"] = outputs.get("data_uri", "")
            return bool(outputs["data"])

        return self._step(name, key, run, still_there)

    def run_train(self, cfg: TrainConfig, data: dict[str, Any], *, name: str = "train") -> StepResult:
        """Train ``cfg`` on the prepared ``data`` and register a version of ``model_name``."""
        cfg = dataclasses.replace(cfg, model_name=self.model_name)
        # Where checkpoints go and whether a bar is drawn do not change the model.
        keyed = {k: v for k, v in flatten(cfg).items() if k not in ("output", "progress", "system_metrics")}
        key = cache_key(name, keyed, data["digest"])

        def run() -> dict[str, Any]:
            outcome = train_model(cfg, data["data"], overwrite=True)
            return {"model_uri": outcome.model_uri, "version": outcome.version, "train_run_id": outcome.run_id,
                    "best_val_loss": outcome.best_val_loss}

        return self._step(name, key, run, lambda o: self._version_exists(o.get("version")))

    def run_evaluate(self, cfg: EvalConfig, data: str, data_digest: str, version: str, *,
                     baseline: str | None = None, name: str = "evaluate",
                     valid: Callable[[dict[str, Any]], bool] | None = None) -> StepResult:
        """Evaluate ``version`` on ``data`` (against ``baseline`` when given)."""
        model_uri = f"models:/{self.model_name}/{version}"
        train_run = self._version_tag(version, "train_run_id")
        key = cache_key(name, to_dict(cfg), data_digest, model_uri, train_run, baseline)

        def run() -> dict[str, Any]:
            outcome = evaluate_model(model_uri, data, cfg=cfg, baseline=baseline)
            # Keys as the metric contract names them (eval/..., compare/...).
            metrics = {k if "/" in k else f"eval/{k}": v for k, v in outcome.metrics.items()}
            return {"metrics": metrics, "compare": outcome.compare, "eval_run_id": outcome.run_id,
                    "baseline": outcome.baseline, "data_digest": outcome.data_digest}

        if valid is None:
            def valid(o: dict[str, Any]) -> bool:
                return self._version_tag(version, "eval_run_id") == o.get("eval_run_id")
        return self._step(name, key, run, valid)

    def promote(self, version: str, target: str) -> StepResult:
        """Promote ``version`` to ``target`` under the policy; a refusal is a result, not a crash."""
        name = f"promote_{target}"
        current = self._alias(target)
        if current == version:
            self.echo(f"[{name}] version {version} already holds @{target}")
            result = StepResult(name, None, {"version": version}, reused=True, status="already")
            self.steps.append(result)
            return result

        def run() -> dict[str, Any]:
            try:
                outcome = promote_version(self.model_name, version, target, policy_path=self.policy,
                                  reason=f"lifecycle {self.reason}")
            except GateRejected as rejected:
                # A refusal is a result, not a crash: production usually waits for a person.
                gates = getattr(getattr(rejected, "outcome", None), "gates", [])
                failed = [f"{g.gate}: {g.reason}" for g in gates if g.blocking]
                return {"version": version, "promoted": False, "reason": str(rejected), "failed_gates": failed}
            return {"version": version, "promoted": bool(outcome.moved), "reason": outcome.message}

        result = self._step(name, None, run)
        result.status = "promoted" if result.outputs.get("promoted") else "refused"
        return result

    # -- registry lookups -------------------------------------------------------------------------
    def _client(self) -> Any:
        return MlflowClient()

    def _version_exists(self, version: str | None) -> bool:
        if not version:
            return False
        try:
            self._client().get_model_version(self.model_name, str(version))
            return True
        except Exception:  # noqa: BLE001 - deleted or never registered: rerun the step
            return False

    def _version_tag(self, version: str, tag: str) -> str | None:
        try:
            return self._client().get_model_version(self.model_name, str(version)).tags.get(tag)
        except Exception:  # noqa: BLE001
            return None

    def _alias(self, alias: str) -> str | None:
        try:
            return str(self._client().get_model_version_by_alias(self.model_name, alias).version)
        except Exception:  # noqa: BLE001 - no such alias yet
            return None


class Pipeline(StepRunner):
    """Runs the steps in order under one parent run, reusing cached steps."""

    def __init__(self, cfg: PipelineConfig, *, force: bool = False, echo: Callable[[str], None] = print):
        super().__init__(cfg.model_name, policy=cfg.policy, force=force, echo=echo)
        self.cfg = cfg

    def prepare(self) -> StepResult:
        """The prepare step into ``<workdir>/prepared``."""
        return self.run_prepare(self.cfg.prepare, Path(self.cfg.workdir) / "prepared")

    def train(self, data: dict[str, Any]) -> StepResult:
        """The train step, checkpoints in ``<workdir>/checkpoints``."""
        cfg = dataclasses.replace(self.cfg.train, output=str(Path(self.cfg.workdir) / "checkpoints"))
        return self.run_train(cfg, data)

    def evaluate(self, data: dict[str, Any], model: dict[str, Any]) -> StepResult:
        """The evaluate step (against production by default, as ``lifecycle evaluate`` does)."""
        return self.run_evaluate(self.cfg.evaluate, data["data"], data["digest"], str(model["version"]))

    def run(self) -> PipelineOutcome:
        """Run every step in order under one parent run."""
        with stage_run("pipeline", run_name="pipeline") as parent:
            mlflow.log_params(mask_mapping({f"pipeline.{k}": v[:6000] for k, v in flatten(self.cfg).items()
                                            if not k.startswith(("prepare.", "train.", "evaluate."))}))
            mlflow.set_tag("pipeline.config_digest", config_digest(self.cfg))
            data = self.prepare().outputs
            model = self.train(data).outputs
            evaluation = self.evaluate(data, model).outputs
            version = str(model["version"])
            if self.cfg.promote_to in ("staging", "production"):
                staged = self.promote(version, "staging")
                if self.cfg.promote_to == "production" and staged.status in ("promoted", "already"):
                    self.promote(version, "production")
            reused = [s.name for s in self.steps if s.reused]
            mlflow.set_tag("pipeline.reused_steps", ",".join(reused) or "none")
            mlflow.set_tag("registered_model", f"{self.cfg.model_name}/{version}")
            return PipelineOutcome(run_id=parent.info.run_id, steps=self.steps, model_name=self.cfg.model_name,
                                   version=version, metrics=evaluation.get("metrics", {}),
                                   production=self._alias("production"))


def run_pipeline(cfg: PipelineConfig, *, force: bool = False, echo: Callable[[str], None] = print) -> PipelineOutcome:
    """Run the whole lifecycle; see :class:`Pipeline`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Pipeline(cfg, force=force, echo=echo).run()
