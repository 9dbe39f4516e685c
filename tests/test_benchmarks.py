"""`benchmarks/run_all.py` as a smoke test: the registry and monitoring benchmarks in their quick
modes, run as processes, hand over their figures as JSON and end up in one summary + table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def test_run_all_quick_writes_json_and_markdown(mlflow_server, tmp_path):
    out = tmp_path / "bench"
    env = {**__import__("os").environ, "LIFECYCLE_BENCH_MLFLOW_SERVER": mlflow_server.url}
    env.pop("MLFLOW_TRACKING_URI", None)  # the benchmarks pick their own tracking stores
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"),
                          "--quick", "--only", "registry,monitor",
                          "--out", str(out), "--timeout", "300"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True
    machine = summary["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["mlflow"] and machine["torch"] and machine["date"]
    reg = summary["benchmarks"]["registry"]
    assert reg["status"] == "ok", reg
    ratios = reg["ratios"]
    for key in ("promote_api_median_ms", "rollback_api_median_ms", "promote_cli_median_ms", "rollback_cli_median_ms"):
        assert ratios[key] > 0, key
    figures = reg["figures"]
    # The round-trip budget of a promotion and a rollback (issue #5): a regression shows here.
    assert 0 < figures["promote_api"]["requests"] <= 16 and 0 < figures["rollback_api"]["requests"] <= 12, figures
    assert figures["concurrent"]["consistent"] is True
    assert set(figures["concurrent"]["exit_codes"]) <= {0, 5, 9}
    mon = summary["benchmarks"]["monitor"]
    assert mon["status"] == "ok" and mon["ratios"]["psi_numpy_vs_python"] > 0
    table = (out / "summary.md").read_text()
    assert "| registry | promote median, in-process API (ms) |" in table
    assert "| monitor | PSI, numpy vs pure Python |" in table
    assert machine["cpu"] in table and f"mlflow {machine['mlflow']}" in table
    assert (out / "registry.log").is_file() and (out / "monitor.log").is_file()


def test_bench_train_full_mode_sizes_itself_for_the_device():
    """Issue #19: the full mode ran GPT-2 at 16 x 1024 in fp32 on a CPU and was killed for memory
    (24 GB) after 80 s; on a CPU it now takes CPU-sized shapes, on a GPU the GPT-2 shape."""
    from benchmarks.bench_train import SHAPES, shape_for

    gpu, cpu = shape_for(False, "cuda"), shape_for(False, "cpu")
    assert (gpu["preset"], gpu["batch_size"], gpu["seq_len"], gpu["vocab"]) == ("gpt2", 16, 1024, 50257)
    assert shape_for(True, "cuda") == shape_for(True, "cpu") == SHAPES["quick"]
    assert cpu["preset"] != "gpt2"
    # The fp32 logits and their gradient alone were 2 x 16 x 1024 x 50257 x 4 bytes = 6.6 GB; keep them small.
    assert 2 * cpu["batch_size"] * cpu["seq_len"] * cpu["vocab"] * 4 < 2**30


def test_bench_compress_quick_compares_every_method(tmp_path):
    """Issue #14: the compression benchmark's quick mode runs every method (pruning and distillation
    included) side by side and hands over parameter, size, speed and quality ratios."""
    out = tmp_path / "compress.json"
    env = {**__import__("os").environ, "LIFECYCLE_CPU_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the benchmark keeps its own sqlite store
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compress.py"), "--quick", "--threads", "1",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    ratios = report["ratios"]
    for method in ("int8_dynamic", "fp16", "bf16", "prune", "distill", "distill_pruned"):
        for key in ("params", "size", "tokens_per_s_bs1", "tokens_per_s_bs8"):
            assert ratios[f"{method}_{key}_vs_parent"] > 0, (method, key)
    # The pruned variant really is smaller (amount 0.3 of the block parameters), the others keep every parameter.
    assert ratios["prune_params_vs_parent"] < 0.9 and ratios["int8_dynamic_params_vs_parent"] == 1.0
    # A student that starts as the parent pruned by the same amount has the pruned model's size.
    assert ratios["distill_pruned_params_vs_parent"] == ratios["prune_params_vs_parent"]
    # Both pruned models are also compared with a control (the parent trained as long, nothing removed).
    figures = report["figures"]
    assert set(figures["controls"]) == {"10"} and figures["distill-pruned"]["shape"]["student_init"] == "pruned:0.3"
    control = figures["controls"]["10"]["bits_per_byte"]
    for method in ("prune", "distill_pruned"):
        label = method.replace("_", "-")
        assert ratios[f"{method}_bits_per_byte_rel_vs_control"] == pytest.approx(
            figures[label]["rows"][1]["bits_per_byte"] / control - 1, abs=1e-6)
    assert "Summary (tiny preset" in res.stdout


def test_bench_budget_quick_scores_both_models_with_one_function(tmp_path):
    """Issue #17's headline benchmark in its quick mode: both models trained, both scored on the
    same held-out text, the budget's figures handed over as JSON (the 2-minute figures are in
    docs/benchmarks.md; a time or quality threshold here would fail on a loaded machine)."""
    out = tmp_path / "budget.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_budget.py"), "--quick",
                          "--keep", str(tmp_path / "work"), "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    ours, ref = figures["ours"], figures["reference"]
    assert ours["steps"] == ours["planned_steps"] >= 1 and 0 < ours["time_used_s"]
    assert figures["budget_s"] == 10.0 and ours["vocab"] >= 512 and ours["shape"]["n_layer"] >= 2
    assert ref["iterations"] >= 1 and ref["seconds"] >= 9.9 or ref["iterations"] == 2000
    # Both scored on the same held-out bytes: an untrained model is near log2(vocab) bits per token.
    assert 0 < ours["bits_per_byte"] < 8 and 0 < ref["bits_per_byte"] < 8
    assert "bits/byte: ours" in res.stdout


def test_bench_train_switches_compare_each_config_key_on_real_text(tmp_path):
    """Issue #17: every CPU switch runs through the project's loop and reports its ratio and final loss."""
    out = tmp_path / "switches.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick",
                          "--switches", "reference,fused_adamw,threads_1", "--steps", "2", "--warmup", "1",
                          "--vocab", "512", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]["switches"]
    assert set(figures) == {"reference", "fused_adamw", "threads_1"}
    assert figures["reference"]["vs_reference"] == 1.0
    for fig in figures.values():
        assert fig["tokens_per_s"] > 0 and 0 < fig["final_loss"] < 10
    # Fused AdamW is the same algorithm: the same loss after the same steps (to float rounding).
    assert abs(figures["fused_adamw"]["loss_delta"]) < 1e-3
