"""Run every benchmark of the project in one go; write one JSON file and one Markdown table.

Each benchmark runs as its own process (as a user would run it), one after another so that they
do not skew each other, with ``--quick`` when asked and ``--json PATH`` (or, for a benchmark that
has no such option, ``$LIFECYCLE_BENCH_JSON``) so it hands over its figures. The summary keeps,
per benchmark, its headline ratios (training vs a bare loop, serving vs bare generate and with /
without coalescing, prepare vs the bare tokenizer, registry latencies ...), all its figures, how
long it took, and where its full log is; and once, the machine it was measured on.

    python benchmarks/run_all.py                         # everything, full size (long)
    python benchmarks/run_all.py --quick                 # every benchmark's --quick mode
    python benchmarks/run_all.py --quick --only registry,monitor --out /tmp/bench

Exit status 1 when a benchmark failed or timed out (the others still run and are reported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

#: Benchmark name -> script, in the order they run. A missing script is reported as such.
BENCHMARKS = {
    "train": "bench_train.py",
    "serve": "bench_serve.py",
    "prepare": "bench_prepare.py",
    "registry": "bench_registry.py",
    "evaluate": "bench_evaluate.py",
    "monitor": "bench_monitor.py",
    "compress": "bench_compress.py",
    "predict": "bench_predict.py",
    "budget": "bench_budget.py",
}

#: Readable names and targets of the headline ratios (others are shown under their own key).
LABELS = {
    "project_vs_bare": ("training loop (tracking on) vs a bare loop, tokens/s", ">= 0.95"),
    "hf_vs_bare": ("HF Trainer vs a bare loop, tokens/s", ""),
    "project_vs_hf": ("training loop vs HF Trainer, tokens/s", ""),
    "pyfunc_vs_bare_generate": ("pyfunc predict vs bare generate, speed", ">= 0.95"),
    "records_on_vs_off": ("predict with inference records vs without, speed", "~1"),
    "coalescing_on_vs_off_1_clients": ("serving throughput, coalescing on/off, 1 client", ""),
    "coalescing_on_vs_off_16_clients": ("serving throughput, coalescing on/off, 16 clients", ">= 2"),
    "prepare_vs_bare_1x": ("prepare vs bare tokenizer pass, MB/s (1x corpus)", ">= 0.5"),
    "prepare_vs_bare_10x": ("prepare vs bare tokenizer pass, MB/s (10x corpus)", ">= 0.5"),
    "time_10x_over_1x": ("prepare time, 10x corpus / 1x", "<= 11"),
    "peak_rss_10x_over_1x": ("prepare peak RSS, 10x corpus / 1x", "<= 2"),
    "promote_api_median_ms": ("promote median, in-process API (ms)", "< 1000"),
    "rollback_api_median_ms": ("rollback median, in-process API (ms)", "< 1000"),
    "promote_cli_median_ms": ("promote median, CLI process (ms)", ""),
    "rollback_cli_median_ms": ("rollback median, CLI process (ms)", ""),
    "promote_api_vs_bare_alias_set": ("promote vs a bare alias set", ""),
    "rollback_api_vs_bare_alias_set": ("rollback vs a bare alias set", ""),
    "concurrent_ms_per_call": ("concurrent promote/rollback, ms per call (serialised)", ""),
    "loss_batched_vs_naive": ("batched loss evaluation vs a naive loop, tokens/s", ">= 2"),
    "full_evaluate_s": ("a whole evaluate run, tiny preset (s)", "seconds"),
    "psi_numpy_vs_python": ("PSI, numpy vs pure Python", ""),
    "ks_numpy_vs_python": ("KS statistic, numpy vs pure Python", ""),
    "records_per_s": ("inference records read and parsed per second", ""),
    "predict_vs_one_at_a_time": ("lifecycle predict at batch 16 vs the pyfunc one row at a time, rows/s", ">= 3"),
}


def run_one(name: str, script: Path, out: Path, *, quick: bool, timeout: float) -> dict[str, Any]:
    """Run one benchmark; return its status, figures and headline ratios."""
    json_path = out / f"{name}.json"
    log_path = out / f"{name}.log"
    json_path.unlink(missing_ok=True)
    source = script.read_text(errors="replace")
    cmd = [sys.executable, str(script)]
    if quick and '"--quick"' in source:
        cmd.append("--quick")
    if '"--json"' in source:
        cmd += ["--json", str(json_path)]
    env = {**os.environ, "LIFECYCLE_BENCH_JSON": str(json_path), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = f"timed out after {timeout:.0f} s"
    seconds = time.monotonic() - started
    result: dict[str, Any] = {"status": status, "seconds": round(seconds, 1), "command": cmd[1:], "log": str(log_path)}
    if json_path.is_file():
        data = json.loads(json_path.read_text())
        result.update(ratios=data.get("ratios", {}), figures=data.get("figures", {}))
    else:
        # A benchmark that does not hand over JSON (yet): keep what it printed last.
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        result.update(ratios={}, figures={}, output_tail=tail)
        if status == "ok":
            result["status"] = "ok (no JSON: see output_tail)"
    return result


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (one row per headline ratio), with the machine above it."""
    m = summary["machine"]
    lines = [f"# Benchmarks ({'quick' if summary['quick'] else 'full'} run, {m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}; "
             f"Python {m['python']}, torch {m['torch']}, mlflow {m['mlflow']}, transformers {m['transformers']}.", "",
             "| benchmark | measure | value | target |", "|---|---|---|---|"]
    for name, res in summary["benchmarks"].items():
        ratios = {k: v for k, v in res.get("ratios", {}).items() if k != "target"}
        if not res["status"].startswith("ok") or not ratios:
            lines.append(f"| {name} | {res['status']} ({res.get('seconds', 0):.0f} s) | | |")
            continue
        for key, value in ratios.items():
            label, target = LABELS.get(key, (key, ""))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
            else:
                shown = str(value)
            lines.append(f"| {name} | {label} | {shown} | {target} |")
    lines += ["", "Full figures: the JSON file next to this one; each benchmark's output: its .log file."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the selected benchmarks and write ``summary.json`` and ``summary.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Each benchmark's --quick mode (a smoke run).")
    parser.add_argument("--only", default="", help=f"Comma list of: {', '.join(BENCHMARKS)} (default: all present).")
    parser.add_argument("--out", default="bench-results", help="Folder for summary.json, summary.md and the logs.")
    parser.add_argument("--timeout", type=float, default=None,
                        help="Seconds per benchmark before it is stopped (default: 900 quick, 3600 full).")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    timeout = args.timeout or (900 if args.quick else 3600)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from benchmarks._report import machine

    summary: dict[str, Any] = {"quick": args.quick, "machine": machine(), "benchmarks": {}}
    for name in names:
        script = HERE / BENCHMARKS[name]
        if not script.is_file():
            if args.only:
                summary["benchmarks"][name] = {"status": "missing", "seconds": 0}
            continue
        print(f"[run_all] {name}: {' '.join([script.name] + (['--quick'] if args.quick else []))} ...", flush=True)
        res = run_one(name, script, out, quick=args.quick, timeout=timeout)
        summary["benchmarks"][name] = res
        headline = ", ".join(f"{k}={v}" for k, v in res.get("ratios", {}).items() if k != "target")
        print(f"[run_all] {name}: {res['status']} in {res['seconds']:.0f} s{': ' + headline if headline else ''}",
              flush=True)
    for suffix, text in (("json", json.dumps(summary, indent=2, default=str) + "\n"), ("md", markdown(summary))):
        tmp = out / f"summary.{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"summary.{suffix}")
    print(f"[run_all] wrote {out / 'summary.json'} and {out / 'summary.md'}")
    print((out / "summary.md").read_text())
    if any(not r["status"].startswith("ok") for r in summary["benchmarks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
