"""Canary and shadow rollouts for real: `lifecycle serve NAME --canary staging` (-> `mlflow models serve` of
the routing pyfunc model) with tiny registered versions, driven over HTTP, judged by `lifecycle canary`
and acted on with `--act`, without restarting the server."""

from __future__ import annotations

import json
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lifecycle.serving.router import to_canary
from tests import servers
from tests.cli import cli, cli_output
from tests.test_serving import experiment_in, tiny_model_dir  # noqa: F401 - session fixture
from tests.test_serving_e2e import post

pytestmark = pytest.mark.e2e

SHARE = 0.5
POLICY = """
production:
  thresholds: []
canary:
  min_requests: 30
  max_error_rate_delta: 0.02
  max_latency_p50_increase: 3.0
  max_latency_p95_increase: 5.0
  max_completion_length_change: 0.2
  max_finish_reason_shift: 0.1
  share_steps: [0.5, 1.0]
  mode: enabled
"""


def variant(tiny: Path, out: Path, *, seed: int, n_positions: int | None = None) -> Path:
    """Another tiny model with ``tiny``'s tokenizer: other weights (spread as make_tiny_model does), and with
    ``n_positions=8`` one whose every generation is refused (max_new_tokens=8 leaves no room for a prompt)."""
    import torch
    from transformers import AutoTokenizer

    from lifecycle.train.model import build_model, save_model_dir

    tok = AutoTokenizer.from_pretrained(tiny)
    model = build_model("tiny", tok, n_positions=n_positions, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return save_model_dir(model, tok, out)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ask(url: str, n: int, *, key=None, header: bool = False, tokens: int = 8) -> list[tuple[int, object]]:
    """``n`` requests, 8 at a time; ``key(i)`` gives request i's routing key (param, or header)."""
    import urllib.error
    import urllib.request

    def one(i: int) -> tuple[int, object]:
        params = {"max_new_tokens": tokens}
        headers = {"Content-Type": "application/json"}
        k = key(i) if key else None
        if k is not None and header:
            headers["X-Routing-Key"] = k
        elif k is not None:
            params["routing_key"] = k
        req = urllib.request.Request(url, data=json.dumps({"inputs": [f"prompt {i}"], "params": params}).encode(),
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def register(name: str, work: Path, *folders: Path) -> list[str]:
    import mlflow

    from lifecycle.serving import log_model

    exp = experiment_in(work, f"canary-{name}")
    with mlflow.start_run(experiment_id=exp):
        return [str(log_model(f, registered_model_name=name).registered_model_version) for f in folders]


@pytest.fixture(scope="module")
def rollout(tiny_model_dir, tmp_path_factory):  # noqa: F811
    from mlflow import MlflowClient

    name = f"lm-canary-{uuid.uuid4().hex[:8]}"
    work = tmp_path_factory.mktemp("canary-e2e")
    v1, v2, v3 = register(name, work, tiny_model_dir, tiny_model_dir,
                          variant(tiny_model_dir, work / "broken", seed=3, n_positions=8))
    client = MlflowClient()
    client.set_registered_model_alias(name, "production", v1)
    client.set_registered_model_alias(name, "staging", v3)  # the failing challenger first
    policy = work / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    log = work / "records.jsonl"
    proc, base = servers.start_lifecycle_serve(
        name, work, ["--canary", "staging", "--canary-share", str(SHARE), "--refresh-s", "1",
                     "--inference-log", str(log), "--max-new-tokens-cap", "16"],
        env={"LIFECYCLE_CPU_THREADS": "1"})
    yield {"name": name, "url": f"{base}/invocations", "log": log, "policy": str(policy), "v": (v1, v2, v3),
           "client": client, "proc": proc}
    servers.stop_process(proc)


def _events(client, name: str) -> list:
    from lifecycle.registry.ledger import Ledger

    return Ledger(client).events(name)


def test_share_splits_within_binomial_noise_and_a_routing_key_sticks(rollout):
    url, log = rollout["url"], rollout["log"]
    assert [e.action for e in _events(rollout["client"], rollout["name"])] == ["canary_start"]
    n = 200
    answers = ask(url, n)
    # The broken challenger refuses every request (400): the status says which arm answered.
    to_challenger = sum(status == 400 for status, _ in answers)
    assert all(status in (200, 400) for status, _ in answers)
    assert abs(to_challenger - n * SHARE) < 4 * math.sqrt(n * SHARE * (1 - SHARE)), to_challenger
    recs = records(log)
    roles = {(r["role"], r["model_version"]) for r in recs}
    assert roles == {("production", rollout["v"][0]), ("canary", rollout["v"][2])}
    assert sum(r["role"] == "canary" for r in recs) == to_challenger
    # A key reaches the same version every time, by header or by param, where its hash says.
    keys = [f"user-{i}" for i in range(30)]
    for header in (True, False):
        for _ in range(2):
            got = ask(url, len(keys), key=lambda i: keys[i], header=header)
            assert [s for s, _ in got] == [400 if to_canary(SHARE, k) else 200 for k in keys]
    # A bad key is the client's error, said in one line; an unknown param lists routing_key among the allowed.
    status, body = post(url, {"inputs": ["x"], "params": {"max_new_tokens": 2, "routing_key": "k" * 300}})
    assert status == 400 and "routing_key may have at most 256 characters" in json.dumps(body)
    status, body = post(url, {"inputs": ["x"], "params": {"max_tokens": 2}})
    assert status == 400 and "routing_key" in json.dumps(body) and "max_tokens" in json.dumps(body)


@pytest.mark.tried("canary", "a challenger whose every generation fails, 50 % of live traffic, then "
                   "`lifecycle canary --act`", "verdict 11, the challenger alias deleted (canary_rollback with the "
                   "figures); the running server stops sending it traffic within its refresh, no restart")
def test_failing_challenger_is_rolled_back_and_stops_getting_traffic(rollout):
    name, client = rollout["name"], rollout["client"]
    code, out = cli_output("canary", name, "--records", str(rollout["log"]), "--policy", rollout["policy"], "--act")
    assert code == 11, out
    assert "error_rate" in out and "rolled back" in out
    assert "staging" not in (client.get_registered_model(name).aliases or {})
    last = _events(client, name)[-1]
    assert (last.action, last.from_version, last.to_version, last.done) == ("canary_rollback", rollout["v"][2],
                                                                            None, True)
    assert any(g.get("gate") == "error_rate" and g.get("challenger") == 1.0 for g in last.gates)
    code, out = cli_output("history", name)
    assert code == 0 and "canary_verdict" in out and "canary_rollback" in out
    time.sleep(2.5)  # the router re-reads the registry every second
    cut = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    assert all(status == 200 for status, _ in ask(rollout["url"], 60))
    after = [r for r in records(rollout["log"]) if r["ts"] > cut]
    assert len(after) == 60 and {r["role"] for r in after} == {"production"}
    assert rollout["proc"].poll() is None


def test_third_version_is_refused_then_a_good_challenger_steps_up_and_is_promoted(rollout):
    name, client, url, log = rollout["name"], rollout["client"], rollout["url"], rollout["log"]
    v1, v2, _ = rollout["v"]
    client.set_registered_model_alias(name, "staging", v2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the router loads v2 in its own thread, then routes to it
        ask(url, 8)
        if any(r["model_version"] == v2 for r in records(log)):
            break
        time.sleep(0.5)
    since = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    before = len(_events(client, name))
    # The default window still holds v3's records: a third version is refused, nothing recorded.
    code, out = cli_output("canary", name, "--records", str(log), "--policy", rollout["policy"], "--act")
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 4 and len(lines) == 1 and f"{name} v{rollout['v'][2]}" in lines[0], out
    assert len(_events(client, name)) == before
    answers = ask(url, 120, key=lambda i: f"k{i}")
    assert all(status == 200 for status, _ in answers)
    # Holds at share 0.5: --act steps it to the policy's next share (1.0); the router follows.
    code, out = cli_output("canary", name, "--records", str(log), "--since", since, "--policy", rollout["policy"],
                           "--act")
    assert code == 0 and "canary share -> 1" in out, out
    assert client.get_registered_model(name).tags["lifecycle.canary.share"] == "1.0"
    time.sleep(2.5)
    cut = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    ask(url, 20, key=lambda i: f"k{i}")
    assert {(r["role"], r["model_version"]) for r in records(log) if r["ts"] > cut} == {("canary", v2)}
    # Holds at the last step: --act promotes v2 through the normal promote path (the canary gate passes).
    code, out = cli_output("canary", name, "--records", str(log), "--since", since, "--policy", rollout["policy"],
                           "--act")
    assert code == 0 and "promoted" in out, out
    assert str(client.get_registered_model(name).aliases["production"]) == v2
    actions = [e.action for e in _events(client, name)]
    assert actions[-4:] == ["canary_verdict", "canary_step", "canary_verdict", "promote"]
    time.sleep(2.5)
    cut = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    ask(url, 20, key=lambda i: f"k{i}")
    assert {(r["role"], r["model_version"]) for r in records(log) if r["ts"] > cut} == {("production", v2)}
    assert rollout["proc"].poll() is None and v1 != v2
    # The report's canary section: both arms over time (a PNG), every verdict, the step and the rollback.
    page = rollout["log"].parent / "report.html"
    assert cli("report", name, "--out", str(page)) == 0
    html = page.read_text(encoding="utf-8")
    section = html.split('<section id="canary">', 1)[1].split("</section>", 1)[0]
    assert 'alt="canary arms over time" src="data:image/png;base64,' in section
    assert section.count("canary_rollback") == 1 and "canary_step" in section and "canary_start" in section


@pytest.fixture(scope="module")
def shadowed(tiny_model_dir, tmp_path_factory):  # noqa: F811
    from mlflow import MlflowClient

    name = f"lm-shadow-{uuid.uuid4().hex[:8]}"
    work = tmp_path_factory.mktemp("shadow-e2e")
    other = variant(tiny_model_dir, work / "other", seed=5)  # other weights: other answers
    v1, v2 = register(name, work, tiny_model_dir, other)
    client = MlflowClient()
    client.set_registered_model_alias(name, "production", v1)
    client.set_registered_model_alias(name, "staging", v2)
    log = work / "records.jsonl"
    tmp = work / "tmp"  # the server's temporary directory: where its routing model's folder lives
    tmp.mkdir()
    proc, base = servers.start_lifecycle_serve(
        name, work, ["--shadow", "staging", "--shadow-queue", "2", "--inference-log", str(log)],
        env={"LIFECYCLE_CPU_THREADS": "1", "TMPDIR": str(tmp)})
    yield {"name": name, "url": f"{base}/invocations", "log": log, "v": (v1, v2), "proc": proc, "tmp": tmp}
    servers.stop_process(proc)


@pytest.mark.tried("canary", "a shadow challenger with other weights behind a busy endpoint (bursts of 16 "
                   "concurrent requests, a shadow queue of 2)", "every answer is production's, byte for byte; "
                   "shadow answers only recorded, with their agreement; copies beyond the queue dropped and counted")
def test_shadow_never_changes_production_answers_and_drops_under_load(shadowed, tiny_model_dir):  # noqa: F811
    from lifecycle.serving.engine import Engine
    from lifecycle.serving.settings import ServingConfig

    prompts = [f"def f{i}(x):" for i in range(16)]
    alone = Engine(tiny_model_dir, ServingConfig(coalesce=False, cpu_threads=1))
    expected = alone.predict(prompts, {"max_new_tokens": 8})["text"].tolist()
    alone.close()
    for _ in range(3):
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda p: post(shadowed["url"], {"inputs": [p], "params": {"max_new_tokens": 8}}),
                                prompts))
        assert [status for status, _ in got] == [200] * 16
        assert [body["predictions"][0]["text"] for _, body in got] == expected
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        recs = records(shadowed["log"])
        shadow = [r for r in recs if r.get("role") == "shadow"]
        if len(shadow) == 48:
            break
        time.sleep(0.5)
    prod = [r for r in recs if r.get("role") == "production"]
    assert len(prod) == 48 and {r["model_version"] for r in prod} == {shadowed["v"][0]}
    done = [r for r in shadow if r["status"] == "ok"]
    dropped = [r for r in shadow if r["status"] == "dropped"]
    assert len(done) + len(dropped) == 48 and dropped and done
    assert {r["request_id"] for r in shadow} <= {r["request_id"] for r in prod}
    assert all(0.0 <= r["agreement"]["token_overlap"] <= 1.0 for r in done)
    assert any(r["agreement"]["exact_match"] < 1.0 for r in done)  # the shadow did answer differently
    code, out = cli_output("canary", shadowed["name"], "--records", str(shadowed["log"]))
    assert code == 10 and "shadow v" in out and f"shadow copies dropped {len(dropped)}" in out, out
    assert "(@staging, from canary_start #1)" in out  # no --challenger: the canary in progress
    assert "shadow_exact_match" in out or "shadow_token_overlap" in out
    assert cli("history", shadowed["name"]) == 0
    # Dropped copies are not the challenger's errors: its error rate is that of the copies that ran.
    assert f"challenger {len(done)}, shadow copies dropped {len(dropped)} (queue full; not errors)" in out
    assert all(r["status"] != "error" for r in shadow)


def test_mlflow_run_entry_point_canary(shadowed):
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(root), "-e", "canary", "--env-manager", "local",
                           "-P", f"name={shadowed['name']}", "-P", f"records={shadowed['log']}"],
                          capture_output=True, text=True, timeout=300, cwd=root, env=dict(os.environ))
    # 48 copies < the default policy's min_requests 200: verdict 10, which `mlflow run` reports as a failed run.
    assert proc.returncode == 1 and "Verdict: 10 (not enough evidence" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-3000:])
    assert f"shadow v{shadowed['v'][1]} (@staging, from canary_start #1)" in proc.stdout
    last = _events(MlflowClient(), shadowed["name"])[-1]
    assert (last.action, last.gates[0]["code"], last.challenger_alias) == ("canary_verdict", 10, "staging")


def test_stopping_the_server_removes_its_routing_model_folder(shadowed):
    folders = list(shadowed["tmp"].glob("lifecycle-router-*"))
    assert len(folders) == 1 and (folders[0] / "model" / "MLmodel").is_file()
    servers.stop_process(shadowed["proc"])  # SIGTERM to the whole group, as a service manager stops it
    assert shadowed["proc"].returncode is not None
    assert list(shadowed["tmp"].glob("lifecycle-router-*")) == []
