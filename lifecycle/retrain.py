"""Continuous training: fine-tune the production version on new data and promote it under the policy.

One parent MLflow run (``lifecycle.stage=retrain``) with a child run per step, built from the
pipeline's steps (:class:`lifecycle.pipeline.StepRunner`, with the same step cache):

1. ``prepare`` the new data with the production data's own settings (cleaning, filters, PII,
   split fractions and seed, block size), the production model's tokenizer, and ``dedup.against``
   the data production was trained on: a document production already saw is not trained on again,
   and a document keeps its split because the split is a hash of the text. Served prompts that were
   recorded with text (``LIFECYCLE_INFERENCE_LOG_TEXT=1``) can be added, scrubbed once more.
2. ``train``: fine-tune from the pinned production version (``models:/NAME/<v>``, not the alias,
   which could move while this runs).
3. ``evaluate`` the new version against production on the data production was evaluated on
   (its training data's test split): the policy's baseline gate compares the two on the same data,
   and a model that forgot what it knew is refused. ``evaluate_new_data`` measures both on the new
   data's test split too (what the retraining is for), without touching the version's gate tags.
4. ``promote_staging``, then ``promote_production`` where the policy allows it without a person.

The new version's lineage tags name the new data (``data_run_id``/``data_digest``, as any training
run writes them) and the data before it (``base_data_run_id``/``base_data_digest``, and the whole
chain in ``lineage.data_run_ids``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import mlflow

from lifecycle.config import deep_merge, flatten, from_mapping, parse_overrides
from lifecycle.data.card import read_card
from lifecycle.data.config import PrepareConfig, SourceConfig
from lifecycle.data.pii import scrub
from lifecycle.data.sources import check_source, iter_documents
from lifecycle.errors import ConfigError, DataError, NotFoundError
from lifecycle.evaluate.config import EvalConfig
from lifecycle.monitoring.records import parse_since, read_records, records_path
from lifecycle.monitoring.run import resolve_version
from lifecycle.pipeline import StepResult, StepRunner
from lifecycle.tracking import TAG_DATA_RUN, mask_mapping, resolve_artifact, stage_run
from lifecycle.train.config import TrainConfig

log = logging.getLogger(__name__)

#: Tags on the retrained version (besides the training stage's own lineage tags).
TAG_BASE_VERSION = "base_model_version"
TAG_BASE_DATA_RUN = "base_data_run_id"
TAG_BASE_DATA_DIGEST = "base_data_digest"
TAG_DATA_CHAIN = "lineage.data_run_ids"
TAG_RETRAIN_RUN = "retrain_run_id"
TAG_NEW_DATA_EVAL = "retrain.new_data_eval_run_id"


def _default_train() -> TrainConfig:
    # Fine-tuning, not pre-training: fewer steps and a gentler learning rate than the main job,
    # so the production model's knowledge is adjusted rather than overwritten.
    return TrainConfig(max_steps=100, batch_size=8, learning_rate=3e-4, warmup_steps=10, eval_every=25,
                       checkpoint_every=50)


@dataclass
class RetrainConfig:
    """What continuous training does besides the new data itself."""

    #: Alias of the version to fine-tune from (and to evaluate against).
    from_alias: str = "production"
    #: Local folder for the prepared new data and the checkpoints.
    workdir: str = "retrain"
    #: Promotion policy file (None: registry_policies/default.yaml).
    policy: Optional[str] = None
    #: How far to promote: production only happens where the policy allows it without a person.
    promote_to: Literal["none", "staging", "production"] = "production"
    #: Column of the new data's text in jsonl/csv/parquet sources.
    text_column: str = "text"
    #: Add the prompts served by the model that were recorded with text.
    served_prompts: bool = False
    #: Inference records (None: $LIFECYCLE_INFERENCE_LOG) and the window they are taken from.
    records: Optional[str] = None
    records_since: str = "all"
    #: Also measure new version and production on the new data's test split.
    evaluate_new_data: bool = True
    train: TrainConfig = field(default_factory=_default_train)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not self.from_alias.strip():
            raise ConfigError("from_alias must not be empty")
        if self.train.base_model is not None:
            raise ConfigError("train.base_model is set by retrain (the production version); leave it unset")
        if not self.text_column:
            raise ConfigError("text_column must not be empty")


@dataclass
class RetrainOutcome:
    """What continuous training did, for the CLI's summary."""

    run_id: str
    model_name: str
    base_version: str
    version: str | None
    steps: list[StepResult]
    metrics: dict[str, float]
    new_data_compare: dict[str, float] = field(default_factory=dict)
    served_prompts: int = 0
    production: str | None = None

    def step(self, name: str) -> StepResult | None:
        """The step called ``name``, if it ran."""
        return next((s for s in self.steps if s.name == name), None)


def served_prompts(name: str, *, records: str | None, since: str = "all") -> tuple[list[str], dict[str, int]]:
    """Prompts of ``name``'s successful requests recorded with text, scrubbed again, and counts.

    Prompts are what users asked, whichever version answered, so every version's are taken; the
    counts say how many came from each (``version/<v>``), so nothing is mixed in unseen. The
    serving stage scrubs recorded text already; scrubbing again costs little and protects
    against records written by another scrubber version or by hand.
    """
    path = records_path(records)
    start = parse_since(since)
    texts: list[str] = []
    counts = {"records": 0, "with_text": 0, "prompts": 0, "scrubbed": 0}
    for rec in read_records(path):
        if rec.get("model_name") != name or (start is not None and rec["_ts"] < start):
            continue
        counts["records"] += 1
        prompts = rec.get("prompts")
        if rec.get("status", "ok") != "ok" or not prompts:
            continue
        counts["with_text"] += 1
        per_version = f"version/{rec.get('model_version')}"
        for text in prompts:
            if not isinstance(text, str) or not text.strip():
                continue
            clean, found = scrub(text)
            counts["scrubbed"] += sum(dict(found).values())
            counts[per_version] = counts.get(per_version, 0) + 1
            texts.append(clean)
    counts["prompts"] = len(texts)
    if not texts:
        span = f" since {start.isoformat(timespec='seconds')}" if start is not None else ""
        why = (f"none of its {counts['records']} records{span} holds prompt text (serve with "
               "LIFECYCLE_INFERENCE_LOG_TEXT=1)" if counts["records"] else f"the records hold no request of it{span}")
        raise DataError(f"no served prompts of {name} in {path}: {why}; drop --with-served-prompts or record text")
    return texts, counts


def _write_combined(source: Any, prompts: Sequence[str], out: Path) -> int:
    """The new data's documents and the served prompts as one JSONL source; documents written."""
    n = 0
    with out.open("w", encoding="utf-8") as fh:
        for text in iter_documents(source):
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += 1
        for text in prompts:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += 1
    return n


def prepare_config(base_card: dict[str, Any], *, source: str, text_column: str, tokenizer: str, against: str,
                   overrides: Sequence[str] = ()) -> Any:
    """The prepare config of the new data: the production data's, with the new source, the
    production tokenizer and dedup against the production data (``overrides`` on top, as
    ``prepare.KEY=VALUE`` or ``KEY=VALUE``)."""
    base = dict(base_card.get("config") or {})
    # The source section is the new data's own (the old one may have capped max_documents).
    base["source"] = {"uri": source, "text_column": text_column}
    forced = {"tokenizer": {"name_or_path": tokenizer}, "dedup": {"against": against}}
    user = parse_overrides(o[len("prepare."):] if o.startswith("prepare.") else o for o in overrides)
    return from_mapping(PrepareConfig, deep_merge(deep_merge(base, forced), user))


class Retrain(StepRunner):
    """Runs the continuous-training steps under one parent run."""

    reason = "retrain"

    def __init__(self, name: str, new_data: str, cfg: RetrainConfig, *, prepare_overrides: Sequence[str] = (),
                 force: bool = False, echo: Callable[[str], None] = print, monitor_run: str | None = None):
        super().__init__(name, policy=cfg.policy, force=force, echo=echo)
        self.new_data = new_data
        self.cfg = cfg
        self.prepare_overrides = list(prepare_overrides)
        self.monitor_run = monitor_run

    def _base(self) -> tuple[Any, str, str, dict[str, Any]]:
        """The version to start from, its data run, that data's URI and data card."""
        mv = resolve_version(self.model_name, self.cfg.from_alias, None)
        data_run = (mv.tags or {}).get(TAG_DATA_RUN)
        if not data_run:
            raise NotFoundError(f"{self.model_name} v{mv.version} has no {TAG_DATA_RUN} tag: continuous training "
                                "needs the data it was trained on (to deduplicate against and evaluate on)")
        uri = f"runs:/{data_run}/prepared"
        folder = resolve_artifact(uri, what="the production model's training data")
        card = read_card(folder, required=False)
        if not card:
            raise NotFoundError(f"{uri} is not prepared data (no data_card.json)")
        return mv, data_run, uri, card

    def run(self) -> RetrainOutcome:
        """Check the inputs, then run every step in order under one parent run."""
        # -- everything that can be refused, before any run exists ---------------------------------
        mv, base_data_run, base_data_uri, base_card = self._base()
        base_version = str(mv.version)
        base_uri = f"models:/{self.model_name}/{base_version}"
        source = self.new_data
        if source.startswith(("runs:/", "models:/")) or "://" in source:
            source = str(resolve_artifact(source, what="new data"))
        source_cfg = SourceConfig(uri=source, text_column=self.cfg.text_column)
        check_source(source_cfg)
        prompts, prompt_counts = ([], {})
        if self.cfg.served_prompts:
            prompts, prompt_counts = served_prompts(self.model_name, records=self.cfg.records,
                                                    since=self.cfg.records_since)
        workdir = Path(self.cfg.workdir).expanduser().absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        if prompts:
            combined = workdir / "new_data_and_served_prompts.jsonl"
            tmp = combined.with_name(f".{combined.name}.tmp")
            _write_combined(source_cfg, prompts, tmp)
            os.replace(tmp, combined)
            source = str(combined)
        prep_cfg = prepare_config(base_card, source=source, text_column="text" if prompts else self.cfg.text_column,
                                  tokenizer=base_uri, against=base_data_uri, overrides=self.prepare_overrides)
        train_cfg = dataclasses.replace(self.cfg.train, base_model=base_uri,
                                        output=str(workdir / "checkpoints"))

        tags = {"model_name": self.model_name, "retrain.base_version": base_version,
                "retrain.new_data": self.new_data, TAG_BASE_DATA_RUN: base_data_run}
        if self.monitor_run:
            tags["retrain.monitor_run_id"] = self.monitor_run  # the verdict that started this
        with stage_run("retrain", run_name=f"retrain-{self.model_name}", tags=tags) as parent:
            mlflow.log_params(mask_mapping({
                "retrain.new_data": self.new_data[:6000], "retrain.base_model": base_uri,
                "retrain.base_data": base_data_uri, "retrain.served_prompt_count": len(prompts),
                **{f"retrain.{k}": v[:6000] for k, v in flatten(self.cfg).items()
                   if not k.startswith(("train.", "evaluate."))}}))
            if prompt_counts:
                mlflow.log_metrics({f"retrain/served_{k}": float(v) for k, v in prompt_counts.items()})
                self.echo("[served prompts] " + ", ".join(f"{v} from {k.replace('/', ' ')}" for k, v in
                                                          prompt_counts.items() if k.startswith("version/")))
            data = self.run_prepare(prep_cfg, workdir / "prepared", key_extra=(base_uri,)).outputs
            model = self.run_train(train_cfg, data).outputs
            version = str(model["version"])
            self._tag_lineage(version, base_version, base_data_run, base_card, parent.info.run_id)

            # The gate-relevant evaluation: production's own data, production as the baseline.
            evaluation = self.run_evaluate(self.cfg.evaluate, base_data_uri, base_card["digest"], version,
                                           baseline=base_uri).outputs
            self._same_data_for_production(base_version, base_data_uri, base_card["digest"], evaluation)
            new_compare = self._evaluate_new_data(data, version, base_uri)

            if self.cfg.promote_to in ("staging", "production"):
                staged = self.promote(version, "staging")
                if self.cfg.promote_to == "production" and staged.status in ("promoted", "already"):
                    self.promote(version, "production")
            mlflow.set_tag("registered_model", f"{self.model_name}/{version}")
            return RetrainOutcome(run_id=parent.info.run_id, model_name=self.model_name, base_version=base_version,
                                  version=version, steps=self.steps, metrics=evaluation.get("metrics", {}),
                                  new_data_compare=new_compare, served_prompts=len(prompts),
                                  production=self._alias("production"))

    def _tag_lineage(self, version: str, base_version: str, base_data_run: str, base_card: dict[str, Any],
                     run_id: str) -> None:
        """Name the data before this version next to the new data (which training tagged)."""
        client = self._client()
        base_tags = client.get_model_version(self.model_name, base_version).tags or {}
        chain = [r for r in (base_tags.get(TAG_DATA_CHAIN) or base_data_run).split(",") if r]
        new_run = client.get_model_version(self.model_name, version).tags.get("data_run_id", "")
        if new_run and new_run not in chain:
            chain.append(new_run)
        tags = {TAG_BASE_VERSION: base_version, TAG_BASE_DATA_RUN: base_data_run,
                TAG_BASE_DATA_DIGEST: str(base_card.get("digest", "")), TAG_DATA_CHAIN: ",".join(chain),
                TAG_RETRAIN_RUN: run_id}
        for key, value in tags.items():
            client.set_model_version_tag(self.model_name, version, key, value)

    def _same_data_for_production(self, base_version: str, data_uri: str, digest: str,
                                  evaluation: dict[str, Any]) -> None:
        """Evaluate production on the candidate's data when its own tags come from other data.

        The baseline gate compares the two versions' tags only when both were measured on the same
        data; production evaluated elsewhere (or never) would refuse every candidate.
        """
        theirs = self._version_tag(base_version, "eval_data_digest")
        if theirs == evaluation.get("data_digest", digest) and self._version_tag(base_version, "eval/loss"):
            return
        self.echo(f"[evaluate_production] v{base_version} was evaluated on other data; measuring it on the same data")
        self.run_evaluate(self.cfg.evaluate, data_uri, digest, base_version, name="evaluate_production")

    def _evaluate_new_data(self, data: dict[str, Any], version: str, base_uri: str) -> dict[str, float]:
        """Both versions on the new data's test split (no gate tags written); {} when skipped."""
        if not self.cfg.evaluate_new_data:
            return {}
        card = read_card(data["data"], required=False)
        split = self.cfg.evaluate.split
        if card and not card.get("blocks", {}).get(split):
            self.echo(f"[evaluate_new_data] skipped: the new data's {split} split fills no block")
            mlflow.set_tag("retrain.new_data_eval", f"skipped: empty {split} split")
            return {}
        cfg = dataclasses.replace(self.cfg.evaluate, write_tags=False)
        result = self.run_evaluate(cfg, data["data"], data["digest"], version, baseline=base_uri,
                                   name="evaluate_new_data", valid=lambda o: bool(o.get("eval_run_id")))
        compare = {f"compare/{k}": float(v) for k, v in (result.outputs.get("compare") or {}).items()}
        if compare:
            mlflow.log_metrics({k.replace("compare/", "retrain/new_data_"): v for k, v in compare.items()})
        self._client().set_model_version_tag(self.model_name, version, TAG_NEW_DATA_EVAL,
                                             str(result.outputs.get("eval_run_id", "")))
        return compare


def retrain(name: str, new_data: str, cfg: RetrainConfig | None = None, *, prepare_overrides: Sequence[str] = (),
            force: bool = False, echo: Callable[[str], None] = print, monitor_run: str | None = None) -> RetrainOutcome:
    """Fine-tune ``name``'s production version on ``new_data``; see the module docstring.

    ``monitor_run`` names the monitor run whose ``retrain`` verdict started this (tagged on the run).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Retrain(name, new_data, cfg or RetrainConfig(), prepare_overrides=prepare_overrides, force=force,
                   echo=echo, monitor_run=monitor_run).run()
