"""A real server: `lifecycle serve NAME` (-> `mlflow models serve -m models:/NAME@production
--env-manager local`) answers good requests, refuses bad ones with HTTP 400 and keeps serving,
coalesces concurrent requests, and records every request."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import servers
from tests.test_serving import experiment_in, tiny_model_dir  # noqa: F401 - session fixture

pytestmark = pytest.mark.e2e

MAX_ROWS = 8
MAX_BODY = 64 * 1024


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
    records = work / "inference.jsonl"
    # Started as a service manager starts it (issue #18 item 10b): the console script by its
    # absolute path with PATH=/usr/bin:/bin, so `mlflow models serve` must find uvicorn by itself.
    env = {"LIFECYCLE_CPU_THREADS": "1", "LIFECYCLE_BATCH_WAIT_MS": "20", "LIFECYCLE_MAX_ROWS": str(MAX_ROWS),
           "LIFECYCLE_MAX_BODY_BYTES": str(MAX_BODY)}
    proc, base = servers.start_lifecycle_serve(
        unique_name_module, work, ["--inference-log", str(records), "--max-new-tokens-cap", "32",
                                   "--max-stop-chars", "16"], env=env)
    yield {"url": f"{base}/invocations", "records": records, "name": unique_name_module,
           "version": str(info.registered_model_version), "proc": proc, "log": work / "serve.log"}
    servers.stop_process(proc)


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


def test_started_by_absolute_path_without_the_virtualenv_on_path(served):
    import sysconfig

    with open(f"/proc/{served['proc'].pid}/environ", "rb") as fh:
        env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
    # Started with PATH=/usr/bin:/bin, where uvicorn is not found (what made the server exit 127) ...
    missing = subprocess.run(["/bin/bash", "-c", "command -v uvicorn"], env={"PATH": servers.BARE_PATH})
    assert missing.returncode != 0
    # ... `lifecycle serve` (which replaced itself with `mlflow models serve`) put its own bin first ...
    assert env[b"PATH"].decode().split(":") == [sysconfig.get_path("scripts"), *servers.BARE_PATH.split(":")]
    # ... and the server answers.
    status, body = post(served["url"], {"inputs": ["Hello"], "params": {"max_new_tokens": 2}})
    assert status == 200, body


@pytest.mark.tried("serving", "requests over the limits through HTTP: a body over max_body_bytes, more rows than "
                   "max_rows, a stop string over max_stop_chars",
                   "413 / 400 naming the limit; the server keeps serving")
def test_limits_over_http_name_the_limit(served):
    url = served["url"]
    status, payload = post(url, {"inputs": ["word " * (MAX_BODY // 5 + 10)], "params": {"max_new_tokens": 2}})
    assert status == 413 and "max_body_bytes" in json.dumps(payload), payload
    status, payload = post(url, {"inputs": ["hi"] * (MAX_ROWS + 1), "params": {"max_new_tokens": 2}})
    assert status == 400 and "max_rows" in json.dumps(payload), payload
    status, payload = post(url, {"inputs": ["hi"], "params": {"max_new_tokens": 2, "stop": ["s" * 17]}})
    assert status == 400 and "max_stop_chars" in json.dumps(payload), payload
    status, ok = post(url, {"inputs": ["hi"] * MAX_ROWS, "params": {"max_new_tokens": 2, "stop": ["s" * 16]}})
    assert status == 200 and len(ok["predictions"]) == MAX_ROWS
    assert served["proc"].poll() is None


_scalar = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=10)
_json = st.recursive(_scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                      max_size=3), max_leaves=10)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot", 3]), "content": _scalar})
_bodies = st.one_of(
    st.fixed_dictionaries({"inputs": st.one_of(st.lists(st.text(max_size=20), max_size=MAX_ROWS + 2), _json)},
                          optional={"params": st.dictionaries(st.sampled_from(
                              ["max_new_tokens", "temperature", "top_k", "stop", "seed", "truncate", "nope"]),
                              st.integers(-3, 40) | st.lists(st.text(min_size=0, max_size=20), max_size=3) | _scalar,
                              max_size=3)}),
    st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=20) | _json, "max_new_tokens": st.integers(-1, 40),
                                        "messages": st.lists(_message, max_size=2)}),
    st.text(max_size=30),
)


@pytest.mark.tried("serving", "any JSON body through `mlflow models serve`: any inputs shape, params of any type and "
                   "value, chat messages with bad roles, bare strings (hypothesis)",
                   "200 or a 4xx that says why, never a 500; the server keeps serving")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies)
def test_any_body_gets_200_or_4xx_never_500(served, body):
    status, payload = post(served["url"], body if isinstance(body, str) else json.dumps(body))
    assert status == 200 or 400 <= status < 500, (status, payload)
    if status != 200:
        assert payload


def test_refused_requests_are_recorded_without_their_content(served):
    secret = "SECRET-e2e-4c1d"
    status, _ = post(served["url"], {"messages": [{"role": "wizard", "content": secret}]})
    assert status == 400
    status, _ = post(served["url"], {"inputs": ["hi"], "params": {"max_new_tokens": 2, "stop": [secret * 2]}})
    assert status == 400
    status, _ = post(served["url"], {"inputs": ["hi"], "params": {"max_new_tokens": 2, "stop": {"k": secret}}})
    assert 400 <= status < 500
    text = Path(served["records"]).read_text(encoding="utf-8")
    assert secret not in text
    assert all(json.loads(line)["latency_ms"] > 0 for line in text.splitlines())
