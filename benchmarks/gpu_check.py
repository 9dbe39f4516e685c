"""The GPU check: one prepared run that turns minutes on a lent GPU into figures, not a traceback.

Every step runs as its own process under its own timeout; a step that fails or times out is
recorded and the next one runs. After each step the summary is rewritten, so a run cut short
still hands over everything measured so far. Nothing here needs ``mlflow`` or ``datasets``: the
steps build their data in memory and drive the library's MLflow-free parts directly.

Steps, in order (GPU timeouts add up to under 8 minutes; see :data:`STEPS`):
  facts                 GPU, memory, torch/CUDA versions, bf16 support; measured copy bandwidth and matmul
  train                 the training loop at the GPT-2 shape, 16 x 1024, bf16: tokens/s, MFU, peak memory,
                        a checkpoint and a resume compared with the uninterrupted run (and a rerun, the noise)
  evaluate              evaluation loss of one model in fp32, fp32 under bf16 autocast, and bf16 weights
  serve                 the serving engine: decode tokens/s at batch 1 and 32 against the HBM bound, greedy
                        outputs batched vs one at a time, coalescing of 8 client threads
  bench_train           bench_train.py: project loop vs a bare loop, with MFU
  bench_train_vocab64   the same with the vocabulary padded to a multiple of 64 (50,304)
  bench_train_compiled  the project loop with torch.compile
  serve_compiled        decode with the static KV cache and torch.compile

Output (``$OUT``, else ``--out DIR``): ``summary.json`` (per step: status, seconds, timeout,
command, its figures, the tail of its log when it failed; plus headline figures), ``summary.md``
(the headline table) and ``steps.log`` (every step's output, in order, under a header line).

    PYTHONPATH=. python3 benchmarks/gpu_check.py                 # on the GPU machine (figures under $OUT)
    PYTHONPATH=. python3 benchmarks/gpu_check.py --cpu --out /tmp/gpu-check   # tiny sizes on a CPU

Exit status: 0 when every step passed, 1 when one failed or timed out, 2 when no CUDA device is
visible without ``--cpu`` (after the facts step, which says what the machine has).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_summary import headline, markdown  # noqa: E402

#: The whole check must fit in this on an H200: the GPU timeouts plus a stop grace per step (a test checks).
GPU_BUDGET_S = 480
#: Seconds a timed-out step gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 2

_TRAIN_GPU = ("--preset", "gpt2", "--batch-size", "16", "--seq-len", "1024", "--device", "cuda")
_TRAIN_CPU = ("--preset", "tiny", "--batch-size", "4", "--seq-len", "64", "--device", "cpu", "--steps", "20",
              "--warmup", "5")


@dataclass(frozen=True)
class Step:
    """One step: a script with its arguments on a GPU and on a CPU, and its timeouts."""

    name: str
    script: str
    gpu_args: tuple[str, ...]
    cpu_args: tuple[str, ...]
    gpu_timeout: int
    cpu_timeout: int = 150

    def command(self, cpu: bool, json_path: Path) -> list[str]:
        """The step's command line (run with this interpreter)."""
        return [sys.executable, str(HERE / self.script), *(self.cpu_args if cpu else self.gpu_args),
                "--json", str(json_path)]


STEPS: tuple[Step, ...] = (
    Step("facts", "gpu_steps.py", ("facts",), ("facts", "--cpu"), 25),
    Step("train", "gpu_steps.py", ("train",), ("train", "--cpu"), 75),
    Step("evaluate", "gpu_steps.py", ("evaluate",), ("evaluate", "--cpu"), 45),
    Step("serve", "gpu_serve_check.py", (), ("--cpu",), 85),
    Step("bench_train", "bench_train.py", (*_TRAIN_GPU, "--steps", "40", "--warmup", "8", "--vocab", "50257",
                                           "--only", "project,bare"),
         (*_TRAIN_CPU, "--vocab", "500", "--only", "project,bare"), 50),
    Step("bench_train_vocab64", "bench_train.py", (*_TRAIN_GPU, "--steps", "40", "--warmup", "8", "--vocab", "50304",
                                                   "--only", "project,bare"),
         (*_TRAIN_CPU, "--vocab", "512", "--only", "project,bare"), 40),
    # Compiled variants last: a compile that hangs or fails costs only itself. With a static KV
    # cache each new (batch, length) shape compiles again, so serve_compiled gets the most time.
    Step("bench_train_compiled", "bench_train.py", (*_TRAIN_GPU, "--steps", "20", "--warmup", "5", "--vocab", "50257",
                                                    "--compile", "--only", "project"),
         (*_TRAIN_CPU, "--vocab", "500", "--compile", "--compile-backend", "eager", "--only", "project"), 70),
    Step("serve_compiled", "gpu_serve_check.py", ("--compile", "--parts", "decode"),
         ("--cpu", "--compile", "--parts", "decode"), 70),
)


def child_env() -> dict[str, str]:
    """The steps' environment: this checkout first on PYTHONPATH (keeping what is there, e.g. a
    sitecustomize), offline Hugging Face, unbuffered output so a killed step's log is complete."""
    env = dict(os.environ)
    path = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_step(step: Step, cpu: bool, log_path: Path, work: Path, timeout: float) -> dict[str, Any]:
    """Run one step in its own process group; its status, time, figures and (on failure) log tail."""
    json_path = work / f"{step.name}.json"
    cmd = step.command(cpu, json_path)
    with open(log_path, "ab") as log:
        log.write(f"\n===== {step.name}: {' '.join(cmd[1:])} (timeout {timeout:.0f} s) =====\n".encode())
        log.flush()
        start_at = log.tell()
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(),
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code})"
            reap_group(proc)  # a step's leftovers must not run into the next step
        except subprocess.TimeoutExpired:
            stop_group(proc)
            status = f"timed out after {timeout:.0f} s"
        seconds = round(time.monotonic() - started, 1)
        log.write(f"===== {step.name}: {status} in {seconds} s =====\n".encode())
    result: dict[str, Any] = {"status": status, "seconds": seconds, "timeout_s": timeout, "command": cmd[1:]}
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text())
            result.update(figures=data.get("figures", {}), ratios=data.get("ratios", {}))
        except (OSError, json.JSONDecodeError) as exc:
            result["figures_error"] = f"unreadable figures {json_path.name}: {exc}"
    if status != "ok":
        with open(log_path, "rb") as log:
            log.seek(start_at)
            lines = log.read().decode(errors="replace").replace("\r", "\n").strip().splitlines()
        result["log_tail"] = [line for line in lines if line.strip()][-25:]
    return result


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group, then SIGKILL it after :data:`STOP_GRACE_S`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE_S)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    reap_group(proc)


def reap_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left in the step's process group (e.g. compile workers) and reap the step."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` and ``summary.md``, each written whole (temp file + rename)."""
    summary["headline"] = headline(summary)
    for name, text in (("summary.json", json.dumps(summary, indent=2, default=str) + "\n"),
                       ("summary.md", markdown(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def main() -> None:
    """Run the selected steps in order and keep the summary current after each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Steps: " + ", ".join(s.name for s in STEPS))
    parser.add_argument("--cpu", "--quick", dest="cpu", action="store_true",
                        help="every step at tiny sizes on the CPU (a smoke run of the check itself)")
    parser.add_argument("--out", default=None, help="output folder when $OUT is not set (default gpu-check)")
    parser.add_argument("--only", default="", help="comma list of steps to run (default: all, in order)")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    known = [s.name for s in STEPS]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    out = Path(os.environ.get("OUT") or args.out or "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "steps.log"
    log_path.write_bytes(b"")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    selected = [s for s in STEPS if not names or s.name in names]
    summary: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                            time.gmtime()),
                               "python": sys.executable, "steps": {s.name: {"status": "pending"} for s in selected}}
    write_summary(out, summary)
    exit_code = 0
    for i, step in enumerate(selected, 1):
        timeout = step.cpu_timeout if args.cpu else step.gpu_timeout
        print(f"[gpu_check] {i}/{len(selected)} {step.name} (timeout {timeout} s) ...", flush=True)
        summary["steps"][step.name] = {"status": "running", "timeout_s": timeout}
        write_summary(out, summary)
        res = run_step(step, args.cpu, log_path, work, timeout)
        summary["steps"][step.name] = res
        write_summary(out, summary)
        print(f"[gpu_check] {step.name}: {res['status']} in {res['seconds']} s", flush=True)
        if res["status"] != "ok":
            exit_code = 1
            print("    " + "\n    ".join(res.get("log_tail", [])[-6:]), flush=True)
        # Facts that ran and saw no GPU end a GPU-mode run (GPU-sized steps on a CPU would only
        # exhaust its memory); facts that failed say nothing about the GPU, so the steps still run.
        if step.name == "facts" and not args.cpu and res.get("figures", {}).get("cuda_available") is False:
            for rest in selected[i:]:
                summary["steps"][rest.name] = {"status": "skipped: no CUDA device visible (use --cpu for a CPU run)"}
            write_summary(out, summary)
            print("[gpu_check] no CUDA device visible: stopping after the facts step; use --cpu for the CPU smoke run",
                  flush=True)
            exit_code = 2
            break
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_summary(out, summary)
    print((out / "summary.md").read_text(), flush=True)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
