"""Compression trade-off: parameters, size, generation speed and bits-per-byte of every method beside its parent.

One run, end to end through the library exactly as `lifecycle compress` does it: prepare the
built-in corpus, train a model of ``--preset`` for ``--steps``, register it, then make each
``--methods`` variant (int8-dynamic, fp16, bf16, prune at ``--amount`` with a distillation
recovery of ``--recovery-steps``, distill into ``--student`` for ``--student-steps``), evaluate it
with its parent as the baseline (same data, same machine, same process) and register it. Prints
each variant's trade-off table and one summary with the ratios variant / parent side by side,
and the default policy's verdict on the quality loss.

No MLflow server is needed: everything logs to a sqlite file in a temporary folder.

    python benchmarks/bench_compress.py --quick          # tiny preset, every method briefly (a smoke run)
    python benchmarks/bench_compress.py                  # small preset: the figures in the docs
    python benchmarks/bench_compress.py --methods int8-dynamic,fp16,bf16 --device cuda
    python benchmarks/bench_compress.py --json out.json  # also hand the figures over as JSON
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 60 steps, short recoveries (a smoke run)")
    parser.add_argument("--preset", default=None, choices=["tiny", "small", "gpt2"],
                        help="default: small (tiny with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: tiny 120, otherwise 200)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved speed rounds (default: 10, --quick 2)")
    parser.add_argument("--methods", default="int8-dynamic,fp16,bf16,prune,distill",
                        help="comma-separated: int8-dynamic, fp16, bf16, prune, distill")
    parser.add_argument("--amount", default="0.3", help="prune: fraction of block parameters removed")
    parser.add_argument("--importance", default="taylor", help="prune: taylor, activation or magnitude")
    parser.add_argument("--recovery-steps", type=int, default=None,
                        help="prune: distillation steps after pruning (default: 100, --quick 10)")
    parser.add_argument("--student", default="tiny", help="distill: the student's preset")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="distill: the student's steps (default: the parent's, --quick 10)")
    parser.add_argument("--device", default="auto", help="device for the half-precision variants (int8: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.preset = args.preset or ("tiny" if args.quick else "small")
    args.rounds = args.rounds or (2 if args.quick else 10)
    small = args.preset != "tiny"
    steps = args.steps or (200 if small else 60 if args.quick else 120)
    args.recovery_steps = args.recovery_steps if args.recovery_steps is not None else (10 if args.quick else 100)
    args.student_steps = args.student_steps or (10 if args.quick else steps)
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"] = str(work / "artifacts")
        run(args, work, steps, small)


def interleaved_speed(parent_dir: Path, variant_dir: Path, device: str, *, rounds: int, batch: int,
                      new_tokens: int) -> dict:
    """Generation tokens/s of parent and variant through the serving engine, timed alternately.

    The evaluation measures one model after the other; on a shared machine a load change between
    the two skews that ratio. Here both are loaded at once and each round times one request of
    each (order alternating), so every round's ratio sees the same conditions; the median of the
    per-round ratios is the figure.
    """
    import statistics

    from lifecycle.serving.engine import Engine
    from lifecycle.serving.settings import ServingConfig

    cfg = ServingConfig(device=device, coalesce=False)
    engines = {"parent": Engine(parent_dir, cfg), "variant": Engine(variant_dir, cfg)}
    prompts = ["def main(argv):", "The class statement", "Exceptions are raised", "A module is"] * 8
    params = {"max_new_tokens": new_tokens, "do_sample": False}
    rates: dict = {k: [] for k in engines}
    try:
        for engine in engines.values():
            engine.warmup()
        for r in range(rounds):
            order = ("parent", "variant") if r % 2 == 0 else ("variant", "parent")
            for key in order:
                start = time.perf_counter()
                frame = engines[key].predict(prompts[:batch], params)
                rates[key].append(float(frame["completion_tokens"].sum()) / (time.perf_counter() - start))
    finally:
        for engine in engines.values():
            engine.close()
    ratios = [v / p for v, p in zip(rates["variant"], rates["parent"])]
    return {"batch": batch, "rounds": rounds, "parent_tokens_per_s": statistics.median(rates["parent"]),
            "variant_tokens_per_s": statistics.median(rates["variant"]), "ratio": statistics.median(ratios)}


def structural_config(args: argparse.Namespace, method: str):
    """The prune/distill settings of ``method`` from the benchmark's flags (what `--set` would give)."""
    from lifecycle.config import load_config
    from lifecycle.optimize.prune import parse_amount
    from lifecycle.optimize.structural import StructuralConfig

    steps = args.recovery_steps if method == "prune" else args.student_steps
    overrides = [f"distill.steps={steps}", f"distill.eval_every={max(steps // 2, 1)}",
                 f"prune.importance={args.importance}"]
    return load_config(StructuralConfig, None, overrides, preset=args.student if method == "distill" else None,
                       **{"prune.amount": parse_amount(args.amount)})


def run(args: argparse.Namespace, work: Path, steps: int, small: bool) -> None:
    from lifecycle.cli import main as cli
    from lifecycle.config import load_config
    from lifecycle.evaluate.config import EvalConfig
    from lifecycle.optimize.compress import compress, format_table
    from lifecycle.policies import load_policy
    from lifecycle.train.config import TrainConfig
    from lifecycle.train.run import train

    t0 = time.perf_counter()
    block = 256 if small else 64
    try:  # the same command a user runs
        cli(["prepare", "--source", "builtin:pydoc", "--output", str(work / "data"),
             "--vocab-size", str(4096 if small else 512), "--block-size", str(block)])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    cfg = TrainConfig(preset=args.preset, max_steps=steps, batch_size=8, eval_every=max(steps // 4, 1), eval_batches=8,
                      warmup_steps=max(steps // 20, 1), learning_rate=1e-3 if small else 3e-3, progress=True,
                      system_metrics=False, output=str(work / "ckpt"), model_name="bench-compress")
    parent = train(cfg, str(work / "data"))
    print(f"prepared + trained {args.preset} for {steps} steps in {time.perf_counter() - t0:.0f} s "
          f"(best val/loss {parent.best_val_loss:.3f})\n")
    lean = args.quick
    ecfg = load_config(EvalConfig, None, [
        f"device={args.device}", f"generation.num_prompts={4 if lean else 16}",
        f"generation.max_new_tokens={8 if lean else 16}", "latency.batch_sizes=[1, 8]",
        f"latency.requests={2 if lean else 6}", f"latency.max_new_tokens={16 if lean else 32}",
        f"compare.bootstrap_samples={200 if lean else 1000}", "compare.default_to_production=false"])
    policy = load_policy(ROOT / "registry_policies" / "default.yaml")
    bound = policy.production.compression
    summary = []
    figures: dict = {"preset": args.preset, "steps": steps, "best_val_loss": parent.best_val_loss}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t1 = time.perf_counter()
        out = compress("bench-compress", parent.version, method, data=str(work / "data"), cfg=ecfg, progress=False,
                       structural=structural_config(args, method))
        print(f"== {method} (v{out.version}, measured on {out.device}, {time.perf_counter() - t1:.0f} s)")
        print(format_table(out.rows))
        base, variant = out.rows
        loss = variant["bits_per_byte"] / base["bits_per_byte"] - 1
        verdict = "within" if bound is None or loss <= (bound.max_regression or float("inf")) else "OVER"
        print(f"bits/byte loss {loss:+.3%} vs the default policy's bound {bound.max_regression:.0%}: {verdict}")
        from lifecycle.tracking import resolve_model_dir

        speed = [interleaved_speed(resolve_model_dir(f"models:/bench-compress/{parent.version}"),
                                   resolve_model_dir(out.model_uri), out.device, rounds=args.rounds, batch=b,
                                   new_tokens=16 if lean else 32) for b in (1, 8)]
        for sp in speed:
            print(f"interleaved, batch {sp['batch']}: parent {sp['parent_tokens_per_s']:.1f} tokens/s, variant "
                  f"{sp['variant_tokens_per_s']:.1f} tokens/s, "
                  f"median ratio {sp['ratio']:.2f}x over {sp['rounds']} rounds")
        print()
        params = variant["params"] / base["params"] if base.get("params") else float("nan")
        summary.append((method, out.device, params, variant["size_ratio"], speed[0]["ratio"], speed[1]["ratio"],
                        variant["bits_per_byte_delta"], loss, variant["time_s"]))
        figures[method] = {"rows": out.rows, "version": out.version, "bits_per_byte_rel_loss": loss,
                           "within_default_policy": verdict == "within", "interleaved_speed": speed}
    print(f"Summary ({args.preset} preset, ratios variant / parent measured side by side in one process):")
    print(f"{'method':<14}{'device':>7}{'params':>8}{'bytes':>8}{'tokens/s bs1':>14}{'tokens/s bs8':>14}"
          f"{'Δ bits/byte':>13}{'rel.':>9}{'time s':>8}")
    for method, device, params, size, tps1, tps8, dbpb, rel, spent in summary:
        print(f"{method:<14}{device:>7}{params:>7.2f}x{size:>7.2f}x{tps1:>13.2f}x{tps8:>13.2f}x{dbpb:>+13.4f}"
              f"{rel:>+9.2%}{spent:>8.0f}")
    print("(tokens/s: median per-round ratio of interleaved requests through the serving engine)")
    from benchmarks._report import write_json

    ratios = {}
    for method, _, params, size, tps1, tps8, _, rel, _ in summary:
        key = method.replace("-", "_")
        ratios.update({f"{key}_params_vs_parent": round(params, 4), f"{key}_size_vs_parent": round(size, 4),
                       f"{key}_tokens_per_s_bs1_vs_parent": round(tps1, 4),
                       f"{key}_tokens_per_s_bs8_vs_parent": round(tps8, 4),
                       f"{key}_bits_per_byte_rel_loss": round(rel, 6)})
    write_json("compress", figures, ratios=ratios, path=args.json)


if __name__ == "__main__":
    main()
