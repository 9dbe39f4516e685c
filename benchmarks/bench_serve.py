"""Serving benchmark: a real `mlflow models serve`, coalescing on vs off, pyfunc vs bare generate.

Measured side by side in one run and printed as figures and ratios:

1. ``predict`` through the loaded pyfunc model against a bare ``model.generate`` on the same
   batch and the same weights (target: pyfunc >= 0.95x bare);
2. the cost of inference records (JSONL sink on vs off) on single-prompt requests;
3. two real ``mlflow models serve --env-manager local`` processes of the same logged model, one
   with coalescing on and one off: requests/s and p50/p99 latency with 1 and with 16 concurrent
   clients (target: with 16 clients, coalescing >= 2x the throughput of no coalescing on CPU).

    python benchmarks/bench_serve.py --quick      # tiny preset, < 2 minutes on an idle machine
    python benchmarks/bench_serve.py --preset small --requests 256
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model_dir(out: Path, preset: str) -> Path:
    """A preset-shaped GPT-2 with a byte-level BPE trained on CPython's doc topics (no downloads)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lifecycle.train.model import build_model, save_model_dir

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(topics.values()), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    return save_model_dir(build_model(preset, hf, seed=0), hf, out)


def prompts(n: int) -> list[str]:
    """``n`` prompts of varied length from the built-in corpus."""
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).split()
    return [" ".join(words[i * 37:i * 37 + 4 + (i * 7) % 24]) for i in range(n)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_in_process(model_uri: str, batch: int, new_tokens: int, repeats: int, tmp: Path) -> dict[str, float]:
    """pyfunc predict vs bare generate on one batch; record sink on vs off."""
    import mlflow
    import torch
    from transformers import GenerationConfig

    from lifecycle.serving.records import InferenceRecorder

    pm = mlflow.pyfunc.load_model(model_uri)
    engine = pm.unwrap_python_model().engine
    model, tok = engine.model, engine.tokenizer
    texts = prompts(batch)
    params = {"max_new_tokens": new_tokens}
    enc = tok(texts, return_tensors="pt", padding=True)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, use_cache=True)

    def bare() -> None:
        with torch.inference_mode():
            model.generate(**enc, generation_config=config)

    def pyfunc() -> None:
        pm.predict(texts, params=params)

    bare()
    pyfunc()
    # Interleave the two so that load changes on a shared machine hit both alike.
    t_bare, t_pyfunc = [], []
    for _ in range(repeats):
        t_bare.append(median_time(bare, 1))
        t_pyfunc.append(median_time(pyfunc, 1))
    out = {"bare_s": statistics.median(t_bare), "pyfunc_s": statistics.median(t_pyfunc)}

    single = {"max_new_tokens": 4}
    recorder = InferenceRecorder(tmp / "bench-records.jsonl", model_name="bench", model_version="1")
    off, on = [], []
    for i in range(repeats * 5):
        engine.recorder = None
        off.append(median_time(lambda: engine.predict([texts[i % batch]], single), 1))
        engine.recorder = recorder
        on.append(median_time(lambda: engine.predict([texts[i % batch]], single), 1))
    engine.recorder = None
    recorder.close()
    record_cost = recorder_probe(tmp)
    out.update(record_off_ms=statistics.median(off) * 1e3, record_on_ms=statistics.median(on) * 1e3,
               record_write_us=record_cost)
    return out


def recorder_probe(tmp: Path) -> float:
    """Microseconds per record write, measured directly (1000 writes)."""
    from lifecycle.serving.records import InferenceRecorder

    rec = InferenceRecorder(tmp / "probe.jsonl", model_name="bench", model_version="1")
    rows = [{"prompt_tokens": 12, "completion_tokens": 16, "finish_reason": "length", "truncated": False}]
    start = time.perf_counter()
    for _ in range(1000):
        rec.record(latency_ms=3.0, rows=rows, batch_size=4, params={"max_new_tokens": 16})
    rec.close()
    return (time.perf_counter() - start) / 1000 * 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_uri: str, coalesce: bool, tmp: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "LIFECYCLE_COALESCE": str(coalesce).lower(), **extra_env}
    log = open(tmp / f"serve-{'on' if coalesce else 'off'}.log", "wb")  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up in {timeout}s")


def request(url: str, prompt: str, new_tokens: int) -> float:
    body = json.dumps({"inputs": [prompt], "params": {"max_new_tokens": new_tokens}}).encode()
    req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
    return time.perf_counter() - start


def load_round(url: str, clients: int, texts: list[str], new_tokens: int) -> tuple[float, list[float]]:
    """Send ``texts`` (one request each) with ``clients`` concurrent clients: (wall s, latencies)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(lambda t: request(url, t, new_tokens), texts))
    return time.perf_counter() - start, latencies


def load_tests(urls: dict[bool, str], clients: int, total: int, new_tokens: int, rounds: int) -> dict[bool, dict]:
    """Both servers, alternating rounds, so that load changes on a shared machine hit both alike."""
    texts = prompts(total)
    per_round = max(clients, total // rounds)
    wall = {c: 0.0 for c in urls}
    lat: dict[bool, list[float]] = {c: [] for c in urls}
    for url in urls.values():
        for text in texts[:2]:
            request(url, text, new_tokens)  # warm the path
    for r in range(rounds):
        chunk = [texts[(r * per_round + i) % len(texts)] for i in range(per_round)]
        for coalesce, url in urls.items():
            w, l = load_round(url, clients, chunk, new_tokens)
            wall[coalesce] += w
            lat[coalesce].extend(l)
    return {c: {"rps": len(lat[c]) / wall[c], "p50_ms": pct(lat[c], 0.5) * 1e3, "p99_ms": pct(lat[c], 0.99) * 1e3}
            for c in urls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny preset, few requests (< 2 min idle)")
    parser.add_argument("--preset", default=None, help="model preset (default: tiny with --quick, else small)")
    parser.add_argument("--requests", type=int, default=None, help="requests per load test with 16 clients")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="batch of the pyfunc vs bare comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per server / in-process")
    args = parser.parse_args()
    preset = args.preset or ("tiny" if args.quick else "small")
    total16 = args.requests or (48 if args.quick else 192)
    total1 = max(8, total16 // 4)
    repeats = 5 if args.quick else 15

    import mlflow
    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    server_env = {"LIFECYCLE_CPU_THREADS": str(args.threads), "LIFECYCLE_BATCH_WAIT_MS": "5",
                  "LIFECYCLE_MAX_BATCH_SIZE": "32"}
    os.environ.update({"LIFECYCLE_CPU_THREADS": str(args.threads)})
    from lifecycle.serving import log_model

    print(f"preset={preset} new_tokens={args.new_tokens} threads={args.threads} workdir={tmp}", flush=True)
    model_dir = build_model_dir(tmp / "model-src", preset)
    exp = mlflow.create_experiment("bench-serve", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        log_model(model_dir)
    model_uri = f"runs:/{run.info.run_id}/model"

    # Servers start (slowly) while the in-process comparison runs.
    servers = {c: start_server(model_uri, c, tmp, server_env) for c in (True, False)}
    try:
        ip = bench_in_process(model_uri, args.batch, args.new_tokens, repeats, tmp)
        for proc, url in servers.values():
            wait_ready(proc, url)
        results = {}
        urls = {coalesce: url for coalesce, (_, url) in servers.items()}
        for clients, total in ((1, total1), (16, total16)):
            for coalesce, r in load_tests(urls, clients, total, args.new_tokens, rounds=3).items():
                results[(coalesce, clients)] = r
                print(f"  coalesce={'on ' if coalesce else 'off'} clients={clients:2d} "
                      + " ".join(f"{k}={v:.1f}" for k, v in r.items()), flush=True)
    finally:
        for proc, _ in servers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(timeout=30)

    print("\n== serving benchmark ==")
    print(f"pyfunc predict vs bare generate (batch {args.batch}, {args.new_tokens} new tokens): "
          f"bare {ip['bare_s'] * 1e3:.1f} ms, pyfunc {ip['pyfunc_s'] * 1e3:.1f} ms, "
          f"pyfunc speed = {ip['bare_s'] / ip['pyfunc_s']:.3f}x bare (target >= 0.95)")
    print(f"inference records: predict {ip['record_off_ms']:.2f} ms off vs {ip['record_on_ms']:.2f} ms on "
          f"({(ip['record_on_ms'] / ip['record_off_ms'] - 1) * 100:+.1f}%); one record write = "
          f"{ip['record_write_us']:.1f} us")
    print(f"{'server':<16}{'clients':>8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for (coalesce, clients), r in sorted(results.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        print(f"{'coalesce on' if coalesce else 'coalesce off':<16}{clients:>8}{r['rps']:>10.1f}"
              f"{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}")
    for clients in (1, 16):
        ratio = results[(True, clients)]["rps"] / results[(False, clients)]["rps"]
        target = " (target >= 2.0)" if clients == 16 else ""
        print(f"throughput coalescing on/off with {clients} client(s): {ratio:.2f}x{target}")


if __name__ == "__main__":
    main()
