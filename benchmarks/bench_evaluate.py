"""Evaluation speed: batched loss evaluation vs a naive loop, and a whole `evaluate` run.

Prints, from one run:
  * loss evaluation tokens/s of ``lifecycle.evaluate.loss.block_losses`` (batched, under
    ``torch.inference_mode``) next to a naive loop measured on the same blocks (one block per
    forward, autograd on, ``model(labels=...)``), and their ratio (target: >= 2);
  * bits-per-byte tokens/s over the same text (windows of the model's context);
  * the wall time of a complete ``evaluate_model`` on the test split of a prepared copy of the
    built-in corpus (target: seconds, not minutes, on the tiny preset), split into its parts.

No MLflow server is needed: the full run logs to a sqlite file in a temporary folder.

    python benchmarks/bench_evaluate.py --quick     # tiny preset (CPU: < 2 minutes)
    python benchmarks/bench_evaluate.py             # small preset, more blocks
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


def naive_loss(model, blocks, device: str) -> float:
    """What a first attempt looks like: one block per forward, autograd bookkeeping left on."""
    import torch

    start = time.perf_counter()
    total = 0.0
    for row in blocks:
        ids = torch.as_tensor(row, dtype=torch.long, device=device)[None]
        total += float(model(input_ids=ids, labels=ids).loss.detach())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, fewer blocks (< 2 minutes on a CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON (benchmarks/run_all.py)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lifecycle.data.sources import pydoc_documents
    from lifecycle.data.tokenizer import train_tokenizer
    from lifecycle.evaluate import loss
    from lifecycle.train.model import build_model, save_model_dir

    preset = "tiny" if args.quick else "small"
    device = loss.resolve_device(args.device)
    docs = list(pydoc_documents())
    tok = train_tokenizer([docs[:150]], vocab_size=512 if args.quick else 4096)
    model = build_model(preset, tok, seed=0).to(device).eval()
    block = 64 if args.quick else 256
    blocks = loss.pack_documents(tok, docs[150:], block)[: 128 if args.quick else 512]
    n_tokens = blocks.size

    naive = naive_loss(model, blocks, device)
    batched = loss.block_losses(model, blocks, batch_size=32, device=device, progress=False)
    print(f"preset={preset} device={device} blocks={len(blocks)}x{block} ({n_tokens} tokens)")
    print(f"loss eval naive (1 block/forward, autograd on): {n_tokens / naive:10.0f} tokens/s  ({naive:.2f} s)")
    print(f"loss eval batched, inference_mode (bs=32):     {batched.tokens_per_s:10.0f} tokens/s  "
          f"({batched.seconds:.2f} s)")
    print(f"ratio batched/naive: {batched.tokens_per_s / (n_tokens / naive):.1f}x (target >= 2)")
    bpb = loss.document_nll(model, tok, docs[150:170], batch_size=32, device=device, progress=False)
    print(f"bits-per-byte: {int(bpb.num_tokens.sum())} tokens in {bpb.seconds:.2f} s = "
          f"{bpb.num_tokens.sum() / bpb.seconds:.0f} tokens/s")

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        import mlflow

        exp = mlflow.MlflowClient().create_experiment("bench-evaluate", artifact_location=Path(tmp, "art").as_uri())
        os.environ["MLFLOW_EXPERIMENT_ID"] = exp
        from lifecycle.cli import main as cli

        data = Path(tmp) / "prepared"
        t0 = time.perf_counter()
        try:
            cli(["prepare", "--source", "builtin:pydoc", "--output", str(data), "--vocab-size", "512",
                 "--block-size", "64", "--max-documents", "400"])
        except SystemExit as exc:
            if exc.code:
                raise
        prep_s = time.perf_counter() - t0
        from transformers import AutoTokenizer

        from lifecycle.config import load_config
        from lifecycle.evaluate.config import EvalConfig
        from lifecycle.evaluate.run import evaluate_model

        ptok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
        model_dir = save_model_dir(build_model("tiny", ptok, seed=0), ptok, Path(tmp) / "model")
        cfg = load_config(EvalConfig, None, ["latency.requests=4"] if args.quick else [])
        t0 = time.perf_counter()
        out = evaluate_model(str(model_dir), str(data), cfg=cfg, progress=False)
        total = time.perf_counter() - t0
        m = out.metrics
        print(f"full evaluate (tiny preset, test split {int(m['num_blocks'])} blocks, {int(m['num_prompts'])} prompts, "
              f"latency bs {cfg.latency.batch_sizes} x {cfg.latency.requests} requests): {total:.1f} s "
              f"(prepare of the data, not counted: {prep_s:.1f} s)")
        print(f"  eval/loss_tokens_per_s={m['loss_tokens_per_s']:.0f}  eval/latency_p50_ms={m['latency_p50_ms']:.1f}  "
              f"eval/latency_p95_ms_bs8={m['latency_p95_ms_bs8']:.1f}  "
              f"eval/tokens_per_s_bs8={m['tokens_per_s_bs8']:.0f}")
    from benchmarks._report import write_json

    naive_tps = n_tokens / naive
    write_json("evaluate", {"preset": preset, "device": str(device), "tokens": int(n_tokens),
                            "loss_naive_tokens_per_s": round(naive_tps, 1),
                            "loss_batched_tokens_per_s": round(batched.tokens_per_s, 1),
                            "bpb_tokens_per_s": round(float(bpb.num_tokens.sum() / bpb.seconds), 1),
                            "full_evaluate_s": round(total, 2),
                            "metrics": {k: m[k] for k in ("loss_tokens_per_s", "latency_p50_ms", "latency_p95_ms_bs8",
                                                          "tokens_per_s_bs8") if k in m}},
               ratios={"loss_batched_vs_naive": round(batched.tokens_per_s / naive_tps, 2),
                       "full_evaluate_s": round(total, 2), "target": "loss_batched_vs_naive >= 2"}, path=args.json)


if __name__ == "__main__":
    main()
