"""``lifecycle report``: one self-contained HTML page with the whole life of a registered model.

Lineage (data runs -> training run -> version -> promotions and rollbacks), training curves,
evaluation of every version with champion vs challenger, each gate's result, the ledger as a
timeline, and the latest monitoring charts. The page is written atomically (temporary file +
rename) and logged as the artifact ``report/<name>.html`` of a ``report`` run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lifecycle.errors import ConfigError, OutputExistsError


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
    from lifecycle.report.collect import as_json, collect
    from lifecycle.report.render import render

    path = Path(out).expanduser().absolute()
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; use --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise OutputExistsError(f"{path} is a folder; name the HTML file to write")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: folder {path.parent} does not exist")
    data = collect(name)
    page = render(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
        run_id = artifact_uri = None
        if log_run:
            run_id, artifact_uri = _log(name, Path(tmp), as_json(data), experiment,
                                        {"report/versions": len(data.versions), "report/ledger_events": len(data.events)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ReportOutcome(path=path, run_id=run_id, artifact_uri=artifact_uri, versions=len(data.versions),
                         events=len(data.events), bytes=len(page.encode("utf-8")))


def _log(name: str, html: Path, summary: str, experiment: str | None, counts: dict[str, int]) -> tuple[str, str]:
    """Log the page (as ``report/<name>.html``) and its JSON summary in a ``report`` run."""
    import shutil

    import mlflow

    from lifecycle.tracking import stage_run

    with stage_run("report", run_name=f"report-{name}", tags={"model_name": name}, experiment=experiment) as run:
        with tempfile.TemporaryDirectory(prefix="lifecycle-report-") as tmp:
            named = Path(tmp) / f"{name.replace('/', '_')}.html"
            shutil.copyfile(html, named)
            mlflow.log_artifact(str(named), artifact_path="report")
            (Path(tmp) / "report.json").write_text(summary, encoding="utf-8")
            mlflow.log_artifact(str(Path(tmp) / "report.json"), artifact_path="report")
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        return run.info.run_id, f"runs:/{run.info.run_id}/report/{named.name}"
