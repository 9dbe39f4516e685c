"""Decode throughput of the served model (the ``gpt2`` preset, random weights built from config)
at batch 1 and 32, next to the memory-bandwidth bound.

At small batch a decode step reads every weight once, so ``weight bytes / HBM bandwidth`` is a
floor on the step time: ``batch * bandwidth / weight bytes`` tokens/s is the ceiling we print
beside the measurement (4.8 TB/s is the H200's HBM3e figure; pass another with --bandwidth-tbps).
It runs the same serving engine the pyfunc model runs (bf16 + KV cache on CUDA,
``torch.inference_mode``; ``--compile`` adds the static cache + ``torch.compile`` decode path).

    python benchmarks/gpu_serve_check.py            # on the GPU machine
    python benchmarks/gpu_serve_check.py --quick    # CPU smoke check (few tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GPT2_VOCAB = 50257


def build_gpt2_dir(out: Path, preset: str) -> Path:
    """The preset with GPT-2's vocabulary size: a BPE trained on the built-in corpus, topped up
    with filler tokens so the embedding (and so the weight bytes) has GPT-2's real shape."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lifecycle.train.model import build_model, save_model_dir

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(topics.values()), trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    missing = GPT2_VOCAB - len(hf)
    if missing > 0:
        hf.add_tokens([f"<filler_{i}>" for i in range(missing)])
    return save_model_dir(build_model(preset, hf, seed=0), hf, out)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(engine, texts: list[str], new_tokens: int, repeats: int) -> tuple[float, int]:
    """Median seconds of one predict and the completion tokens it produced."""
    times, produced = [], 0
    for _ in range(repeats):
        sync(engine.device)
        start = time.perf_counter()
        out = engine.predict(texts, {"max_new_tokens": new_tokens})
        sync(engine.device)
        times.append(time.perf_counter() - start)
        produced = int(out.completion_tokens.sum())
    return statistics.median(times), produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few tokens, few repeats (CPU smoke check)")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--bandwidth-tbps", type=float, default=4.8, help="HBM bandwidth in TB/s (H200: 4.8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps measured (default 128; 4 quick)")
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--compile", action="store_true", help="static KV cache + torch.compile (CUDA only)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: CUDA when available)")
    args = parser.parse_args()
    new_tokens = args.new_tokens or (4 if args.quick else 128)
    repeats = 1 if args.quick else 5
    if args.quick:
        args.prompt_words = min(args.prompt_words, 8)
    batches = [int(b) for b in args.batches.split(",")]

    from lifecycle.serving.engine import Engine
    from lifecycle.serving.settings import ServingConfig

    tmp = Path(tempfile.mkdtemp(prefix="gpu-serve-check-"))
    model_dir = build_gpt2_dir(tmp / "model", args.preset)
    config = ServingConfig(device=args.device, coalesce=False, max_batch_size=max(batches),
                           max_new_tokens_cap=max(new_tokens + 1, 2), compile=args.compile)
    engine = Engine(model_dir, config)
    engine.warmup()
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    dtype = next(engine.model.parameters()).dtype
    step_floor_s = weight_bytes / (args.bandwidth_tbps * 1e12)
    print(f"device={engine.device} dtype={dtype} preset={args.preset} params="
          f"{sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M weights={weight_bytes / 1e6:.1f} MB "
          f"static_cache+compile={engine.static_cache} bandwidth={args.bandwidth_tbps} TB/s "
          f"-> step floor {step_floor_s * 1e6:.1f} us", flush=True)
    words = "the value of an object is returned by the function when the loop ends".split()
    results = []
    for batch in batches:
        texts = [" ".join(words[(i + j) % len(words)] for j in range(args.prompt_words)) for i in range(batch)]
        timed(engine, texts, new_tokens + 1, 1)  # warm this shape (and compile it, with --compile)
        prefill_s, first = timed(engine, texts, 1, repeats)
        total_s, produced = timed(engine, texts, new_tokens + 1, repeats)
        decode_tokens = produced - first
        decode_s = max(total_s - prefill_s, 1e-9)
        measured = decode_tokens / decode_s
        bound = batch / step_floor_s
        row = {"batch": batch, "decode_tokens": decode_tokens, "decode_s": round(decode_s, 4),
               "tokens_per_s": round(measured, 1), "bandwidth_bound_tokens_per_s": round(bound, 1),
               "fraction_of_bound": round(measured / bound, 4), "step_ms": round(decode_s / max(1, decode_tokens / batch) * 1e3, 3),
               "prefill_ms": round(prefill_s * 1e3, 2)}
        results.append(row)
        print(f"batch {batch:>3}: decode {measured:>10.1f} tokens/s  (bandwidth bound {bound:>12.1f} tokens/s, "
              f"{measured / bound * 100:6.2f}% of it; {row['step_ms']:.2f} ms/step, prefill {row['prefill_ms']:.1f} ms)",
              flush=True)
    print(json.dumps({"device": str(engine.device), "dtype": str(dtype), "weight_bytes": weight_bytes,
                      "bandwidth_tbps": args.bandwidth_tbps, "results": results}))


if __name__ == "__main__":
    main()
