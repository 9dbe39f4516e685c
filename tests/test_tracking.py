"""Tracking helpers: where the embedded default puts artifacts, and credentials never shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle.tracking import mask_mapping, mask_secrets
from tests import servers
from tests.cli import cli

SECRET = f"pw-{uuid.uuid4().hex[:12]}"


def _experiment_zero_location(db: Path) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{db}").get_experiment("0").artifact_location


def test_default_tracking_puts_artifacts_where_mlflow_does(tmp_path):
    """With MLflow's embedded default (sqlite:///mlflow.db, no server) a `lifecycle` command that creates
    the database gives MLflow's own layout, the one `mlflow run` gives: artifacts in ./mlruns beside
    mlflow.db, and no other artifact folder. Run from another directory, they still go beside the database."""
    (tmp_path / "corpus.txt").write_text(
        "\n\n".join(f"Document {i} talks about rivers, mountains and the music of village {i} "
                    "in the early morning, with many more words to pass the quality filters." for i in range(60)),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "_MLFLOW_SERVER_ARTIFACT_ROOT")}
    proc = subprocess.run(
        [sys.executable, "-m", "lifecycle", "prepare", "--source", "corpus.txt", "--output", "prepared",
         "--vocab-size", "300", "--block-size", "32"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "mlflow.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["mlruns", "prepared"]
    cards = list((tmp_path / "mlruns").rglob("data_card.json"))
    assert cards and cards[0].relative_to(tmp_path).parts[:2] == ("mlruns", "0"), cards

    # MLflow itself (what `mlflow run` does when it creates the database) lays experiment 0 out the same way.
    mine = _experiment_zero_location(tmp_path / "mlflow.db")
    theirs_dir = tmp_path / "by-mlflow"
    theirs_dir.mkdir()
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient('sqlite:///mlflow.db').get_experiment('0')"],
                   cwd=theirs_dir, env=env, check=True, capture_output=True, timeout=120)
    theirs = _experiment_zero_location(theirs_dir / "mlflow.db")
    assert Path(mine.removeprefix("file://")).relative_to(tmp_path) == Path(theirs).relative_to(theirs_dir)

    # From another directory, against this database: still ./mlruns beside it, nothing where the command ran.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "lifecycle", "prepare", "--source", str(tmp_path / "corpus.txt"), "--output",
         "prepared2", "--vocab-size", "300", "--block-size", "32"],
        cwd=elsewhere, env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                            "MLFLOW_EXPERIMENT_NAME": "made-elsewhere"},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["prepared2"]
    from mlflow.tracking import MlflowClient

    made = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("made-elsewhere")
    assert made is not None and Path(made.artifact_location.removeprefix("file://")).parent == tmp_path / "mlruns"
    cards = (tmp_path / "mlruns").rglob("data_card.json")
    assert {c.relative_to(tmp_path / "mlruns").parts[0] for c in cards} == {"0", made.experiment_id}


# -- credentials in URIs ---------------------------------------------------------------------------

def test_mask_secrets_named_examples():
    assert mask_secrets("postgresql://user:pw@db:5432/x") == "postgresql://***@db:5432/x"
    assert mask_secrets("at http://alice:s3cr@t@host/api and s3://k:v@bucket/p") == \
        "at http://***@host/api and s3://***@bucket/p"
    assert mask_secrets("postgresql+psycopg2://tok@db/x") == "postgresql+psycopg2://***@db/x"
    assert mask_secrets("sqlite:///mlflow.db, runs:/abc/model, models:/m@production, a@b.c") == \
        "sqlite:///mlflow.db, runs:/abc/model, models:/m@production, a@b.c"
    assert mask_mapping({"storage": "mysql://u:p@h/d", "n": 3}) == {"storage": "mysql://***@h/d", "n": "3"}


@pytest.mark.tried("secrets", "a prepare source given as a URI with user:password@ (file://user:pw@localhost/...)",
                   "the run's params, tags, dataset input and artifacts (the data card) show only scheme://***@host")
def test_prepare_logs_only_the_masked_source(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i} talks about rivers, mountains and the music of village {i} "
                                   "in the early morning, with many more words to pass the quality filters."
                                   for i in range(60)), encoding="utf-8")
    # MLflow resolves a file:// URI locally and ignores its userinfo: a real run with a secret in its source.
    source = f"file://reader:{SECRET}@localhost{corpus}"
    assert cli("prepare", "--source", source, "--output", str(tmp_path / "prepared"),
               "--vocab-size", "300", "--block-size", "32") == 0
    (run,) = MlflowClient().search_runs(experiment_ids=["0"])
    shown = [*run.data.params.values(), *run.data.tags.values(),
             *(i.dataset.source for i in run.inputs.dataset_inputs)]
    assert run.data.params["source"] == f"file://***@localhost{corpus}"
    assert not [v for v in shown if SECRET in v]
    # Nor any artifact: the data card names its source, and the prepared folder is logged whole.
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "dl")))
    leaked = [f for f in local.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]
    assert not leaked and not [f for f in (tmp_path / "prepared").rglob("*")
                               if f.is_file() and SECRET.encode() in f.read_bytes()]


USERINFO = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc"), blacklist_characters="/?#'\"<>\\"),
                   min_size=1, max_size=40)


@pytest.mark.tried("secrets", "scheme://user:password@host with any user and password (':', '@', non-ASCII, "
                   "punctuation) inside any surrounding text (hypothesis)", "shown as scheme://***@host")
@settings(max_examples=200, deadline=None)
@given(scheme=st.sampled_from(["postgresql", "postgresql+psycopg2", "mysql", "http", "https", "s3", "mssql+pyodbc"]),
       user=USERINFO, password=USERINFO, before=st.text(max_size=30), after=st.text(max_size=30))
def test_mask_secrets_hides_any_userinfo(scheme, user, password, before, after):
    uri = f"{scheme}://{user}:{password}@db.example:5432/name"
    shown = mask_secrets(f"{before} {uri} {after}")
    assert f"{scheme}://***@db.example:5432/name" in shown
    assert f"{user}:{password}@" not in shown


# -- a real tune study and a real report with credentials in their URIs ---------------------------

@pytest.fixture
def pg_database():
    """A fresh PostgreSQL database (trust auth ignores the password we put in its URI)."""
    servers.require_postgres()
    uri = servers.create_postgres_database()
    yield uri.replace("://postgres@", f"://postgres:{SECRET}@", 1)
    servers.drop_postgres_database(uri)


def _everything_logged(client, experiment_ids) -> str:
    """Params, tags and text artifacts of every run of the experiments, as one string to search."""
    parts = []
    for run in client.search_runs(experiment_ids):
        parts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        stack = [a for a in client.list_artifacts(run.info.run_id)]
        while stack:
            art = stack.pop()
            if art.is_dir:
                stack += client.list_artifacts(run.info.run_id, art.path)
            elif art.path.endswith((".json", ".html", ".txt", ".yaml")):
                local = client.download_artifacts(run.info.run_id, art.path)
                parts.append(Path(local).read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.tried("secrets", "tune --storage postgresql://user:password@host/db, a good one (a real study) and an "
                   "unreachable one", "the password is in no param, tag, artifact or error line (masked as ***)")
def test_tune_storage_password_is_never_shown(tmp_path, tracking_uri, prepared_tiny, unique_name, pg_database,
                                              one_torch_thread, capsys):
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "params": {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "fixed": {"preset": "tiny", "max_steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1}}))
    args = ["tune", "--data", str(prepared_tiny), "--space", str(space), "--trials", "1", "--model-name", unique_name,
            "--output", str(tmp_path / "trials"), "--experiment", unique_name]
    assert cli(*args, "--storage", pg_database) == 0
    client = MlflowClient()
    experiment = client.get_experiment_by_name(unique_name)
    logged = _everything_logged(client, [experiment.experiment_id])
    assert "postgresql+psycopg2://***@127.0.0.1" in logged  # the storage is recorded, masked
    out, err = capsys.readouterr()
    assert SECRET not in logged + out + err

    unreachable = pg_database.replace("127.0.0.1:5432", "127.0.0.1:1")
    assert cli(*args, "--storage", unreachable) == 2
    out, err = capsys.readouterr()
    assert "***@127.0.0.1:1" in err and len(err.strip().splitlines()) == 1
    assert SECRET not in out + err


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.tried("secrets", "MLFLOW_TRACKING_URI=postgresql://user:password@host/db for a real report (page, "
                   "params, tags, artifacts) and an error", "the password appears nowhere (masked as ***)")
def test_tracking_uri_password_is_never_shown(tmp_path, pg_database):
    from mlflow.tracking import MlflowClient

    name = f"secret-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=pg_database, registry_uri=pg_database)
    client.create_registered_model(name)
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID",)},
           "MLFLOW_TRACKING_URI": pg_database, "_MLFLOW_SERVER_ARTIFACT_ROOT": str(tmp_path / "artifacts")}
    page = tmp_path / "page.html"
    proc = subprocess.run([sys.executable, "-m", "lifecycle", "report", name, "--out", str(page),
                           "--experiment", name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = page.read_text(encoding="utf-8")
    assert "postgresql+psycopg2://***@127.0.0.1" in html  # the tracking row is there, masked
    logged = _everything_logged(client, [client.get_experiment_by_name(name).experiment_id])
    assert f'"model": "{name}"' in logged  # the report run's report.json was among what was searched
    missing = subprocess.run([sys.executable, "-m", "lifecycle", "report", f"{name}-missing", "--out",
                              str(tmp_path / "none.html")], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 5, missing.stderr[-2000:]
    everything = html + logged + proc.stdout + proc.stderr + missing.stdout + missing.stderr
    assert SECRET not in everything
