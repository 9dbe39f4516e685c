"""A real server: `lifecycle serve NAME` (-> `mlflow models serve -m models:/NAME@production
--env-manager local`) answers good requests, refuses bad ones with HTTP 400 and keeps serving,
coalesces concurrent requests, and records every request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import servers
from tests.test_serving import experiment_in, tiny_model_dir  # noqa: F401 - session fixture

pytestmark = pytest.mark.e2e


def post(url: str, body: dict | str) -> tuple[int, object]:
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        payload = err.read()
        try:
            return err.code, json.loads(payload)
        except ValueError:
            return err.code, payload.decode(errors="replace")


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory, unique_name_module):  # noqa: F811
    import mlflow
    from mlflow import MlflowClient

    from lifecycle.serving import log_model

    work = tmp_path_factory.mktemp("serve-e2e")
    exp = experiment_in(work, f"serve-{unique_name_module}")
    with mlflow.start_run(experiment_id=exp):
        info = log_model(tiny_model_dir, registered_model_name=unique_name_module)
    MlflowClient().set_registered_model_alias(unique_name_module, "production", info.registered_model_version)
    port = servers.free_port()
    log_path = work / "serve.log"
    records = work / "inference.jsonl"
    env = {**os.environ, "LIFECYCLE_CPU_THREADS": "1", "LIFECYCLE_BATCH_WAIT_MS": "20"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lifecycle", "serve", unique_name_module, "--port", str(port),
             "--inference-log", str(records), "--max-new-tokens-cap", "32"],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        servers.wait_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=proc)
    except Exception:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError(f"server did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
    yield {"url": f"http://127.0.0.1:{port}/invocations", "records": records, "name": unique_name_module,
           "version": str(info.registered_model_version), "proc": proc, "log": log_path}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def unique_name_module() -> str:
    import uuid

    return f"lm-serve-{uuid.uuid4().hex[:8]}"


def test_serves_every_input_format(served):
    url = served["url"]
    status, body = post(url, {"inputs": ["Hello", "class"], "params": {"max_new_tokens": 4}})
    assert status == 200, body
    rows = body["predictions"]
    assert len(rows) == 2 and all(r["completion_tokens"] == 4 and r["finish_reason"] == "length" for r in rows)
    assert set(rows[0]) == {"text", "prompt_tokens", "completion_tokens", "finish_reason", "truncated"}
    status, body = post(url, {"dataframe_records": [{"prompt": "Hello"}], "params": {"max_new_tokens": 4}})
    assert status == 200 and body["predictions"][0]["text"] == rows[0]["text"]
    status, body = post(url, {"prompt": "Hello", "max_new_tokens": 4})
    assert status == 200 and body[0]["text"] == rows[0]["text"]
    status, body = post(url, {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2})
    assert status == 200 and body[0]["completion_tokens"] == 2


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": ["word " * 400], "params": {"max_new_tokens": 4}}, "truncate"),
    ({"inputs": ["x"], "params": {"max_new_tokens": 33}}, "max_new_tokens must be between 1 and 32"),
    ({"inputs": [""]}, "empty"),
    ({"inputs": [3]}, "must be a string"),
    ({"inputs": ["x"], "params": {"max_tokens": 4}}, "unknown param 'max_tokens'; allowed params"),
    ({"inputs": ["x"], "params": {"max_new_tokens": "many"}}, "max_new_tokens"),
    ({"prompt": "x", "max_token": 2}, "unexpected input key"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role must be one of"),
    ("{not json", "valid JSON"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(served, body, fragment):
    status, payload = post(served["url"], body)
    assert status == 400, payload
    assert fragment in json.dumps(payload)
    status, ok = post(served["url"], {"inputs": ["Hello"], "params": {"max_new_tokens": 2}})
    assert status == 200 and ok["predictions"][0]["completion_tokens"] == 2
    assert served["proc"].poll() is None


def test_truncation_on_request_is_flagged(served):
    status, body = post(served["url"], {"inputs": ["word " * 400], "params": {"max_new_tokens": 4, "truncate": True}})
    assert status == 200, body
    assert body["predictions"][0]["truncated"] is True
    assert body["predictions"][0]["prompt_tokens"] == 256 - 4


def test_concurrent_requests_are_coalesced_and_recorded(served):
    results: dict[int, tuple[int, object]] = {}

    def call(i: int) -> None:
        results[i] = post(served["url"], {"inputs": [f"prompt number {i}"], "params": {"max_new_tokens": 6}})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 for status, _ in results.values()), results
    # Each caller got its own row back: the same text as asking alone.
    for i in (0, 5):
        alone = post(served["url"], {"inputs": [f"prompt number {i}"], "params": {"max_new_tokens": 6}})[1]
        assert results[i][1]["predictions"] == alone["predictions"]
    lines = [json.loads(line) for line in Path(served["records"]).read_text().splitlines()]
    assert all(r["model_name"] == served["name"] and r["model_version"] == served["version"] for r in lines)
    concurrent = [r for r in lines if r["status"] == "ok" and r["completion_tokens"] == 6]
    assert max(r["batch_size"] for r in concurrent) > 1
    refused = [r["error"] for r in lines if r["status"] == "invalid"]
    # Refusals by MLflow's own param checks (before predict) are recorded too.
    assert any("unknown param 'max_tokens'" in e for e in refused)
    assert any("max_new_tokens" in e and "many" in e for e in refused)
    assert all(r["latency_ms"] > 0 for r in lines)
