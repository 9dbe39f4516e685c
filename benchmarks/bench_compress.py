"""Compression trade-off: parameters, size, generation speed and bits-per-byte of every method beside its parent.

One run, end to end through the library exactly as `lifecycle compress` does it: prepare the
built-in corpus, train a model of ``--preset`` for ``--steps``, register it, then make each
``--methods`` variant (int8-dynamic, fp16, bf16, prune at ``--amount`` with a distillation
recovery of ``--recovery-steps``, distill into a fresh ``--student`` for ``--student-steps``, and
distill-pruned: a student that starts as the parent pruned by ``--amount``, distilled for
``--student-steps``), evaluate it with its parent as the baseline (same data, same machine, same
process) and register it. Prints each variant's trade-off table and one summary with the ratios
variant / parent side by side, and the default policy's verdict on the quality loss.

Pruning's recovery and a pruned student's distillation train the model further on the training
split, so "pruned vs parent" mixes two effects. The **control** separates them: a copy of the
parent trained for the same number of steps with the same data, learning rate, batch size and
schedule (the same loop, plain LM loss, nothing removed), registered and evaluated exactly like
the variants. "pruned vs control" is the quality pruning itself costs.

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
    parser.add_argument("--methods", default="int8-dynamic,fp16,bf16,prune,distill,distill-pruned",
                        help="comma-separated: int8-dynamic, fp16, bf16, prune, distill (a fresh --student), "
                             "distill-pruned (the student starts as the parent pruned by --amount)")
    parser.add_argument("--amount", default="0.3", help="prune, distill-pruned: fraction of block parameters removed")
    parser.add_argument("--importance", default="taylor", help="prune: taylor, activation or magnitude")
    parser.add_argument("--recovery-steps", type=int, default=None,
                        help="prune: distillation steps after pruning (default: 100, --quick 10)")
    parser.add_argument("--student", default="tiny", choices=["tiny", "small"],
                        help="distill: the fresh student's preset (smaller than --preset)")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="distill, distill-pruned: the student's steps (default: the parent's, --quick 10)")
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


#: Benchmark label -> the `lifecycle compress --method` it runs.
METHOD_OF = {"distill-pruned": "distill"}


def structural_config(args: argparse.Namespace, label: str):
    """The prune/distill settings of ``label`` from the benchmark's flags (what the CLI's flags and `--set` give)."""
    from lifecycle.config import load_config
    from lifecycle.optimize.prune import parse_amount
    from lifecycle.optimize.structural import StructuralConfig

    overrides = [f"distill.steps={training_steps(args, label)}",
                 f"distill.eval_every={max(training_steps(args, label) // 2, 1)}",
                 f"prune.importance={args.importance}"]
    return load_config(StructuralConfig, None, overrides, preset=args.student if label == "distill" else None,
                       prune_student=label == "distill-pruned", **{"prune.amount": parse_amount(args.amount)})


def training_steps(args: argparse.Namespace, label: str) -> int:
    """Steps a structural variant trains for (prune: the recovery; a distilled student: its own)."""
    return args.recovery_steps if label == "prune" else args.student_steps


def control(args: argparse.Namespace, parent_version: str, data: Path, ecfg, steps: int) -> dict:
    """The parent trained ``steps`` further with plain LM loss and nothing removed, evaluated like the variants.

    The same loop and settings as the recovery (:func:`lifecycle.optimize.distill.train_student`
    with ``kd_weight=0``, whose loss is then the model's own LM loss): same data, learning rate,
    batch size, warm-up, seed and best-validation weights. Registered as ``bench-compress-control``
    and scored by the same evaluation, with the parent as baseline.
    """
    import copy
    import dataclasses
    import tempfile

    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lifecycle.evaluate.run import evaluate_model
    from lifecycle.optimize.distill import train_student
    from lifecycle.serving import log_model
    from lifecycle.serving.variant import choose_device
    from lifecycle.tracking import resolve_model_dir
    from lifecycle.train.model import save_model_dir
    from lifecycle.train.run import resolve_data

    t0 = time.perf_counter()
    parent_uri = f"models:/bench-compress/{parent_version}"
    parent_dir = resolve_model_dir(parent_uri)
    device = choose_device(ecfg.device, "prune")
    teacher = AutoModelForCausalLM.from_pretrained(str(parent_dir), dtype=torch.float32)
    dcfg = dataclasses.replace(structural_config(args, "prune").distill, steps=steps,
                               eval_every=max(steps // 2, 1), kd_weight=0.0)
    prepared, _ = resolve_data(str(data), search_runs=False)
    result = train_student(copy.deepcopy(teacher), teacher, prepared, dcfg, device=device)
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        folder = save_model_dir(result.model.to("cpu").eval(), AutoTokenizer.from_pretrained(str(parent_dir)),
                                Path(tmp) / "model")
        with mlflow.start_run(run_name=f"control-{steps}-steps"):
            info = log_model(folder, name="model", registered_model_name="bench-compress-control")
    uri = f"models:/bench-compress-control/{info.registered_model_version}"
    # bits/byte does not depend on the latency settings: skip them, the rest is the variants' evaluation.
    ev = evaluate_model(uri, str(data), cfg=dataclasses.replace(ecfg, latency=dataclasses.replace(
        ecfg.latency, enabled=False)), baseline=parent_uri, progress=False)
    return {"steps": steps, "uri": uri, "bits_per_byte": ev.metrics["bits_per_byte"],
            "best_val_loss": result.best_val_loss, "time_s": time.perf_counter() - t0}


def run(args: argparse.Namespace, work: Path, steps: int, small: bool) -> None:
    from lifecycle.cli import main as cli
    from lifecycle.config import load_config
    from lifecycle.evaluate.config import EvalConfig
    from lifecycle.optimize.compress import compress, format_table
    from lifecycle.policies import load_policy
    from lifecycle.train.config import ModelShape, TrainConfig
    from lifecycle.train.model import get_preset
    from lifecycle.train.run import train

    t0 = time.perf_counter()
    block = 256 if small else 64
    try:  # the same command a user runs
        cli(["prepare", "--source", "builtin:pydoc", "--output", str(work / "data"),
             "--vocab-size", str(4096 if small else 512), "--block-size", str(block)])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    # A `tiny` parent gets one more layer than its preset, so that a fresh `tiny` student is smaller
    # than its teacher (compress refuses one that is not) and --quick still runs every method.
    shape = ModelShape(n_layer=get_preset("tiny").n_layer + 1) if args.preset == "tiny" else ModelShape()
    cfg = TrainConfig(preset=args.preset, model=shape, max_steps=steps, batch_size=8, eval_every=max(steps // 4, 1),
                      eval_batches=8,
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
    figures: dict = {"preset": args.preset, "steps": steps, "best_val_loss": parent.best_val_loss, "controls": {}}
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    order = ["tiny", "small", "gpt2"]  # the presets by size
    # A student preset must be smaller than the parent: a smaller preset, or `tiny` under the 3-layer tiny parent.
    smaller = order.index(args.student) < order.index(args.preset) or args.student == args.preset == "tiny"
    if "distill" in labels and not smaller:
        # compress refuses a student preset that is not smaller than its teacher (no compression).
        print(f"skipping distill: the --student preset {args.student} is not smaller than the parent's "
              f"{args.preset}")
        labels.remove("distill")
    controls: dict = {}
    for label in labels:
        t1 = time.perf_counter()
        method = METHOD_OF.get(label, label)
        out = compress("bench-compress", parent.version, method, data=str(work / "data"), cfg=ecfg, progress=False,
                       structural=structural_config(args, label))
        print(f"== {label} (v{out.version}, measured on {out.device}, {time.perf_counter() - t1:.0f} s)")
        print(format_table(out.rows))
        base, variant = out.rows
        loss = variant["bits_per_byte"] / base["bits_per_byte"] - 1
        verdict = "within" if bound is None or loss <= (bound.max_regression or float("inf")) else "OVER"
        print(f"bits/byte loss {loss:+.3%} vs the default policy's bound {bound.max_regression:.0%}: {verdict}")
        shape = {k: out.tags[f"compress/{k}"] for k in ("student_init", "amount_achieved", "dropped_layers",
                                                         "n_layer", "n_inner") if f"compress/{k}" in out.tags}
        if shape:
            print("shape: " + ", ".join(f"{k} {v}" for k, v in shape.items()))
        vs_control = float("nan")
        if label in ("prune", "distill-pruned"):
            n = training_steps(args, label)
            if n not in controls:
                controls[n] = control(args, parent.version, work / "data", ecfg, n)
                figures["controls"][str(n)] = controls[n]
            c = controls[n]
            vs_control = variant["bits_per_byte"] / c["bits_per_byte"] - 1
            print(f"control (the parent trained {n} more steps, nothing removed; {c['time_s']:.0f} s): "
                  f"bits/byte {c['bits_per_byte']:.4f} ({c['bits_per_byte'] / base['bits_per_byte'] - 1:+.3%} vs "
                  f"parent); {label} vs control {vs_control:+.3%}")
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
        summary.append((label, out.device, params, variant["size_ratio"], speed[0]["ratio"], speed[1]["ratio"],
                        variant["bits_per_byte"], loss, vs_control, variant["time_s"]))
        figures[label] = {"rows": out.rows, "version": out.version, "bits_per_byte_rel_loss": loss,
                          "bits_per_byte_rel_vs_control": vs_control, "within_default_policy": verdict == "within",
                          "interleaved_speed": speed, "shape": shape}
    parent_bpb = out.rows[0]["bits_per_byte"] if labels else float("nan")
    print(f"Summary ({args.preset} preset, ratios variant / parent measured side by side in one process; "
          f"parent bits/byte {parent_bpb:.4f}):")
    print(f"{'method':<16}{'device':>7}{'params':>8}{'bytes':>8}{'tokens/s bs1':>14}{'tokens/s bs8':>14}"
          f"{'bits/byte':>11}{'vs parent':>11}{'vs control':>12}{'time s':>8}")
    for label, device, params, size, tps1, tps8, bpb, rel, vs_c, spent in summary:
        control_text = f"{vs_c:>+12.2%}" if vs_c == vs_c else f"{'-':>12}"
        print(f"{label:<16}{device:>7}{params:>7.2f}x{size:>7.2f}x{tps1:>13.2f}x{tps8:>13.2f}x{bpb:>11.4f}"
              f"{rel:>+11.2%}{control_text}{spent:>8.0f}")
    for n, c in sorted(controls.items()):
        print(f"control, parent + {n} steps (plain LM loss){'':<3}bits/byte {c['bits_per_byte']:.4f} "
              f"({c['bits_per_byte'] / parent_bpb - 1:+.2%} vs parent)")
    print("(tokens/s: median per-round ratio of interleaved requests through the serving engine; vs control: "
          "bits/byte against the parent trained as many steps as the variant, nothing removed)")
    from benchmarks._report import write_json

    ratios = {}
    for label, _, params, size, tps1, tps8, _, rel, vs_c, _ in summary:
        key = label.replace("-", "_")
        ratios.update({f"{key}_params_vs_parent": round(params, 4), f"{key}_size_vs_parent": round(size, 4),
                       f"{key}_tokens_per_s_bs1_vs_parent": round(tps1, 4),
                       f"{key}_tokens_per_s_bs8_vs_parent": round(tps8, 4),
                       f"{key}_bits_per_byte_rel_loss": round(rel, 6)})
        if vs_c == vs_c:
            ratios[f"{key}_bits_per_byte_rel_vs_control"] = round(vs_c, 6)
    write_json("compress", figures, ratios=ratios, path=args.json)


if __name__ == "__main__":
    main()
