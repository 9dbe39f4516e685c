"""Serving benchmark: a real `mlflow models serve`, coalescing on vs off, pyfunc vs bare generate.

Measured side by side in one run and printed as figures and ratios:

1. ``predict`` through the loaded pyfunc model (coalescing on, and off) against a bare
   ``model.generate`` on the same batch and the same weights, interleaved; the ratio is the
   median of the per-round ratios (target: pyfunc >= 0.95x bare);
2. the cost of inference records (JSONL sink on vs off) on single-prompt requests, the cheapest
   request and so the one where records weigh most (target: not measurably slower);
3. two real ``mlflow models serve --env-manager local`` processes of the same logged model, one
   with coalescing on and one off: requests/s and p50/p99 latency with 1 and with 16 concurrent
   clients (target: with 16 clients, coalescing >= 2x the throughput of no coalescing on CPU);
4. the canary router (``lifecycle serve --canary``'s routing pyfunc model, production and a
   challenger loaded) at share 0 against the plain coalescing server, 16 clients, alternating
   rounds: the router's overhead (target: at most 5 % lower throughput).

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._models import corpus_tokenizer, model_dir, prompts  # noqa: E402
from lifecycle.serving.launch import serve_env  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model_dir(out: Path, preset: str) -> Path:
    """A preset-shaped GPT-2 with a byte-level BPE trained on CPython's doc topics (no downloads)."""
    return model_dir(out, preset, corpus_tokenizer(1024))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def paired(fns: dict[str, object], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each function, called in turn ``repeats`` times: interleaved, so
    that load changes on a shared machine hit every variant alike, and in an order rotated every
    round (A B C, B C A, C A B), so that whatever a position in the round costs is shared too.

    CPU time (of this process; one torch thread, so the work runs in the calling thread) is what
    a busy shared machine barely disturbs; wall time is the target, and also shows any waiting.
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    for round_ in range(repeats):
        shift = round_ % len(items)
        for name, fn in items[shift:] + items[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def ratio(fast: list[float], slow: list[float]) -> float:
    """Median of the per-round ratios ``fast / slow`` (robust to load that drifts between rounds)."""
    return statistics.median(f / s for f, s in zip(fast, slow))


def bench_in_process(model_uri: str, batch: int, new_tokens: int, repeats: int, tmp: Path) -> dict[str, float]:
    """pyfunc predict (coalescing on and off) vs bare generate on one batch; record sink on vs off."""
    import mlflow
    import torch
    from transformers import GenerationConfig

    from lifecycle.serving.records import InferenceRecorder

    pm = mlflow.pyfunc.load_model(model_uri)
    engine = pm.unwrap_python_model().engine
    coalescer = engine.coalescer
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
        engine.coalescer = coalescer
        pm.predict(texts, params=params)

    def pyfunc_no_coalescing() -> None:
        engine.coalescer = None
        pm.predict(texts, params=params)

    for fn in (bare, pyfunc, pyfunc_no_coalescing):
        fn()
    t, c = paired({"bare": bare, "pyfunc": pyfunc, "pyfunc_off": pyfunc_no_coalescing}, repeats)
    engine.coalescer = coalescer
    out = {"bare_s": statistics.median(t["bare"]), "pyfunc_s": statistics.median(t["pyfunc"]),
           "pyfunc_off_s": statistics.median(t["pyfunc_off"]),
           "pyfunc_x": ratio(t["bare"], t["pyfunc"]), "pyfunc_off_x": ratio(t["bare"], t["pyfunc_off"]),
           "pyfunc_cpu_x": ratio(c["bare"], c["pyfunc"]), "pyfunc_off_cpu_x": ratio(c["bare"], c["pyfunc_off"])}

    # Records cost most, relatively, on the cheapest request: one short prompt, 4 new tokens.
    single = {"max_new_tokens": 4}
    recorder = InferenceRecorder(tmp / "bench-records.jsonl", model_name="bench", model_version="1")

    def record_off() -> None:
        engine.recorder = None
        engine.predict([texts[0]], single)

    def record_on() -> None:
        engine.recorder = recorder
        engine.predict([texts[0]], single)

    # The record's own cost, timed where it runs: inside predict, right after a generate (caches
    # are cold then: 3-5x what the same call costs in a tight loop).
    write_record = engine._record
    in_predict: list[float] = []

    def timed_record(*args, **kwargs) -> None:
        start = time.perf_counter()
        write_record(*args, **kwargs)
        if engine.recorder is not None:
            in_predict.append(time.perf_counter() - start)

    engine._record = timed_record

    # "off" twice: the ratio of the two identical variants is this run's noise floor.
    t, c = paired({"off": record_off, "on": record_on, "off_again": record_off}, repeats * 10)
    engine.recorder = None
    del engine._record
    recorder.close()
    out.update(record_off_ms=statistics.median(t["off"]) * 1e3, record_on_ms=statistics.median(t["on"]) * 1e3,
               record_x=ratio(t["off"], t["on"]), record_cpu_x=ratio(c["off"], c["on"]),
               record_noise_x=ratio(t["off"], t["off_again"]), record_write_us=recorder_probe(tmp),
               record_in_predict_us=statistics.median(in_predict) * 1e6)
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


def start_server(model_uri: str, coalesce: bool, tmp: Path, extra_env: dict[str, str],
                 label: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    label = label or ("on" if coalesce else "off")
    # Every server records (the same small cost on each side): the records show the batch sizes.
    # serve_env puts this interpreter's bin first on PATH: `mlflow models serve` starts uvicorn by
    # name, which fails (exit 127) from a virtualenv that was not activated.
    env = serve_env({**os.environ, "LIFECYCLE_COALESCE": str(coalesce).lower(),
                     "LIFECYCLE_INFERENCE_LOG": str(records_path(tmp, label)), **extra_env})
    log = open(tmp / f"serve-{label}.log", "wb")  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def records_path(tmp: Path, label: bool | str) -> Path:
    if isinstance(label, bool):
        label = "on" if label else "off"
    return tmp / f"records-{label}.jsonl"


def batch_sizes(path: Path, skip: int) -> list[int]:
    """``batch_size`` of each inference record after the first ``skip`` lines."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [json.loads(line)["batch_size"] for line in lines[skip:]]


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


def load_tests(urls: dict, clients: int, total: int, new_tokens: int, rounds: int) -> dict:
    """Every server, alternating rounds, so that load changes on a shared machine hit all alike.

    Each result also holds ``round_rps``: the throughput of each round, for per-round ratios.
    """
    texts = prompts(total)
    per_round = max(clients, total // rounds)
    wall = {c: 0.0 for c in urls}
    lat: dict = {c: [] for c in urls}
    per: dict = {c: [] for c in urls}
    for url in urls.values():
        for text in texts[:2]:
            request(url, text, new_tokens)  # warm the path
    order = list(urls.items())
    for r in range(rounds):
        chunk = [texts[(r * per_round + i) % len(texts)] for i in range(per_round)]
        # Who goes first rotates: whatever the first server of a round pays, all pay alike.
        shift = r % len(order)
        for key, url in order[shift:] + order[:shift]:
            seconds, latencies = load_round(url, clients, chunk, new_tokens)
            wall[key] += seconds
            lat[key].extend(latencies)
            per[key].append(len(chunk) / seconds)
    return {c: {"rps": len(lat[c]) / wall[c], "p50_ms": pct(lat[c], 0.5) * 1e3, "p99_ms": pct(lat[c], 0.99) * 1e3,
                "round_rps": per[c]} for c in urls}


def bench_router_in_process(model_uri: str, router_uri: str, repeats: int) -> dict[str, float]:
    """The router's own cost per request, in process: one prompt, 4 new tokens (the cheapest request, where
    routing weighs most), through the router at share 0 vs the plain pyfunc model, interleaved."""
    import mlflow

    plain, router = mlflow.pyfunc.load_model(model_uri), mlflow.pyfunc.load_model(router_uri)
    text, params = prompts(1)[0], {"max_new_tokens": 4}
    fns = {"plain": lambda: plain.predict([text], params=params),
           "router": lambda: router.predict([text], params=params),
           "plain_again": lambda: plain.predict([text], params=params)}
    for fn in fns.values():
        fn()
    t, c = paired(fns, repeats * 10)
    router.unwrap_python_model().close()
    return {"plain_ms": statistics.median(t["plain"]) * 1e3, "router_ms": statistics.median(t["router"]) * 1e3,
            "router_x": ratio(t["plain"], t["router"]), "router_cpu_x": ratio(c["plain"], c["router"]),
            "noise_x": ratio(t["plain"], t["plain_again"])}


def register_router(model_uri: str, run_id: str, tmp: Path) -> str:
    """Register the logged model twice (production and staging) and save the canary router over them."""
    from mlflow import MlflowClient

    from lifecycle.serving.mlflow_model import save_router_model

    client = MlflowClient()
    client.create_registered_model("bench-serve")
    for alias in ("production", "staging"):
        version = client.create_model_version("bench-serve", model_uri, run_id).version
        client.set_registered_model_alias("bench-serve", alias, version)
    # Share 0: every request is production's; what is measured is the router's own cost.
    return str(save_router_model(tmp / "router", {"model_name": "bench-serve", "challenger_alias": "staging",
                                                  "share": 0.0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny preset, few requests (< 2 min idle)")
    parser.add_argument("--preset", default=None,
                        help="model preset (default: tiny with --quick, else gpt2 on a GPU and small on a CPU)")
    parser.add_argument("--requests", type=int, default=None, help="requests per load test with 16 clients")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="batch of the pyfunc vs bare comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per server / in-process")
    args = parser.parse_args()
    import torch

    preset = args.preset or ("tiny" if args.quick else "gpt2" if torch.cuda.is_available() else "small")
    total16 = args.requests or (48 if args.quick else 192)
    total1 = max(8, total16 // 4)
    repeats = 30 if args.quick else 60

    import mlflow

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    server_env = {"LIFECYCLE_CPU_THREADS": str(args.threads), "LIFECYCLE_BATCH_WAIT_MS": "5",
                  "LIFECYCLE_MAX_BATCH_SIZE": "32"}
    os.environ.update({"LIFECYCLE_CPU_THREADS": str(args.threads)})
    from lifecycle.serving import log_model

    print(f"preset={preset} new_tokens={args.new_tokens} threads={args.threads} workdir={tmp}", flush=True)
    folder = build_model_dir(tmp / "model-src", preset)
    exp = mlflow.create_experiment("bench-serve", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        log_model(folder)
    model_uri = f"runs:/{run.info.run_id}/model"
    router_uri = register_router(model_uri, run.info.run_id, tmp)

    # In-process first, on a machine not also busy starting two servers (that skewed it by ~5%).
    ip = bench_in_process(model_uri, args.batch, args.new_tokens, repeats, tmp)
    servers = {c: start_server(model_uri, c, tmp, server_env) for c in (True, False)}
    ipr = bench_router_in_process(model_uri, router_uri, repeats)
    servers["router"] = start_server(router_uri, True, tmp, server_env, label="router")
    servers["plain_b"] = start_server(model_uri, True, tmp, server_env, label="plain-b")
    try:
        for proc, url in servers.values():
            wait_ready(proc, url)
        results = {}
        urls = {coalesce: url for coalesce, (_, url) in servers.items() if isinstance(coalesce, bool)}
        # The router against the plain coalescing server, and a second plain server (this run's noise):
        # 16 clients, rotating rounds, the median of the per-round throughput ratios.
        routed = load_tests({"plain": urls[True], "plain_again": servers["plain_b"][1],
                             "router": servers["router"][1]}, 16, total16, args.new_tokens, rounds=12)
        print("  router share 0 vs plain: " + " ".join(f"{k}: {v['rps']:.1f} req/s p50 {v['p50_ms']:.1f} ms"
                                                       for k, v in routed.items()), flush=True)
        router_x = ratio(routed["router"]["round_rps"], routed["plain"]["round_rps"])
        noise_x = ratio(routed["plain_again"]["round_rps"], routed["plain"]["round_rps"])
        for clients, total in ((1, total1), (16, total16)):
            seen = {c: len(batch_sizes(records_path(tmp, c), 0)) for c in urls}
            for coalesce, r in load_tests(urls, clients, total, args.new_tokens, rounds=3).items():
                sizes = batch_sizes(records_path(tmp, coalesce), seen[coalesce])
                r.pop("round_rps")
                r["mean_batch"] = statistics.mean(sizes) if sizes else 0.0
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
          f"bare {ip['bare_s'] * 1e3:.1f} ms, pyfunc {ip['pyfunc_s'] * 1e3:.1f} ms "
          f"({ip['pyfunc_off_s'] * 1e3:.1f} ms with coalescing off): pyfunc speed = {ip['pyfunc_x']:.3f}x bare "
          f"({ip['pyfunc_off_x']:.3f}x with coalescing off) (target >= 0.95); "
          f"in CPU time {ip['pyfunc_cpu_x']:.3f}x ({ip['pyfunc_off_cpu_x']:.3f}x off)")
    print(f"inference records (1 prompt, 4 new tokens): predict {ip['record_off_ms']:.2f} ms off vs "
          f"{ip['record_on_ms']:.2f} ms on: speed with records = {ip['record_x']:.3f}x without "
          f"(in CPU time {ip['record_cpu_x']:.3f}x; off vs off again, the noise: {ip['record_noise_x']:.3f}x; "
          f"target: not measurably slower); a record costs {ip['record_in_predict_us']:.0f} us inside predict "
          f"({ip['record_in_predict_us'] / 1e3 / ip['record_off_ms'] * 100:.2f}% of that predict; "
          f"{ip['record_write_us']:.1f} us in a tight loop)")
    print(f"{'server':<16}{'clients':>8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'mean batch':>12}")
    for (coalesce, clients), r in sorted(results.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        print(f"{'coalesce on' if coalesce else 'coalesce off':<16}{clients:>8}{r['rps']:>10.1f}"
              f"{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['mean_batch']:>12.1f}")
    for clients in (1, 16):
        on_off = results[(True, clients)]["rps"] / results[(False, clients)]["rps"]
        target = " (target >= 2.0)" if clients == 16 else ""
        print(f"throughput coalescing on/off with {clients} client(s): {on_off:.2f}x{target}")
    print(f"canary router at share 0 vs production alone, 16 clients: {routed['router']['rps']:.1f} vs "
          f"{routed['plain']['rps']:.1f} req/s; median per-round throughput ratio {router_x:.3f}x (target >= 0.95; "
          f"a second plain server vs the first, the noise: {noise_x:.3f}x); p50 {routed['router']['p50_ms']:.1f} vs "
          f"{routed['plain']['p50_ms']:.1f} ms")
    print(f"router in process (1 prompt, 4 new tokens): {ipr['router_ms']:.2f} vs {ipr['plain_ms']:.2f} ms: speed "
          f"{ipr['router_x']:.3f}x plain (in CPU time {ipr['router_cpu_x']:.3f}x; plain vs plain again, the noise: "
          f"{ipr['noise_x']:.3f}x)")
    # Machine-readable figures for benchmarks/run_all.py (written when $LIFECYCLE_BENCH_JSON is set).
    from benchmarks._report import write_json

    write_json("serve", {"in_process": ip, "servers": {f"coalesce_{'on' if c else 'off'}_clients_{n}": r
                                                       for (c, n), r in results.items()}, "router": routed,
                         "router_in_process": ipr},
               ratios={"router_share0_vs_plain_16_clients": round(router_x, 3),
                       "router_share0_vs_plain_noise": round(noise_x, 3),
                       "router_in_process_vs_plain": round(ipr["router_x"], 3),
                       "pyfunc_vs_bare_generate": round(ip["pyfunc_x"], 3),
                       "records_on_vs_off": round(ip["record_x"], 3),
                       **{f"coalescing_on_vs_off_{n}_clients":
                          round(results[(True, n)]["rps"] / results[(False, n)]["rps"], 2) for n in (1, 16)}})


if __name__ == "__main__":
    main()
