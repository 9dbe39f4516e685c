"""``lifecycle report``: the self-contained HTML page of a registered model's whole life."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("name")
@click.option("--out", "out", default="report.html", show_default=True, type=click.Path(),
              help="The HTML file to write (self-contained: opens with no network).")
@click.option("--overwrite", is_flag=True, help="Replace --out when it exists.")
@click.option("--no-log", "no_log", is_flag=True, help="Do not log the page as an artifact of a `report` run.")
@click.option("--experiment", help="MLflow experiment of the report run.")
def report(name: str, out: str, overwrite: bool, no_log: bool, experiment: str | None) -> None:
    """Write NAME's lifecycle as one HTML page: lineage, training curves, evaluations, gates,
    the ledger as a timeline and the latest monitoring charts; log it as a run artifact."""
    from lifecycle.cli import check_writable
    from lifecycle.report.write import write_report

    check_writable(out, "--out", file=True)
    outcome = write_report(name, out, overwrite=overwrite, log_run=not no_log, experiment=experiment)
    click.echo(f"Report of {name}: {outcome.versions} version(s), {outcome.events} ledger event(s), "
               f"{outcome.bytes / 1024:.0f} KiB -> {outcome.path}")
    if outcome.artifact_uri:
        click.echo(f"Logged as {outcome.artifact_uri}")
