"""The GPU check (benchmarks/gpu_check.py) cannot fail on the GPU machine for a reason a CPU run
would have shown: its CPU mode runs every step with mlflow and datasets unimportable (as they
are there), every step hands over its figures, and a failing or hanging step costs only itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402

#: What the GPU machine lacks, made unimportable in every process of the run.
NO_MLFLOW = 'import sys\nsys.modules["mlflow"] = None\nsys.modules["datasets"] = None\n'


def test_gpu_timeouts_fit_the_budget_and_compiled_variants_come_last():
    names = [s.name for s in gpu_check.STEPS]
    assert names[0] == "facts" and names[-2:] == ["bench_train_compiled", "serve_compiled"]
    assert len(set(names)) == len(names)
    worst = sum(s.gpu_timeout + gpu_check.STOP_GRACE_S for s in gpu_check.STEPS)
    assert worst <= gpu_check.GPU_BUDGET_S == 480
    # Every step writes its figures where the driver reads them, and runs with this interpreter.
    cmd = gpu_check.STEPS[1].command(False, Path("/x/train.json"))
    assert cmd[0] == sys.executable and cmd[-2:] == ["--json", "/x/train.json"]


@pytest.mark.e2e
def test_cpu_mode_runs_every_step_without_mlflow_or_datasets(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_MLFLOW)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop("OUT", None)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    assert {n: s["status"] for n, s in steps.items()} == {n: "ok" for n in steps}, res.stdout[-4000:]
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    fig = {name: step["figures"] for name, step in steps.items()}

    # The sitecustomize reached the steps: they really ran without mlflow and datasets.
    assert fig["facts"]["mlflow_importable"] is False and fig["facts"]["datasets_importable"] is False
    assert fig["facts"]["torch"] and fig["facts"]["matmul_tflops"] > 0 and fig["facts"]["copy_bandwidth_tbps"] > 0
    train = fig["train"]
    assert train["tokens_per_s"] > 0 and train["checkpoint_gib"] > 0 and "checkpoint_stall_s" in train
    assert "resume_error" not in train
    # fp32 on a CPU: the resumed run is the uninterrupted run, bit for bit.
    assert train["resume_identical"] is True and train["resume_steps"] == [5, 6, 7, 8]
    assert train["rerun_max_weight_diff"] == 0.0
    ev = fig["evaluate"]
    for key in ("loss_fp32", "loss_bf16_autocast", "loss_bf16_weights"):
        assert math.isfinite(ev[key]) and 0 < ev[key] < 10, (key, ev)
    assert abs(ev["bf16_weights_minus_fp32"]) < 0.1
    serve = fig["serve"]
    assert [r["batch"] for r in serve["decode"]] == [1, 32]
    assert all(r["tokens_per_s"] > 0 and 0 < r["fraction_of_bound"] < 1 for r in serve["decode"])
    greedy = serve["greedy"]
    assert greedy["rows"] == 8 and greedy["identical_fraction"] == 1.0 and greedy["diverged"] == []
    co = serve["coalescing"]
    assert co["requests"] == 16 and co["on"]["batches"] >= 1 and co["on"]["requests_per_s"] > 0
    for name, vocab in (("bench_train", 500), ("bench_train_vocab64", 512)):
        assert fig[name]["tracking"] == "off" and fig[name]["vocab"] == vocab
        assert fig[name]["tokens_per_s"]["project"] > 0 and fig[name]["tokens_per_s"]["bare"] > 0
    assert fig["bench_train_compiled"]["compile_backend"] == "eager"
    # The engine compiles the static-cache decode on a CPU too when asked, so the dry run exercises it.
    assert fig["serve_compiled"]["decode"] and fig["serve_compiled"]["static_cache_compile"] is True

    head = summary["headline"]
    assert head["steps_ok"] == head["steps"] == len(gpu_check.STEPS)
    assert head["bench_train"]["project_vs_bare"] > 0 and head["serve"]["greedy_identical_fraction"] == 1.0
    log = (out / "steps.log").read_text()
    assert all(f"===== {s.name}: ok in " in log for s in gpu_check.STEPS)
    assert "| serve | ok |" in (out / "summary.md").read_text()
    # What the device run hands back: at most 8 files, none deeper than $OUT/a/b/file.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)


@pytest.mark.tried("gpu check", "a step that writes some figures and then raises, one that hangs past its timeout "
                   "(with a child of its own), then a healthy step",
                   "failed and timed-out steps are recorded with their figures and log tail, the hung process group "
                   "is killed, and the next step still runs; exit status 1")
def test_a_failing_or_hanging_step_costs_only_itself(tmp_path, monkeypatch):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "fails.py").write_text(
        "import json, sys\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "json.dump({'figures': {'measured': 1.5}}, open(path, 'w'))\n"
        "print('measured one figure', flush=True)\n"
        "raise RuntimeError('CUDA error: something broke')\n")
    (scripts / "hangs.py").write_text(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "print('started, now hanging', flush=True)\n"
        "time.sleep(300)\n")
    (scripts / "fine.py").write_text(
        "import json, sys\n"
        "json.dump({'figures': {'ok': True}}, open(sys.argv[sys.argv.index('--json') + 1], 'w'))\n")
    steps = (gpu_check.Step("fails", str(scripts / "fails.py"), (), (), 60, 60),
             gpu_check.Step("hangs", str(scripts / "hangs.py"), (), (), 3, 3),
             gpu_check.Step("fine", str(scripts / "fine.py"), (), (), 60, 60))
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu", "--out", str(out)])
    monkeypatch.delenv("OUT", raising=False)
    started = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    assert stop.value.code == 1
    assert time.monotonic() - started < 40
    summary = json.loads((out / "summary.json").read_text())["steps"]
    assert summary["fails"]["status"] == "failed (exit 1)"
    assert summary["fails"]["figures"] == {"measured": 1.5}
    assert any("RuntimeError: CUDA error: something broke" in line for line in summary["fails"]["log_tail"])
    assert summary["hangs"]["status"] == "timed out after 3 s"
    assert "started, now hanging" in summary["hangs"]["log_tail"]
    assert summary["fine"] == {**summary["fine"], "status": "ok", "figures": {"ok": True}}
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in _state(child), "the hung step's child survived"


def _state(pid: int) -> str:
    """The process state letter from /proc (Z: a zombie, i.e. already dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_mode_without_a_gpu_stops_after_the_facts(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300, check=False)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "no CUDA device visible" in res.stdout
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps["facts"]["status"] == "ok" and steps["facts"]["figures"]["cuda_available"] is False
    assert all(s["status"].startswith("skipped: no CUDA device") for n, s in steps.items() if n != "facts")
