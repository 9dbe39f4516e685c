"""Gather what the report shows from MLflow: versions, their runs, the ledger, the latest monitor run.

Everything is read through MLflow's client (and the ledger's API), so the report works the same
against the embedded sqlite default and a remote ``mlflow server``. Runs that were deleted or
never existed are reported as missing rather than failing the whole report: a report is most
needed when something went wrong.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lifecycle.errors import NotFoundError, PermissionDeniedError, TrackingUnavailableError
from lifecycle.registry.ledger import Ledger
from lifecycle.tracking import _describe_registered, mask_secrets, translate_mlflow_error

log = logging.getLogger(__name__)

#: Metric histories drawn as training curves.
CURVES = ("train/loss", "val/loss")
#: Data-run metrics shown in the lineage table.
DATA_METRICS = ("data/documents_read", "data/documents_kept", "data/tokens/train", "data/dedup/exact_against",
                "data/dedup/near_against")


@dataclass
class RunInfo:
    """The parts of one MLflow run the report shows (``missing`` when it cannot be read)."""

    run_id: str
    name: str = ""
    status: str = ""
    start: float | None = None
    end: float | None = None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    experiment_id: str = ""
    missing: bool = False


@dataclass
class VersionInfo:
    """One registered version with its tags, lineage runs and training curves."""

    version: str
    created: float
    tags: dict[str, str]
    description: str
    aliases: list[str]
    train_run: RunInfo | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def data_runs(self) -> list[str]:
        """Every data run behind this version, oldest first (the retrain chain when there is one)."""
        chain = [r for r in self.tags.get("lineage.data_run_ids", "").split(",") if r]
        for key in ("base_data_run_id", "data_run_id"):
            run = self.tags.get(key)
            if run and run not in chain:
                chain.append(run)
        return chain


@dataclass
class MonitorInfo:
    """The latest monitor run of the model: verdict, metrics and its PNG plots."""

    run: RunInfo
    verdict: str
    reasons: str
    images: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ReportData:
    """Everything the HTML is rendered from."""

    name: str
    description: str
    aliases: dict[str, str]
    versions: list[VersionInfo]
    data_runs: dict[str, RunInfo]
    eval_runs: dict[str, RunInfo]
    events: list[Any]
    monitor: MonitorInfo | None
    monitor_history: list[RunInfo]
    retrain_runs: list[RunInfo]
    tracking_uri: str
    generated: float


def _run_info(client: Any, run_id: str) -> RunInfo:
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            raise PermissionDeniedError(f"cannot read run {run_id}: {str(exc).splitlines()[0]}") from None
        return RunInfo(run_id=run_id, missing=True)
    info = run.info
    return RunInfo(run_id=run_id, name=info.run_name or "", status=info.status,
                   start=info.start_time / 1000 if info.start_time else None,
                   end=info.end_time / 1000 if info.end_time else None, params=dict(run.data.params),
                   metrics=dict(run.data.metrics), tags=dict(run.data.tags), experiment_id=info.experiment_id)


def _curves(client: Any, run_id: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for key in CURVES:
        try:
            out[key] = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        except Exception as exc:  # noqa: BLE001 - a missing history leaves an empty curve
            log.debug("no %s history for %s: %s", key, run_id, exc)
    return out


def _search_stage(name: str, stage: str, max_results: int) -> list[Any]:
    quoted = name.replace("'", "\\'")
    return mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=max_results,
                              filter_string=f"tags.model_name = '{quoted}' and tags.`lifecycle.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"])


def _monitor_images(client: Any, run_id: str, tmp: Path) -> dict[str, bytes]:
    images: dict[str, bytes] = {}
    try:
        listed = client.list_artifacts(run_id, "plots")
    except Exception as exc:  # noqa: BLE001 - no plots: the metrics are still shown
        log.debug("no plots for monitor run %s: %s", run_id, exc)
        return images
    for item in listed:
        if item.path.endswith(".png"):
            local = Path(client.download_artifacts(run_id, item.path, str(tmp)))
            images[Path(item.path).name] = local.read_bytes()
    return images


def collect(name: str, *, monitor_history: int = 10) -> ReportData:
    """Read everything the report of registered model ``name`` shows."""
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        err = translate_mlflow_error(exc)
        if isinstance(err, (TrackingUnavailableError, PermissionDeniedError)):
            raise err from None
        raise NotFoundError(f"no registered model {name!r}{_describe_registered(client, name)}") from None
    aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(v, []).append(alias)

    versions: list[VersionInfo] = []
    data_runs: dict[str, RunInfo] = {}
    eval_runs: dict[str, RunInfo] = {}
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        tags = dict(mv.tags or {})
        info = VersionInfo(version=str(mv.version), created=(mv.creation_timestamp or 0) / 1000, tags=tags,
                           description=mv.description or "", aliases=sorted(by_version.get(str(mv.version), [])))
        train_run = tags.get("train_run_id") or mv.run_id
        if train_run:
            info.train_run = _run_info(client, train_run)
            if not info.train_run.missing:
                info.curves = _curves(client, train_run)
        for run_id in info.data_runs:
            if run_id not in data_runs:
                data_runs[run_id] = _run_info(client, run_id)
        for key in ("eval_run_id", "retrain.new_data_eval_run_id"):
            run_id = tags.get(key)
            if run_id and run_id not in eval_runs:
                eval_runs[run_id] = _run_info(client, run_id)
        versions.append(info)

    events = Ledger(client).events(name)
    monitor = None
    found = _search_stage(name, "monitor", monitor_history)
    history = [_run_info(client, r.info.run_id) for r in found]
    if found:
        latest = history[0]
        with tempfile.TemporaryDirectory(prefix="lifecycle-report-") as tmp:
            images = _monitor_images(client, latest.run_id, Path(tmp))
        monitor = MonitorInfo(run=latest, verdict=latest.tags.get("monitor.verdict", "?"),
                              reasons=latest.tags.get("monitor.reasons", ""), images=images)
    retrains = [_run_info(client, r.info.run_id) for r in _search_stage(name, "retrain", 20)]
    return ReportData(name=name, description=model.description or "", aliases=aliases, versions=versions,
                      data_runs=data_runs, eval_runs=eval_runs, events=events, monitor=monitor,
                      monitor_history=history, retrain_runs=retrains,
                      tracking_uri=mask_secrets(mlflow.get_tracking_uri()),
                      generated=time.time())


def as_json(data: ReportData) -> str:
    """A machine-readable summary logged next to the HTML (numbers without the images)."""
    summary = {
        "model": data.name, "aliases": data.aliases, "generated": data.generated,
        "versions": [{"version": v.version, "aliases": v.aliases, "data_runs": v.data_runs,
                      "train_run": v.train_run.run_id if v.train_run else None,
                      "eval": {k: v.tags[k] for k in sorted(v.tags) if k.startswith(("eval/", "compare/"))}}
                     for v in data.versions],
        "events": [{"seq": e.seq, "action": e.action, "target": e.target, "from": e.from_version,
                    "to": e.to_version, "effective": e.effective, "timestamp": e.timestamp} for e in data.events],
        "monitor": None if data.monitor is None else {"run_id": data.monitor.run.run_id,
                                                      "verdict": data.monitor.verdict,
                                                      "metrics": data.monitor.run.metrics},
    }
    return json.dumps(summary, indent=2, default=str)
