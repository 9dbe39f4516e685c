"""Write a model's report page atomically and log it as the artifact of a ``report`` run.

The page is written to a temporary file beside ``--out`` and renamed into place, so a reader
never sees half a page and a failed run leaves the old page (or nothing) behind. Credentials in
any URI the page or its JSON summary would show (the tracking URI, a run's params or tags) are
masked on the way out.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

from lifecycle.errors import ConfigError, OutputExistsError
from lifecycle.report.collect import as_json, collect
from lifecycle.report.render import render
from lifecycle.tracking import mask_secrets, stage_run


@dataclass
class ReportOutcome:
    """Where the page went."""

    path: Path
    run_id: str | None
    artifact_uri: str | None
    versions: int
    events: int
    bytes: int


def write_report(name: str, out: str | os.PathLike[str], *, overwrite: bool = False, log_run: bool = True,
                 experiment: str | None = None) -> ReportOutcome:
    """Collect ``name``'s history from MLflow, write the HTML to ``out`` and log it as an artifact."""
    path = Path(out).expanduser().absolute()
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; use --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise OutputExistsError(f"{path} is a folder; name the HTML file to write")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: folder {path.parent} does not exist")
    data = collect(name)
    # The last word on secrets: whatever a run's params or tags hold, the page never shows a password.
    page = mask_secrets(render(data))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
        run_id = artifact_uri = None
        if log_run:
            counts = {"report/versions": len(data.versions), "report/ledger_events": len(data.events)}
            run_id, artifact_uri = _log(name, Path(tmp), mask_secrets(as_json(data)), experiment, counts)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ReportOutcome(path=path, run_id=run_id, artifact_uri=artifact_uri, versions=len(data.versions),
                         events=len(data.events), bytes=len(page.encode("utf-8")))


def _log(name: str, html: Path, summary: str, experiment: str | None, counts: dict[str, int]) -> tuple[str, str]:
    """Log the page (as ``report/<name>.html``) and its JSON summary in a ``report`` run."""
    with stage_run("report", run_name=f"report-{name}", tags={"model_name": name}, experiment=experiment) as run:
        with tempfile.TemporaryDirectory(prefix="lifecycle-report-") as tmp:
            named = Path(tmp) / f"{name.replace('/', '_')}.html"
            shutil.copyfile(html, named)
            mlflow.log_artifact(str(named), artifact_path="report")
            (Path(tmp) / "report.json").write_text(summary, encoding="utf-8")
            mlflow.log_artifact(str(Path(tmp) / "report.json"), artifact_path="report")
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        return run.info.run_id, f"runs:/{run.info.run_id}/report/{named.name}"
