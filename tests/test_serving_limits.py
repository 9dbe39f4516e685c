"""Serving limits and failure classes: request limits (rows, stop strings, body), what refused
requests leave in the records, fairness of the coalescer, out-of-memory as HTTP 429, the device
choice of CPU-only variants, compiled generation from two threads, and how `lifecycle serve`
starts (PATH, ports)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle.errors import AcceleratorOutOfMemoryError, AddressUnavailableError, ConfigError
from lifecycle.serving.batching import Coalescer
from lifecycle.serving.body_limit import BodyLimit
from lifecycle.serving.launch import check_port, serve_env
from lifecycle.serving.records import InferenceRecorder
from lifecycle.serving.requests import InvalidRequest, parse_inputs, parse_params
from lifecycle.serving.settings import ServingConfig, serving_config
from tests.test_serving import Gate, tiny_model_dir  # noqa: F401 - session fixture

LIMITS = {"max_rows": 4, "max_stop_chars": 8, "max_new_tokens_cap": 3, "default_max_new_tokens": 2}
#: A marker that must never reach a record: it stands for whatever a client writes.
SECRET = "SECRET-7f3a"


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory):  # noqa: F811
    from lifecycle.serving.engine import Engine

    path = tmp_path_factory.mktemp("limits") / "inf.jsonl"
    rec = InferenceRecorder(path, model_name="tiny", model_version="1")
    eng = Engine(tiny_model_dir, ServingConfig(coalesce=True, cpu_threads=1, batch_wait_ms=0, **LIMITS), recorder=rec)
    yield eng, path
    eng.close()


def _last_record(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8").splitlines()[-1])


# ---------------------------------------------------------------- request limits (pure and engine)

def test_limits_are_settings_with_env_vars_and_validated():
    cfg = serving_config({"serving": {"max_rows": 3}}, environ={"LIFECYCLE_MAX_BODY_BYTES": "1000",
                                                                 "LIFECYCLE_MAX_STOP_CHARS": "5"})
    assert (cfg.max_rows, cfg.max_body_bytes, cfg.max_stop_chars) == (3, 1000, 5)
    for key in ("max_rows", "max_body_bytes", "max_stop_chars"):
        with pytest.raises(ConfigError, match=f"{key} must be >= 1"):
            ServingConfig(**{key: 0})


def test_rows_and_stop_strings_over_the_limit_name_the_limit():
    chat = lambda messages: "x"  # noqa: E731
    with pytest.raises(InvalidRequest, match="at most 4 are allowed per request .*max_rows"):
        parse_inputs(["a"] * 5, chat, max_rows=4)
    with pytest.raises(InvalidRequest, match="max_rows"):
        parse_inputs(pd.DataFrame({"prompt": ["a"] * 5}), chat, max_rows=4)
    with pytest.raises(InvalidRequest, match="max_rows"):
        parse_inputs({"prompt": ["a"] * 5}, chat, max_rows=4)
    assert parse_inputs(["a"] * 4, chat, max_rows=4) == ["a"] * 4
    with pytest.raises(InvalidRequest, match="at most 8 characters .*max_stop_chars.*got one of 9"):
        parse_params({"stop": ["x" * 9]}, max_new_tokens_cap=4, default_max_new_tokens=2, max_stop_chars=8)
    assert parse_params({"stop": ["x" * 8]}, max_new_tokens_cap=4, default_max_new_tokens=2,
                        max_stop_chars=8).stop == ("x" * 8,)


_text = st.text(max_size=12)
_scalar = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | _text
_message = st.dictionaries(st.sampled_from(["role", "content", "name"]), _scalar | st.sampled_from(["user", "system"]),
                           max_size=3)
_row = _text | st.integers() | st.none() | st.fixed_dictionaries({}, optional={"prompt": _scalar, "messages":
                                                                               st.lists(_message, max_size=3)})
_inputs = st.one_of(_text, st.lists(_row, max_size=7), st.fixed_dictionaries({}, optional={
    "prompt": _text | st.lists(_text, max_size=6), "messages": st.lists(_message, max_size=3),
    "extra": _scalar}), st.integers(), st.none())
_params = st.none() | st.dictionaries(
    st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "seed", "stop", "truncate",
                     "repetition_penalty", "max_tokens"]),
    _scalar | st.lists(_text, max_size=10), max_size=4)


@pytest.mark.tried("serving", "any request shape: strings, lists, dicts, chat messages with any roles and contents, "
                   "any params of any type, more rows or longer stop strings than allowed (hypothesis)",
                   "served, or refused with InvalidRequest (HTTP 400) naming the problem; never another error")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_input=_inputs, params=_params)
def test_any_request_is_served_or_refused_never_crashes(limited, model_input, params):
    eng, _ = limited
    try:
        out = eng.predict(model_input, params)
    except InvalidRequest as exc:
        assert str(exc) and "\n" not in exc.record
        return
    assert 1 <= len(out) <= LIMITS["max_rows"]
    assert (out.completion_tokens <= LIMITS["max_new_tokens_cap"]).all()


# ---------------------------------------------------------------- no request content in records

_hiding = st.sampled_from([
    lambda s: ([{"role": "wizard", "content": s}], None),
    lambda s: ([{"role": s, "content": "hi"}], None),
    lambda s: ({"messages": [{"role": "user", "content": s}, "not a message"]}, None),
    lambda s: ({"prompt": "hi", s: 1}, None),
    lambda s: ([{"promt": s}], None),
    lambda s: ([{s: "x"}], None),
    lambda s: (pd.DataFrame({s: ["x"]}), None),
    lambda s: ([s, 3], None),
    lambda s: (["hi"], {"stop": [s * 3]}),
    lambda s: (["hi"], {"stop": [s, ""]}),
    lambda s: (["hi"], {"stop": [s] * 9}),
    lambda s: ([s * 400], {"max_new_tokens": 3}),
])


@pytest.mark.tried("serving", "refused requests whose message content, roles, keys, columns or stop strings carry "
                   "client text, with text logging off (hypothesis)",
                   "the client gets the full reason; the recorded error names the problem without any client text")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(make=_hiding, noise=st.text(alphabet="abcXYZ -", max_size=6))
def test_refused_requests_leave_no_request_content_in_the_records(limited, make, noise):
    eng, path = limited
    secret = f"{SECRET}{noise}"
    model_input, params = make(secret)
    with pytest.raises(InvalidRequest):
        eng.predict(model_input, params)
    rec = _last_record(path)
    assert rec["status"] == "invalid" and rec["error"]
    assert SECRET not in json.dumps(rec), rec["error"]
    assert rec["latency_ms"] > 0


def test_a_failed_generation_records_no_prompt_or_stop_text(limited, monkeypatch):
    eng, path = limited

    def leaky(*args, **kwargs):
        raise ValueError(f"tokenizer choked on {SECRET}-prompt near {SECRET[:7]} at https://u:pw@host/x")

    monkeypatch.setattr(eng.model, "generate", leaky)
    with pytest.raises(ValueError):
        eng.predict([f"{SECRET}-prompt"], {"stop": [SECRET[:7]]})
    rec = _last_record(path)
    assert rec["status"] == "error" and rec["error"].startswith("ValueError: tokenizer choked on")
    assert SECRET[:7] not in rec["error"] and "pw@" not in rec["error"] and "https://***@host/x" in rec["error"]


def test_mlflow_refusals_record_no_stop_strings_and_a_measured_latency(limited):
    eng, path = limited
    start = time.perf_counter()
    eng.record_refusal(f"Failed to enforce schema of params: stop [{SECRET!r}] is not a list of strings",
                       start=start, params={"stop": [SECRET], "max_new_tokens": 1})
    rec = _last_record(path)
    assert SECRET not in rec["error"] and "<redacted>" in rec["error"] and rec["latency_ms"] > 0


# ---------------------------------------------------------------- fairness of the coalescer

@pytest.mark.tried("serving", "a huge request (hundreds of rows) queued ahead of a small one with the same and with "
                   "other generation params", "the small one rides in the very next batch and finishes first")
@pytest.mark.parametrize("small_key", ["A", "B"])
def test_a_huge_request_does_not_starve_a_small_one(small_key):
    done: list[str] = []
    # Each batch takes a while, as a generate does: 50 batches of the huge request take ~1 s.
    gate = Gate(lambda key, items: time.sleep(0.02) or list(items))
    co = Coalescer(gate, max_batch=8, wait_s=0.0)
    first = threading.Thread(target=co.submit, args=("A", ["first"]))
    first.start()
    assert gate.entered.wait(timeout=30)
    huge = threading.Thread(target=lambda: (co.submit("A", [f"h{i}" for i in range(400)]), done.append("huge")))
    huge.start()
    wait_until_queued(co, 1)
    small_out: list = []
    small = threading.Thread(target=lambda: (small_out.append(co.submit(small_key, ["s0", "s1"])),
                                             done.append("small")))
    small.start()
    wait_until_queued(co, 2)
    gate.release.set()
    for t in (first, huge, small):
        t.join(timeout=60)
    assert done == ["small", "huge"]
    assert small_out[0][0] == ["s0", "s1"]
    # The small request was served by the first or second batch after the one that was running,
    # not after the 50 batches of the huge one.
    batches_with_small = [i for i, (_, items) in enumerate(gate.batches) if "s0" in items or "s1" in items]
    assert batches_with_small and max(batches_with_small) <= 2
    assert all(len(items) <= 8 for _, items in gate.batches)


def wait_until_queued(co: Coalescer, n: int) -> None:
    deadline = time.monotonic() + 30
    while co.queued < n:
        assert time.monotonic() < deadline
        time.sleep(0.002)


def test_coalesced_results_keep_each_callers_order_under_round_robin():
    co = Coalescer(lambda key, items: [x * 10 for x in items], max_batch=5, wait_s=0.0)
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        results[i] = co.submit("k", list(range(i * 100, i * 100 + i * 3 + 1)))[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: [x * 10 for x in range(i * 100, i * 100 + i * 3 + 1)] for i in range(6)}


# ---------------------------------------------------------------- request body limit (ASGI)

def _call_asgi(app, body: bytes, *, chunked: bool = False, content_length: str | None = None) -> tuple[int, bytes]:
    sent: list[dict] = []
    chunks = [body[i:i + 100] for i in range(0, len(body), 100)] if chunked else [body]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    headers = [] if chunked else [(b"content-length", (content_length or str(len(body))).encode())]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": "/invocations", "headers": headers}, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def _echo(scope, receive, send):
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": message["body"]})


@pytest.mark.parametrize("chunked", [False, True])
def test_body_limit_refuses_with_413_naming_the_limit_and_passes_the_rest_whole(chunked):
    app = BodyLimit(_echo, max_bytes=1000)
    status, body = _call_asgi(app, b"x" * 1000, chunked=chunked)
    assert status == 200 and body == b"x" * 1000
    status, body = _call_asgi(app, b"x" * 1001, chunked=chunked)
    assert status == 413
    message = json.loads(body)["message"]
    assert "at most 1000 bytes" in message and "max_body_bytes" in message
    status, body = _call_asgi(app, b"{}", content_length="lots")
    assert status == 400 and "Content-Length" in json.loads(body)["message"]


# ---------------------------------------------------------------- out of memory is HTTP 429

@pytest.mark.tried("serving", "a generation that runs out of accelerator memory as torch.OutOfMemoryError and as "
                   "RuntimeError('CUDA error: out of memory')", "HTTP 429 (RESOURCE_EXHAUSTED) and a recorded error; "
                   "other failures stay 500")
@pytest.mark.parametrize("error, status", [
    (lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 429),
    (lambda: RuntimeError("CUDA error: out of memory"), 429),
    (lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), 429),
    (lambda: RuntimeError("shape mismatch"), 500),
])
def test_every_kind_of_out_of_memory_becomes_429(limited, monkeypatch, error, status):
    from mlflow.exceptions import MlflowException

    from lifecycle.serving.model import LanguageModel

    eng, path = limited

    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(eng.model, "generate", fail)
    model = LanguageModel()
    model.engine = eng
    with pytest.raises(Exception) as info:
        model.predict(None, ["Hello"], {"max_new_tokens": 2})
    if status == 429:
        assert isinstance(info.value, MlflowException) and info.value.get_http_status_code() == 429
        assert "out of memory" in info.value.message
        assert isinstance(info.value.__context__, AcceleratorOutOfMemoryError)
        assert _last_record(path)["error"] == "accelerator out of memory"
    else:
        assert not isinstance(info.value, MlflowException)  # the scoring server answers 500
        assert _last_record(path)["status"] == "error"


# ---------------------------------------------------------------- device of a CPU-only variant

def test_cpu_only_variant_falls_back_to_cpu_when_no_device_was_asked(monkeypatch, caplog):
    import torch

    from lifecycle.serving.variant import choose_device

    assert choose_device(None, "int8-dynamic") == "cpu"
    assert choose_device("cpu", "int8-dynamic") == "cpu"
    with pytest.raises(ConfigError, match="CPU only" if torch.cuda.is_available() else "CUDA is not available"):
        choose_device("cuda:0", "int8-dynamic")  # asked for: honoured or refused, never replaced
    with pytest.raises(ConfigError, match="not a device"):
        choose_device("tpu-ish", None)
    # On a GPU machine (simulated: this host has none) the fallback is logged, and plain models take the GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="lifecycle.serving.variant"):
        assert choose_device("auto", "int8-dynamic") == "cpu"
    assert "runs on CPU only" in caplog.text
    assert choose_device(None, None) == "cuda" and choose_device("auto", "fp16") == "cuda"
    with pytest.raises(ConfigError, match="CPU only"):
        choose_device("cuda", "int8-dynamic")


# ---------------------------------------------------------------- compiled generation

@pytest.mark.tried("serving", "compiled (static cache + torch.compile) generation called from two request threads "
                   "with batch sizes that differ", "served from the graphs built at warm-up, same text as uncompiled")
def test_compiled_generation_from_two_threads(tiny_model_dir):  # noqa: F811
    import torch

    from lifecycle.serving.engine import Engine

    try:
        compiled = Engine(tiny_model_dir, ServingConfig(coalesce=True, compile=True, cpu_threads=1, max_batch_size=2,
                                                        batch_wait_ms=0, max_new_tokens_cap=4))
        compiled.warmup()  # builds the graphs of batch sizes 1 and 2
    except Exception as exc:  # noqa: BLE001 - the compiler toolchain, not our code
        pytest.skip(f"torch.compile (inductor) cannot compile on this machine: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
    from torch._dynamo.utils import counters

    plain = Engine(tiny_model_dir, ServingConfig(coalesce=False, cpu_threads=1, max_new_tokens_cap=4))
    assert compiled.buckets == [1, 2]
    assert getattr(compiled.model, "_compiled_call", None) is not None  # generation really went through compile
    graphs = counters["stats"]["unique_graphs"]
    prompts = [["Hello"], ["class", "The quick brown fox"]]
    out: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            out[i] = list(compiled.predict(prompts[i], {"max_new_tokens": 4}).text)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert out[0] == list(plain.predict(prompts[0], {"max_new_tokens": 4}).text)
    assert out[1] == list(plain.predict(prompts[1], {"max_new_tokens": 4}).text)
    # Served by warmed graphs: no compile on the request threads (a compile takes many seconds here).
    assert counters["stats"]["unique_graphs"] == graphs > 0
    assert time.perf_counter() - started < 20
    compiled.close()
    plain.close()
    torch._dynamo.reset()


# ---------------------------------------------------------------- starting `lifecycle serve`

def test_serve_env_puts_this_interpreters_bin_first_and_keeps_the_rest():
    import os
    import sysconfig

    env = serve_env({"PATH": "/usr/bin:/bin", "OTHER": "x"})
    first = env["PATH"].split(os.pathsep)
    assert first[0] == os.path.dirname(sys.executable)
    assert sysconfig.get_path("scripts") in first and first[-2:] == ["/usr/bin", "/bin"]
    assert env["OTHER"] == "x"
    assert serve_env({})["PATH"].startswith(os.path.dirname(sys.executable))
    # uvicorn, which `mlflow models serve` runs by name through bash, is found with that PATH.
    found = subprocess.run(["/bin/bash", "-c", "command -v uvicorn"], env=serve_env({"PATH": "/usr/bin:/bin"}),
                           capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip()


@pytest.mark.tried("serving", "lifecycle serve on a port in use, port 0, a port above 65535, a negative port",
                   "one-line error, exit 15 (in use) or 2 (out of range), nothing started")
def test_serve_refuses_busy_and_out_of_range_ports_before_starting(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(AddressUnavailableError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port("127.0.0.1", port)
        proc = subprocess.run([sys.executable, "-m", "lifecycle", "serve", "some-model", "--port", str(port)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 15, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"Error: port {port} on 127.0.0.1 is already in use: stop what "
                                                "listens there or pick another --port"]
    for bad in (0, 65536, -5):
        with pytest.raises(ConfigError, match="out of range"):
            check_port("127.0.0.1", bad)
    proc = subprocess.run([sys.executable, "-m", "lifecycle", "serve", "some-model", "--port", "70000"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "out of range" in proc.stderr
    assert not (tmp_path / "mlruns").exists()


def test_body_limit_reaches_the_app_the_scoring_server_builds_after_loading(monkeypatch):
    import fastapi
    from mlflow.pyfunc import scoring_server

    from lifecycle.serving import body_limit

    original = fastapi.FastAPI
    monkeypatch.delenv(body_limit.SCORING_SERVER_ENV, raising=False)
    assert body_limit.install(100) is False and fastapi.FastAPI is original  # outside the server: untouched
    monkeypatch.setenv(body_limit.SCORING_SERVER_ENV, "/some/model")
    try:
        assert body_limit.install(100)

        class Model:
            metadata = type("Meta", (), {"get_input_schema": staticmethod(lambda: None)})

        # What mlflow's scoring_server.app does once the model has loaded.
        app = scoring_server.init(Model())
        assert fastapi.FastAPI is original  # only that one app was changed
        assert BodyLimit in [m.cls for m in app.user_middleware]
    finally:
        fastapi.FastAPI = original


def test_several_workers_on_a_gpu_are_warned_about(tmp_path, capsys):
    from tests.cli import cli

    # The warning comes before anything is resolved or started (the model here does not exist).
    code = cli("serve", "no-such-model", "--device", "cuda", "--workers", "2", "--port", str(_free_port()))
    err = capsys.readouterr().err
    assert "warning: --workers 2 on a GPU loads 2 copies of the model" in err and "prefer --workers 1" in err
    assert code == 5 and err.strip().splitlines()[-1].startswith("Error: ")
    code = cli("serve", "no-such-model", "--device", "cpu", "--workers", "2", "--port", str(_free_port()))
    assert "warning" not in capsys.readouterr().err and code == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("text, kept, gone", [
    ("could not open https://alice:s3cr3t@example.com/data.jsonl", "https://***@example.com/data.jsonl", "s3cr3t"),
    ("s3://AKIAXXXX:abc%2Fdef@bucket/key failed", "s3://***@bucket/key", "AKIAXXXX"),
    ("GET https://host/f?X-Amz-Signature=deadbeef&x=1", "X-Amz-Signature=***&x=1", "deadbeef"),
    ("postgresql+psycopg2://user:pw@127.0.0.1:5432/db", "postgresql+psycopg2://***@127.0.0.1:5432/db", "pw@"),
])
def test_uri_credentials_never_reach_records(text, kept, gone, tmp_path):
    from lifecycle.secrets import mask_secrets

    assert kept in mask_secrets(text) and gone not in mask_secrets(text)
    rec = InferenceRecorder(tmp_path / "inf.jsonl", model_name="m", model_version="1")
    rec.record(latency_ms=1.0, error=f"OSError: {text}", status="error")
    rec.close()
    assert gone not in (tmp_path / "inf.jsonl").read_text(encoding="utf-8")
