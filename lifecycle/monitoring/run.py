"""One ``lifecycle monitor`` run: resolve the version and its reference, read the window, measure,
decide, and log everything as one MLflow run (metrics, params, tags, plots, ``verdict.json``).

Reference of a version: its ``data_run_id`` tag -> ``runs:/<id>/prepared`` (or ``--reference``).
Output drift compares the window with the same version's earlier records in the file (there is
no output in training data to compare with); before a first window exists it is unavailable.
``monitor/finish_reason_shift`` is the total variation distance between the outcome mixes
(``stop`` / ``length`` / ``error``) of the earlier records and the window.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from lifecycle.config import flatten
from lifecycle.errors import (
    ConfigError,
    DataError,
    NotFoundError,
    PermissionDeniedError,
    TrackingUnavailableError,
)
from lifecycle.monitoring import plots, service
from lifecycle.monitoring.analysis import Analysis, analyse, finite
from lifecycle.monitoring.config import MonitorConfig
from lifecycle.monitoring.records import load_records, parse_since, records_path, select_window
from lifecycle.monitoring.reference import load_reference
from lifecycle.monitoring.verdict import Verdict, decide

log = logging.getLogger(__name__)


@dataclass
class MonitorResult:
    """What the command prints: the verdict, the metrics, and where they were logged."""

    name: str
    version: str
    verdict: Verdict
    metrics: dict[str, float]
    run_id: str
    notes: list[str] = field(default_factory=list)


def thresholds_of(policy: str | None) -> tuple[dict[str, Any], str]:
    """The policy's ``monitoring`` thresholds and the policy's path (default policy when None)."""
    from lifecycle.policies import load_policy

    loaded = load_policy(policy)
    return dict(loaded.monitoring), loaded.path


def resolve_version(name: str, alias: str | None, version: str | None) -> Any:
    """The registered ``ModelVersion`` named by ``version`` or ``alias``; NotFoundError names what exists."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lifecycle.tracking import _describe_registered, translate_mlflow_error

    client = MlflowClient()
    try:
        if version:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias or "production")
    except MlflowException as exc:
        err = translate_mlflow_error(exc)
        if isinstance(err, (TrackingUnavailableError, PermissionDeniedError)):
            raise err from None
        what = f"version {version}" if version else f"alias @{alias or 'production'}"
        raise NotFoundError(f"{name}: no such {what}{_describe_registered(client, name)}") from None


def reference_folder(mv: Any, reference: str | None) -> tuple[Path, str]:
    """Local prepared-data folder of the reference and the URI it came from."""
    from lifecycle.tracking import TAG_DATA_RUN, resolve_artifact

    uri = reference
    if not uri:
        run_id = (mv.tags or {}).get(TAG_DATA_RUN)
        if not run_id:
            raise NotFoundError(f"{mv.name} v{mv.version} has no {TAG_DATA_RUN} tag to find its training data: pass "
                                "--reference DATA (a prepared data folder or runs:/<run_id>/prepared)")
        uri = f"runs:/{run_id}/prepared"
    try:
        return resolve_artifact(uri, what="reference data"), uri
    except NotFoundError as exc:
        raise NotFoundError(f"reference data not found ({exc}); pass --reference DATA (a prepared data folder "
                            "or runs:/<run_id>/prepared)") from None
    except DataError as exc:  # a missing local path is a missing reference too
        raise NotFoundError(f"{exc}; pass --reference DATA "
                            "(a prepared data folder or runs:/<run_id>/prepared)") from None


def _bpb_scorer(model_dir: Path, device: str):
    from lifecycle.evaluate.loss import document_nll, load_lm
    from lifecycle.serving.variant import variant_device

    dev = variant_device(model_dir, device)  # a CPU-only variant is scored on CPU, as it is served
    loaded: list[Any] = []  # the model is loaded on first use: a window without text never needs it

    def score(texts: Sequence[str]) -> float:
        if not loaded:
            loaded.extend(load_lm(model_dir, dev))
        model, tokenizer = loaded
        return document_nll(model, tokenizer, list(texts), device=dev, desc="monitor bits/byte").bits_per_byte

    return score


def _naive_utc(ts: datetime) -> datetime:
    return ts.astimezone(timezone.utc).replace(tzinfo=None)


def _write_plots(out: Path, window: Any, an: Analysis) -> list[Path]:
    ran = service.served(window.records)  # a dropped shadow copy has no latency to plot
    paths = [
        plots.histogram(out / "prompt_length_drift.png", an.reference_lengths, an.prompt_lengths,
                        title="prompt length (tokens): reference vs window", xlabel="tokens"),
        plots.histogram(out / "completion_length_drift.png",
                        an.baseline_completion_lengths if an.baseline_completion_lengths.size else None,
                        an.completion_lengths, title="completion length (tokens): earlier vs window",
                        xlabel="tokens", labels=("earlier records", "window")),
        plots.latency_over_time(out / "latency_over_time.png", [_naive_utc(r["_ts"]) for r in ran],
                                [float(r.get("latency_ms", 0.0)) for r in ran], [service.is_error(r) for r in ran]),
    ]
    return paths


def monitor(name: str, *, alias: str | None = "production", version: str | None = None,
            records: str | None = None, reference: str | None = None, policy: str | None = None,
            cfg: MonitorConfig | None = None, now: datetime | None = None) -> MonitorResult:
    """Measure the window of ``name`` (``version`` or ``@alias``) and log one MLflow run.

    Checks that cost nothing (policy, window, records) run before anything is downloaded or
    logged, so bad input leaves no half-written run behind.
    """
    import mlflow
    from transformers import AutoTokenizer

    from lifecycle.tracking import mask_mapping, resolve_model_dir, stage_run

    cfg = cfg or MonitorConfig()
    if version and alias and alias != "production":
        raise ConfigError("give either --version or --alias, not both")
    thresholds, policy_path = thresholds_of(policy)
    since = parse_since(cfg.since, now=now)
    path = records_path(records)
    read = load_records(path)
    all_records = read.records
    mv = resolve_version(name, None if version else alias, version)
    window = select_window(all_records, name=name, version=str(mv.version),
                           aliases=[mv.run_id, f"run-{mv.run_id}"] if mv.run_id else [],
                           since=since, until=now, mismatch=cfg.version_mismatch)  # type: ignore[arg-type]
    ref_dir, ref_uri = reference_folder(mv, reference)
    ref = load_reference(ref_dir, split=cfg.split, max_segments=cfg.max_reference_segments, seed=cfg.seed)
    model_dir = resolve_model_dir(f"models:/{name}/{mv.version}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    scorer = _bpb_scorer(model_dir, cfg.device) if cfg.semantic else None
    an = analyse(window, ref.segments, tokenizer, psi_bins=cfg.psi_bins, bits_per_byte=scorer,
                 max_loss_texts=cfg.max_loss_texts, seed=cfg.seed)
    # Damaged lines never block the verdict, but the run says how much data it could not read.
    an.metrics["monitor/records_skipped"] = float(len(read.skipped))
    if read.skipped:
        an.notes.append(f"skipped {len(read.skipped)} damaged line(s) of the records file (first: {read.skipped[0]})")
    verdict = decide(an.metrics, thresholds)

    tags = {"model_name": name, "model_version": str(mv.version), "monitor.verdict": verdict.verdict}
    with stage_run("monitor", run_name=f"monitor-{name}-v{mv.version}", tags=tags, experiment=cfg.experiment) as run:
        # "resolved." prefix: under `mlflow run` the run already holds the entry point's raw
        # parameters (records='', reference='') and MLflow refuses to change a logged param.
        params = {**{f"config.{k}": v for k, v in flatten(cfg).items()},
                  "resolved.records": str(path),
                  "resolved.reference": ref_uri,
                  "resolved.reference_digest": ref.digest or "",
                  "resolved.reference_segments": len(ref.segments), "resolved.policy": policy_path,
                  "resolved.window_since": since.isoformat() if since else "all",
                  "resolved.window_until": window.until.isoformat(),
                  "resolved.version": str(mv.version)}
        # A URI's userinfo or token never reaches params (they are shown to every reader).
        mlflow.log_params(mask_mapping(params))
        mlflow.log_metrics(finite(an.metrics))
        unavailable = sorted(k for k, v in an.metrics.items() if v != v)
        mlflow.set_tags({"monitor.unavailable": ",".join(unavailable)[:5000],
                         "monitor.reasons": "; ".join(map(str, verdict.findings))[:5000]})
        with tempfile.TemporaryDirectory(prefix="lifecycle-monitor-") as tmp:
            out = Path(tmp)
            for png in _write_plots(out, window, an):
                mlflow.log_artifact(str(png), artifact_path="plots")
            report = {**verdict.as_dict(), "model": name, "version": str(mv.version),
                      "metrics": {k: (None if v != v else v) for k, v in an.metrics.items()}, "notes": an.notes}
            (out / "verdict.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            mlflow.log_artifact(str(out / "verdict.json"))
        run_id = run.info.run_id
    return MonitorResult(name=name, version=str(mv.version), verdict=verdict, metrics=an.metrics,
                         run_id=run_id, notes=an.notes)
