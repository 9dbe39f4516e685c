"""`lifecycle canary` against a real registry and ledger (no server): the challenger defaults to the canary in
progress (the newest canary_start's alias), dropped shadow copies reach the ledger and the report counted apart,
and the MLproject entry point `canary` runs the same command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from tests.cli import cli, cli_output
from tests.test_canary import dropped_copies, rec

REPO = Path(__file__).resolve().parents[1]
POLICY = "canary: {min_requests: 100, mode: dry_run}\n"


def _model(client, name: str, tmp_path: Path) -> tuple[str, str]:
    """Two versions of ``name`` (tiny text artifacts: the command reads records, not weights); v1 production."""
    import mlflow

    exp = mlflow.create_experiment(f"canary-cmd-{name}", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_text("x", "m/x.txt")
    client.create_registered_model(name)
    v1, v2 = (str(client.create_model_version(name, f"runs:/{run.info.run_id}/m", run.info.run_id).version)
              for _ in range(2))
    client.set_registered_model_alias(name, "production", v1)
    return v1, v2


def _shadow_records(path: Path, name: str, v1: str, v2: str, *, dropped: int) -> None:
    """150 production answers, 150 shadow copies that ran and agreed, ``dropped`` copies the router dropped."""
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    lines = [dict(rec(name=name, version=v1, latency=10.0 + i % 7), ts=now) for i in range(150)]
    lines += [dict(rec(name=name, version=v2, role="shadow", latency=10.0 + i % 7,
                       agreement_={"exact_match": 1.0, "token_overlap": 1.0}), ts=now) for i in range(150)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    dropped_copies(path, name=name, version=v2, n=dropped)


def test_challenger_defaults_to_the_canary_in_progress(unique_name, tmp_path):
    from mlflow import MlflowClient

    from lifecycle.registry import canary as registry_canary
    from lifecycle.registry.ledger import Ledger

    client = MlflowClient()
    v1, v2 = _model(client, unique_name, tmp_path)
    # The canary runs behind @candidate; @staging names production's version (the old default would compare it).
    client.set_registered_model_alias(unique_name, "candidate", v2)
    client.set_registered_model_alias(unique_name, "staging", v1)
    records, policy = tmp_path / "records.jsonl", tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    _shadow_records(records, unique_name, v1, v2, dropped=0)
    # --since: the records predate the canary_start, which bounds the default window.
    args = ("canary", unique_name, "--records", str(records), "--policy", str(policy), "--since", "1h")

    code, out = cli_output(*args)  # no canary_start yet: nothing in progress, one line, nothing recorded
    assert code == 2 and out.count("\n") == 1 and "no canary in progress" in out and "--challenger" in out, out
    assert Ledger(client).events(unique_name) == []

    registry_canary.start(unique_name, registry_canary.arms(unique_name, "candidate"), mode="shadow", share=None)
    [started] = Ledger(client).events(unique_name)
    assert (started.action, started.challenger_alias) == ("canary_start", "candidate")
    code, out = cli_output(*args)
    assert code == 0 and f"shadow v{v2} (@candidate, from canary_start #{started.seq})" in out, out
    verdict = Ledger(client).events(unique_name)[-1]
    assert (verdict.action, verdict.to_version, verdict.challenger_alias) == ("canary_verdict", v2, "candidate")

    # Promoted (both aliases name one version) or rolled back (alias gone): no canary in progress.
    client.set_registered_model_alias(unique_name, "candidate", v1)
    code, out = cli_output(*args)
    assert code == 2 and "no canary in progress: @candidate" in out and f"production's version v{v1}" in out, out
    client.delete_registered_model_alias(unique_name, "candidate")
    code, out = cli_output(*args)
    assert code == 2 and "no canary in progress: @candidate" in out and "no longer exists" in out, out
    # A named challenger is taken as given, whatever the ledger says.
    client.set_registered_model_alias(unique_name, "staging", v2)
    code, out = cli_output(*args, "--challenger", "staging")
    assert code == 0 and f"shadow v{v2} (@staging) since" in out, out
    assert [e.action for e in Ledger(client).events(unique_name)] == ["canary_start", "canary_verdict",
                                                                     "canary_verdict"]
    code, out = cli_output("canary", f"{unique_name}-missing", "--records", str(records))
    assert code == 5 and "no registered model" in out


def _shadow_started(client, name: str, tmp_path: Path):
    """Two versions, @staging as a shadow challenger started in the ledger, a policy file: (v1, v2, records, policy)."""
    from lifecycle.registry import canary as registry_canary

    v1, v2 = _model(client, name, tmp_path)
    client.set_registered_model_alias(name, "staging", v2)
    registry_canary.start(name, registry_canary.arms(name, "staging"), mode="shadow", share=None)
    records, policy = tmp_path / "records.jsonl", tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    return v1, v2, records, policy


def test_dropped_copies_reach_the_ledger_and_the_report_counted_apart(unique_name, tmp_path):
    from mlflow import MlflowClient

    from lifecycle.registry.ledger import Ledger

    client = MlflowClient()
    v1, v2, records, policy = _shadow_started(client, unique_name, tmp_path)
    _shadow_records(records, unique_name, v1, v2, dropped=400)

    code, out = cli_output("canary", unique_name, "--records", str(records), "--policy", str(policy))
    assert code == 0, out  # 400 drops beside 150 agreeing copies: the challenger still holds
    assert "requests: production 150, challenger 150, shadow copies dropped 400 (queue full; not errors)" in out
    head = Ledger(client).events(unique_name)[-1].gates[0]
    assert (head["kind"], head["code"], head["challenger"], head["shadow_dropped"]) == ("canary_verdict", 0, 150, 400)
    error_rate = next(g for g in Ledger(client).events(unique_name)[-1].gates if g["gate"] == "error_rate")
    assert error_rate["challenger"] == 0.0

    page = tmp_path / "report.html"
    assert cli("report", unique_name, "--out", str(page)) == 0
    section = page.read_text(encoding="utf-8").split('<section id="canary">', 1)[1].split("</section>", 1)[0]
    headers = re.findall(r"<th>(.*?)</th>", section.split("</thead>", 1)[0])
    cells = re.findall(r"<td>(.*?)</td>", section.split("<tbody>", 1)[1].split("</tr>", 1)[0])
    assert cells[headers.index("shadow dropped")] == "400", (headers, cells)


def test_mlproject_entry_point_runs_the_canary_command(unique_name, tmp_path):
    """`entrypoints/canary.py` (what `mlflow run . -e canary` runs) with every MLproject parameter rendered,
    empty ones meaning "not given": the challenger comes from the ledger, the exit code is the verdict's."""
    from mlflow import MlflowClient

    from lifecycle.registry import canary as registry_canary

    client = MlflowClient()
    v1, v2 = _model(client, unique_name, tmp_path)
    client.set_registered_model_alias(unique_name, "blue", v2)
    records, policy = tmp_path / "records.jsonl", tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    _shadow_records(records, unique_name, v1, v2, dropped=3)

    def entry_point(**params: str) -> subprocess.CompletedProcess:
        words = [f"{k}={v}" for k, v in {"name": unique_name, "challenger": "", "since": "", "records": str(records),
                                         "policy": str(policy), "act": "false", **params}.items()]
        return subprocess.run([sys.executable, "entrypoints/canary.py", *words], capture_output=True, text=True,
                              timeout=300, cwd=REPO)

    proc = entry_point()
    assert proc.returncode == 2 and "no canary in progress" in proc.stderr, proc.stdout + proc.stderr[-2000:]
    registry_canary.start(unique_name, registry_canary.arms(unique_name, "blue"), mode="shadow", share=None)
    proc = entry_point(since="1h")  # the records predate the canary_start: the default window would skip them
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert f"shadow v{v2} (@blue, from canary_start #1)" in proc.stdout and "shadow copies dropped 3" in proc.stdout
    proc = entry_point(challenger="nosuch", act="true")
    assert proc.returncode == 5 and "no @nosuch alias" in proc.stderr, proc.stdout + proc.stderr[-2000:]


def test_canary_reads_what_the_records_file_really_holds(unique_name, tmp_path):
    """An empty records file: verdict 10 with 0 requests. Damaged lines: skipped, counted on screen and in the
    verdict. Another model's records (a file shared by two servers): left out and counted. A third version of
    the model: refused (exit 4, one line naming it, nothing recorded)."""
    from mlflow import MlflowClient

    from lifecycle.registry.ledger import Ledger

    client = MlflowClient()
    v1, v2, records, policy = _shadow_started(client, unique_name, tmp_path)
    args = ("canary", unique_name, "--records", str(records), "--policy", str(policy), "--since", "1h")

    records.write_text("", encoding="utf-8")  # the server has answered nothing yet
    code, out = cli_output(*args)
    assert code == 10 and "requests: production 0, challenger 0" in out, out
    assert Ledger(client).events(unique_name)[-1].gates[0]["records_skipped"] == 0

    _shadow_records(records, unique_name, v1, v2, dropped=0)
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    with records.open("a", encoding="utf-8") as fh:
        fh.write('{"ts": "not a time", "latency_ms": 1}\n{"ts": "2026-\n')  # damaged: skipped, said, counted
        fh.write("".join(json.dumps(dict(rec(name="other-model", version="7"), ts=now)) + "\n" for _ in range(5)))
    with records.open("ab") as fh:
        fh.write(b"\xff\xfe garbage\n")
    code, out = cli_output(*args)
    assert code == 0, out
    assert ("requests: production 150, challenger 150, damaged lines skipped 3, other models' records left out 5"
            in out), out
    head = Ledger(client).events(unique_name)[-1].gates[0]
    assert (head["code"], head["production"], head["challenger"], head["records_skipped"]) == (0, 150, 150, 3)

    before = len(Ledger(client).events(unique_name))
    v3 = str(client.create_model_version(unique_name, client.get_model_version(unique_name, v1).source).version)
    with records.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(rec(name=unique_name, version=v3), ts=now)) + "\n")
    code, out = cli_output(*args)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 4 and len(lines) == 1 and f"{unique_name} v{v3} (1)" in lines[0] and "--since" in lines[0], out
    assert len(Ledger(client).events(unique_name)) == before
