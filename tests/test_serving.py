"""Serving: request parsing and limits, the coalescer, inference records, batched generation, and
the logged pyfunc model (loaded in-process and from another working directory)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from lifecycle.errors import ConfigError
from lifecycle.serving.batching import Coalescer
from lifecycle.serving.records import InferenceRecorder
from lifecycle.serving.requests import GenParams, InvalidRequest, parse_inputs, parse_params, plain_chat_prompt
from lifecycle.serving.settings import ServingConfig, serving_config

CAPS = {"max_new_tokens_cap": 64, "default_max_new_tokens": 16}


def make_tiny_model(out: Path) -> Path:
    """A tiny GPT-2 with a byte-level BPE trained on CPython's doc topics; weights spread out
    (random init at std 0.02 makes near-uniform logits and degenerate, tie-prone outputs)."""
    from pydoc_data.topics import topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lifecycle.train.model import build_model, save_model_dir

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:200], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    model = build_model("tiny", hf, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return save_model_dir(model, hf, out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("serving") / "tiny")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    from lifecycle.serving.engine import Engine

    eng = Engine(tiny_model_dir, ServingConfig(coalesce=False, cpu_threads=1, max_new_tokens_cap=64))
    yield eng
    eng.close()


# ---------------------------------------------------------------- params and inputs (pure)

def test_params_defaults_and_values():
    p = parse_params({}, **CAPS)
    assert p == GenParams(max_new_tokens=16)
    p = parse_params({"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
                      "seed": 3, "stop": ["\n"], "repetition_penalty": 1.2}, **CAPS)
    assert (p.max_new_tokens, p.do_sample, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (
        8, True, 0.7, 0.9, 5, 3, ("\n",))
    # temperature 0 means greedy, as in the usual LLM APIs; MLflow fills absent params with None.
    assert parse_params({"do_sample": True, "temperature": 0.0, "seed": None}, **CAPS).do_sample is False
    assert parse_params({"stop": "END"}, **CAPS).stop == ("END",)


@pytest.mark.parametrize("params, fragment", [
    ({"max_new_tokens": 65}, "between 1 and 64"),
    ({"max_new_tokens": 0}, "between 1 and 64"),
    ({"max_new_tokens": 2.5}, "must be an integer"),
    ({"max_tokens": 5}, "unknown param 'max_tokens'; allowed params: max_new_tokens (1..64)"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"do_sample": "maybe"}, "true or false"),
    ({"stop": [""]}, "non-empty strings"),
    ({"stop": ["a"] * 9}, "at most 8"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"temperature": "hot"}, "must be a number"),
])
def test_params_refused_with_what_is_allowed(params, fragment):
    with pytest.raises(InvalidRequest) as err:
        parse_params(params, **CAPS)
    assert fragment in str(err.value)


def test_input_shapes():
    chat = plain_chat_prompt
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert parse_inputs(["a", "b"], chat) == ["a", "b"]
    assert parse_inputs("a", chat) == ["a"]
    assert parse_inputs(pd.DataFrame({"prompt": ["a", "b"]}), chat) == ["a", "b"]
    assert parse_inputs({"prompt": "a"}, chat) == ["a"]
    assert parse_inputs({"prompt": ["a", "b"]}, chat) == ["a", "b"]
    assert parse_inputs({"messages": msgs}, chat) == ["system: Be brief.\nuser: hi\nassistant:"]
    assert parse_inputs(pd.DataFrame({"messages": [msgs]}), chat) == [plain_chat_prompt(msgs)]
    assert parse_inputs([{"prompt": "a"}, {"messages": msgs}], chat) == ["a", plain_chat_prompt(msgs)]


@pytest.mark.parametrize("bad, fragment", [
    ([""], "row 0 is empty"),
    ({"prompt": "   "}, "empty"),
    ([3], "must be a string, got int"),
    ([], "holds no prompts"),
    (pd.DataFrame({"text": ["a"]}), "expected a string or list of strings"),
    (pd.DataFrame({"prompt": ["a"], "x": [1]}), "unexpected input column"),
    ({"prompt": "a", "temperature": 1}, "generation params go in params"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of system, user, assistant"),
    ({"messages": [{"role": "user"}]}, "must be an object with role and content"),
    ([{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}], "not both"),
    (42, "unsupported input type int"),
])
def test_bad_inputs_refused(bad, fragment):
    with pytest.raises(InvalidRequest) as err:
        parse_inputs(bad, plain_chat_prompt)
    assert fragment in str(err.value)


def test_settings_from_model_config_and_env():
    cfg = serving_config({"max_batch_size": 8, "serving": {"batch_wait_ms": 2}},
                         environ={"LIFECYCLE_MAX_BATCH_SIZE": "4", "LIFECYCLE_COALESCE": "false"})
    assert (cfg.max_batch_size, cfg.batch_wait_ms, cfg.coalesce) == (4, 2.0, False)
    with pytest.raises(ConfigError, match="valid keys"):
        serving_config({"serving": {"max_batchsize": 3}}, environ={})
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1"):
        serving_config({}, environ={"LIFECYCLE_MAX_BATCH_SIZE": "0"})


# ---------------------------------------------------------------- coalescer (pure threading)

class Gate:
    """A batch function that holds its first batch until released, so that callers arriving
    meanwhile queue up deterministically (what happens under load while a generate runs)."""

    def __init__(self, run):
        self.run = run
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[tuple[object, list]] = []
        self._first = True

    def __call__(self, key, items):
        self.batches.append((key, list(items)))
        if self._first:
            self._first = False
            self.entered.set()
            assert self.release.wait(timeout=60)
        return self.run(key, items)


def wait_until(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def test_coalescer_batches_callers_that_queue_during_a_batch_and_returns_own_rows():
    gate = Gate(lambda key, items: [f"{key}:{item}" for item in items])
    co = Coalescer(gate, max_batch=8, wait_s=0.0)
    first = threading.Thread(target=co.submit, args=("A", ["first"]))
    first.start()
    assert gate.entered.wait(timeout=30)  # the engine is busy with the first request
    results: dict[int, list[str]] = {}

    def call(i: int) -> None:
        key = "A" if i % 3 else "B"
        results[i] = co.submit(key, [f"r{i}-{j}" for j in range(i % 3 + 1)])[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    wait_until(lambda: co.queued == 12)
    gate.release.set()
    for t in threads + [first]:
        t.join()
    co.close()
    for i in range(12):
        key = "A" if i % 3 else "B"
        assert results[i] == [f"{key}:r{i}-{j}" for j in range(i % 3 + 1)]
    later = gate.batches[1:]
    assert all(len(items) <= 8 for _, items in later)
    # Incompatible keys never share a batch, and the callers that queued did share batches.
    key_of = {f"r{i}-{j}": "A" if i % 3 else "B" for i in range(12) for j in range(3)}
    assert all({key_of[item] for item in items} == {k} for k, items in later)
    assert max(len(items) for _, items in later) > 3
    assert sum(len(items) for _, items in later) == sum(i % 3 + 1 for i in range(12))
    assert len(later) <= 5  # 4 rows of B in one batch, 20 rows of A in at most 4 batches of <= 8
    with pytest.raises(RuntimeError, match="closed"):
        co.submit("A", ["late"])


def test_lone_caller_never_waits_for_the_batching_window():
    # A window of 30 s: a fixed-window coalescer would hold a lone request that long.
    co = Coalescer(lambda key, items: list(items), max_batch=4, wait_s=30.0)
    start = time.monotonic()
    assert co.submit("k", [1, 2]) == ([1, 2], 2)
    assert time.monotonic() - start < 10


def test_batch_waits_only_for_announced_callers():
    batches: list[list[int]] = []
    co = Coalescer(lambda key, items: batches.append(list(items)) or list(items), max_batch=4, wait_s=30.0)
    # One caller announced (still parsing its request): a starting batch waits for it to queue.
    arrival = co.expect()
    leader = threading.Thread(target=co.submit, args=("k", [1]))
    leader.start()
    wait_until(lambda: co.busy)
    time.sleep(0.05)
    assert batches == []  # held for the announced caller
    assert co.submit("k", [2], arrival) == ([2], 2)
    leader.join()
    assert batches == [[1, 2]]
    # A caller that announces itself and is then refused releases the waiting batch at once.
    arrival = co.expect()
    leader = threading.Thread(target=co.submit, args=("k", [3]))
    start = time.monotonic()
    leader.start()
    wait_until(lambda: co.busy)
    co.forget(arrival)
    co.forget(arrival)  # idempotent
    leader.join()
    assert batches[-1] == [3] and time.monotonic() - start < 10


def test_coalescer_splits_large_requests_and_propagates_errors():
    co = Coalescer(lambda key, items: [x * 2 for x in items], max_batch=3, wait_s=0.0)
    out, size = co.submit("k", list(range(10)))
    assert out == [x * 2 for x in range(10)] and size == 3

    def boom(key, items):
        raise RuntimeError("device lost")

    bad = Coalescer(boom, max_batch=4, wait_s=0.0)
    with pytest.raises(RuntimeError, match="device lost"):
        bad.submit("k", [1])
    # A failed batch does not leave the engine marked busy: the next request runs (and fails).
    with pytest.raises(RuntimeError, match="device lost"):
        bad.submit("k", [2])
    assert not bad.busy and bad.queued == 0
    co.close()
    bad.close()


def test_coalescer_keeps_no_thread_and_nothing_alive():
    """A model loaded only briefly (MLflow's input-example check inside log_model) must be freed:
    the coalescer starts no thread that would keep its batch function (the engine) alive."""
    import gc
    import weakref

    class Owner:
        def run(self, key, items):
            return list(items)

    owner = Owner()
    co = Coalescer(owner.run, max_batch=4, wait_s=0.0)
    before = set(threading.enumerate())
    assert co.submit("k", [1])[0] == [1]
    assert set(threading.enumerate()) <= before
    ref = weakref.ref(owner)
    del owner, co
    gc.collect()
    assert ref() is None


def test_scoring_server_runs_a_full_batch_of_requests_at_once(monkeypatch):
    """Inside `mlflow models serve` the model widens the server's request thread pool: by default
    it has min(32, cores + 4) threads (6 here), too few for 16 waiting requests to form a batch."""
    import asyncio

    from mlflow.pyfunc import scoring_server

    from lifecycle.serving import model as served

    monkeypatch.setattr(scoring_server, "asyncio", asyncio)  # restored after the test
    monkeypatch.delenv(served._SCORING_SERVER_ENV, raising=False)
    assert served._widen_scoring_server_threads(8) is None  # not in a scoring server: untouched
    assert scoring_server.asyncio is asyncio
    monkeypatch.setenv(served._SCORING_SERVER_ENV, "/some/model")
    workers = served._widen_scoring_server_threads(8)
    assert workers is not None and workers >= 16
    assert served._widen_scoring_server_threads(8) == workers  # idempotent: one pool, not a stack
    shim = scoring_server.asyncio
    try:
        assert shim.TimeoutError is asyncio.TimeoutError and shim.wait_for is asyncio.wait_for
        barrier = threading.Barrier(16, timeout=30)

        async def requests() -> list[int]:
            return await asyncio.gather(*(shim.to_thread(barrier.wait) for _ in range(16)))

        # 16 blocking calls that only return once all 16 run at the same time.
        assert sorted(asyncio.run(requests())) == list(range(16))
    finally:
        shim._lifecycle_pool.shutdown(wait=False)


# ---------------------------------------------------------------- inference records

def test_recorder_one_line_per_request_threadsafe_no_text_by_default(tmp_path: Path):
    rec = InferenceRecorder(tmp_path / "inf.jsonl", model_name="m", model_version="3")
    rows = [{"prompt_tokens": 4, "completion_tokens": 2, "finish_reason": "length", "truncated": False}]

    def write(n: int) -> None:
        for _ in range(n):
            rec.record(latency_ms=1.5, rows=rows, batch_size=2, prompts=["secret"], completions=["x"])

    threads = [threading.Thread(target=write, args=(50,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.record(latency_ms=0.1, error="bad", status="invalid")
    rec.close()
    lines = [json.loads(line) for line in (tmp_path / "inf.jsonl").read_text().splitlines()]
    assert len(lines) == 201
    first = lines[0]
    assert (first["model_name"], first["model_version"], first["prompt_tokens"], first["completion_tokens"],
            first["batch_size"], first["finish_reason"], first["status"]) == ("m", "3", 4, 2, 2, "length", "ok")
    assert "prompts" not in first and "secret" not in json.dumps(lines)
    assert lines[-1]["error"] == "bad" and lines[-1]["finish_reason"] is None


def test_recorder_text_is_scrubbed_when_enabled(tmp_path: Path):
    from lifecycle.data import pii

    rec = InferenceRecorder.from_env(model_name="m", model_version="1", environ={
        "LIFECYCLE_INFERENCE_LOG": str(tmp_path / "inf.jsonl"), "LIFECYCLE_INFERENCE_LOG_TEXT": "1"})
    assert rec is not None and rec.include_text
    prompt = "mail me at jane.doe@example.com please"
    out = rec.record(latency_ms=1, rows=[{"prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop"}],
                     prompts=[prompt], completions=["ok"])
    rec.close()
    assert "jane.doe@example.com" not in json.dumps(out)
    assert out["prompts"] == [pii.scrub(prompt)[0]]
    assert sum(out["pii"].values()) >= 1


# ---------------------------------------------------------------- generation with a real tiny model

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and then", "class", "def f(x): return x + 1 if"]


def test_batched_greedy_equals_one_at_a_time(engine):
    batch = engine.predict(PROMPTS, {"max_new_tokens": 12})
    alone = [engine.predict([p], {"max_new_tokens": 12}).iloc[0] for p in PROMPTS]
    assert list(batch.columns) == ["text", "prompt_tokens", "completion_tokens", "finish_reason", "truncated"]
    assert list(batch.text) == [row.text for row in alone]
    assert list(batch.prompt_tokens) == [row.prompt_tokens for row in alone]
    assert len(set(batch.prompt_tokens)) > 1  # different lengths: left padding was exercised
    assert set(batch.finish_reason) <= {"stop", "length"}


def test_stop_strings_and_finish_reasons(engine):
    full = engine.predict(["The quick brown"], {"max_new_tokens": 20}).iloc[0]
    assert full.finish_reason == "length" and full.completion_tokens == 20
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    cut = engine.predict(["The quick brown"], {"max_new_tokens": 20, "stop": [stop]}).iloc[0]
    assert cut.finish_reason == "stop"
    assert full.text.startswith(cut.text) and stop not in cut.text
    assert cut.completion_tokens < 20


def test_rows_with_different_limits_share_a_batch_exactly(tiny_model_dir):
    """Requests that queue while a generate runs form the next batch together, and a row whose
    ``max_new_tokens`` is lower than its neighbour's gets exactly what it gets alone."""
    from lifecycle.serving.engine import Engine

    eng = Engine(tiny_model_dir, ServingConfig(coalesce=True, cpu_threads=1, warmup=False))
    try:
        solo = {n: eng.predict(["class"], {"max_new_tokens": n}).iloc[0].text for n in (3, 9)}
        # Hold the engine busy with a first request (the gate) while the two others arrive.
        gate = Gate(eng._run_batch)
        eng.coalescer = Coalescer(gate, max_batch=eng.config.max_batch_size, wait_s=0.0)
        out: dict[int, str] = {}

        def call(n: int) -> None:
            out[n] = eng.predict(["class"], {"max_new_tokens": n}).iloc[0].text

        busy = threading.Thread(target=call, args=(5,))
        busy.start()
        assert gate.entered.wait(timeout=60)
        threads = [threading.Thread(target=call, args=(n,)) for n in (3, 9)]
        for t in threads:
            t.start()
        wait_until(lambda: eng.coalescer.queued == 2)
        gate.release.set()
        for t in threads + [busy]:
            t.join()
        assert {3: out[3], 9: out[9]} == solo
        assert [len(items) for _, items in gate.batches] == [1, 2]  # both ran in one generate call
        assert eng.coalescer.stats.largest == 2
    finally:
        eng.close()


def test_eos_ends_a_row_with_finish_reason_stop(tiny_model_dir):
    import torch

    from lifecycle.serving.engine import Engine

    eng = Engine(tiny_model_dir, ServingConfig(coalesce=False, cpu_threads=1, warmup=False))
    # Make EOS the model's every choice: a constant final hidden state aligned with EOS's
    # (tied) output embedding. Pad is EOS here, so this checks padding is not counted.
    with torch.no_grad():
        direction = torch.randn(eng.model.config.n_embd)
        eng.model.transformer.ln_f.weight.zero_()
        eng.model.transformer.ln_f.bias.copy_(direction)
        eng.model.transformer.wte.weight[eng.tokenizer.eos_token_id] = 50 * direction
    out = eng.predict(["Hello", "The quick brown fox"], {"max_new_tokens": 5})
    eng.close()
    assert list(out.finish_reason) == ["stop", "stop"]
    assert list(out.completion_tokens) == [1, 1]
    assert list(out.text) == ["", ""]


def test_seeded_sampling_is_reproducible(engine):
    params = {"max_new_tokens": 10, "do_sample": True, "seed": 7, "temperature": 1.3, "top_k": 50}
    a = engine.predict(["Hello"], params).text[0]
    b = engine.predict(["Hello"], params).text[0]
    c = engine.predict(["Hello"], {**params, "seed": 8}).text[0]
    assert a == b
    assert a != c


def test_prompt_over_context_refused_or_truncated(engine):
    long = "word " * 400
    with pytest.raises(InvalidRequest, match="truncate"):
        engine.predict([long], {"max_new_tokens": 8})
    out = engine.predict([long], {"max_new_tokens": 8, "truncate": True}).iloc[0]
    assert bool(out.truncated) is True
    assert out.prompt_tokens == engine.context - 8
    with pytest.raises(InvalidRequest, match="leaves no room"):
        engine.prompt_limit(GenParams(max_new_tokens=engine.context))


def test_chat_messages_use_plain_format_without_template(engine):
    msgs = [{"role": "user", "content": "hi"}]
    a = engine.predict({"messages": msgs}, {"max_new_tokens": 4}).iloc[0]
    b = engine.predict([plain_chat_prompt(msgs)], {"max_new_tokens": 4}).iloc[0]
    assert (a.text, a.prompt_tokens) == (b.text, b.prompt_tokens)


def test_engine_records_requests_and_refusals(tiny_model_dir, tmp_path):
    from lifecycle.serving.engine import Engine

    rec = InferenceRecorder(tmp_path / "inf.jsonl", model_name="tiny", model_version="1")
    eng = Engine(tiny_model_dir, ServingConfig(coalesce=False, cpu_threads=1), recorder=rec)
    eng.predict(["Hello", "class"], {"max_new_tokens": 3})
    with pytest.raises(InvalidRequest):
        eng.predict([""], {})
    eng.close()
    ok, bad = [json.loads(line) for line in (tmp_path / "inf.jsonl").read_text().splitlines()]
    assert ok["n_rows"] == 2 and ok["completion_tokens"] == 6 and ok["batch_size"] == 2
    assert ok["finish_reason"] == "length" and ok["latency_ms"] > 0 and ok["error"] is None
    assert bad["status"] == "invalid" and "empty" in bad["error"]


# ---------------------------------------------------------------- the logged pyfunc model

def experiment_in(tmp: Path, name: str) -> str:
    """An experiment whose artifacts live under ``tmp`` (the sqlite store's default is ./mlruns)."""
    import mlflow

    return mlflow.create_experiment(name, artifact_location=(tmp / "artifacts").as_uri())


@pytest.fixture(scope="module")
def logged(tiny_model_dir, tmp_path_factory):
    import mlflow

    from lifecycle.serving import log_model

    exp = experiment_in(tmp_path_factory.mktemp("serving-artifacts"), f"serving-{time.time_ns()}")
    with mlflow.start_run(experiment_id=exp) as run:
        info = log_model(tiny_model_dir, tags={"data_digest": "abc"}, model_config={"cpu_threads": 1})
    return info, run.info.run_id


def test_log_model_is_self_contained(logged):
    import mlflow
    from mlflow.models import Model

    info, run_id = logged
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    meta = Model.load(str(local / "MLmodel"))
    pyfunc_conf = meta.flavors["python_function"]
    assert (local / pyfunc_conf["code"] / "lifecycle" / "serving" / "model.py").is_file()
    assert not list((local / pyfunc_conf["code"]).rglob("__pycache__"))
    reqs = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in reqs) and all("==" in r for r in reqs if not r.startswith("-"))
    assert (local / "artifacts" / "model" / "model.safetensors").is_file()
    params = {p.name for p in meta.signature.params.params}
    assert params == {"max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "seed", "stop",
                      "repetition_penalty", "truncate"}
    assert meta.run_id == run_id


def test_pyfunc_predict_matches_engine(logged, engine):
    import mlflow
    from mlflow.exceptions import MlflowException

    info, _ = logged
    model = mlflow.pyfunc.load_model(info.model_uri)
    out = model.predict(PROMPTS[:2], params={"max_new_tokens": 6})
    assert list(out.text) == list(engine.predict(PROMPTS[:2], {"max_new_tokens": 6}).text)
    with pytest.raises(MlflowException, match="unknown param 'max_tokens'") as err:
        model.predict(["x"], params={"max_tokens": 3})
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="between 1 and 512"):
        model.predict(["x"], params={"max_new_tokens": 100000})


@pytest.mark.e2e
def test_logged_model_loads_from_another_directory_without_the_checkout(logged, tmp_path):
    info, _ = logged
    checkout = Path(__file__).resolve().parents[1]
    # Hide the checkout (its editable install and every path inside it) but keep the virtualenv's own
    # site-packages, which often lives inside the checkout (.venv/) or beside it (<checkout>-venv):
    # paths are compared as resolved paths, never as string prefixes.
    script = f"""
import sys, json
from pathlib import Path
checkout, venv = Path({str(checkout)!r}), Path(sys.prefix).resolve()
def in_checkout(entry):
    path = Path(entry or ".").resolve()
    return path.is_relative_to(checkout) and not path.is_relative_to(venv)
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if not in_checkout(p)]
import mlflow
m = mlflow.pyfunc.load_model({info.model_uri!r})
import lifecycle
out = m.predict(["Hello"], params={{"max_new_tokens": 3}})
print(json.dumps({{"file": lifecycle.__file__, "tokens": int(out.completion_tokens[0])}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 3
    loaded_from = Path(result["file"]).resolve()
    assert "/code/lifecycle/" in result["file"] and not loaded_from.is_relative_to(checkout), result["file"]


# ---------------------------------------------------------------- lifecycle serve (refusals before exec)

def test_serve_refuses_bad_settings_and_unknown_models(tracking_uri, capsys):
    from lifecycle.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "any-model", "--max-batch-size", "0"])
    assert exc.value.code == 2
    assert "max_batch_size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "no-such-model", "--alias", "production"])
    assert exc.value.code == 5
    assert "no-such-model" in capsys.readouterr().err
