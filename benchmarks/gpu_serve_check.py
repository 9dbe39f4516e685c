"""The serving engine on the GPU: decode speed against the memory-bandwidth bound, greedy
outputs of a batch against the same prompts one at a time, and coalescing of 8 client threads.

1. Decode tokens/s at batch 1 and 32 (the ``gpt2`` preset with GPT-2's vocabulary, random
   weights built from config) beside the bound a decode step cannot beat: each step reads every
   weight once plus the KV cache of every row, so ``batch / ((weight bytes + KV bytes) / HBM
   bandwidth)`` tokens/s is the ceiling (4.8 TB/s: the H200's HBM3e; ``--bandwidth-tbps``).
2. Greedy generation of 32 prompts of different lengths as one left-padded batch vs each alone:
   equal in fp32 on a CPU (tested in the suite); in bf16 on CUDA the kernels of a padded batch
   differ, so this reports the fraction of rows that are identical, where the first divergent
   rows part, and the logit difference there next to the top-2 logit margin (a divergence where
   the margin is below the difference is a near-tie settled by rounding, not a bug).
3. 8 threads sending single-prompt requests to one engine, coalescing on vs off.

It drives :class:`lifecycle.serving.engine.Engine`, the MLflow-free core of the pyfunc model
(bf16 + KV cache on CUDA, ``torch.inference_mode``; ``--compile`` adds the static cache and
``torch.compile``), so it runs without ``mlflow``; the pyfunc wrapper under ``mlflow models
serve`` is measured by ``bench_serve.py`` where MLflow is installed.

    PYTHONPATH=. python3 benchmarks/gpu_serve_check.py            # on the GPU machine
    PYTHONPATH=. python3 benchmarks/gpu_serve_check.py --cpu      # tiny sizes on a CPU
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._models import GPT2_VOCAB, corpus_tokenizer, model_dir, prompts  # noqa: E402
from benchmarks._report import Figures  # noqa: E402

PARTS = ("decode", "greedy", "coalesce")


def sync(device: Any) -> None:
    """Wait for the device, so wall time covers the work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(engine: Any, texts: list[str], new_tokens: int, repeats: int) -> tuple[float, int]:
    """Median seconds of one predict and the completion tokens it produced."""
    times, produced = [], 0
    for _ in range(repeats):
        sync(engine.device)
        start = time.perf_counter()
        out = engine.predict(texts, {"max_new_tokens": new_tokens})
        sync(engine.device)
        times.append(time.perf_counter() - start)
        produced = int(out["completion_tokens"].sum())
    return statistics.median(times), produced


def decode_vs_bound(engine: Any, batches: list[int], new_tokens: int, prompt_words: int, repeats: int,
                    bandwidth_tbps: float) -> list[dict[str, Any]]:
    """Decode tokens/s per batch size next to the bandwidth bound (weights + KV cache per step)."""
    model = engine.model
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    words = "the value of an object is returned by the function when the loop ends".split()
    rows = []
    for batch in batches:
        texts = [" ".join(words[(i + j) % len(words)] for j in range(prompt_words)) for i in range(batch)]
        width = max(len(ids) for ids in engine.tokenizer(texts)["input_ids"])
        timed(engine, texts, new_tokens + 1, 1)  # warm this shape (and compile it, with --compile)
        prefill_s, first = timed(engine, texts, 1, repeats)
        total_s, produced = timed(engine, texts, new_tokens + 1, repeats)
        decode_tokens = produced - first
        decode_s = max(total_s - prefill_s, 1e-9)
        # A decode step reads the K and V of every layer for every position so far, padding included.
        kv_bytes = batch * (width + new_tokens / 2) * cfg.n_layer * 2 * cfg.n_embd * elem
        step_floor_s = (weight_bytes + kv_bytes) / (bandwidth_tbps * 1e12)
        measured = decode_tokens / decode_s
        bound = batch / step_floor_s
        steps = max(1.0, decode_tokens / batch)
        rows.append({"batch": batch, "prompt_tokens": width, "decode_tokens": decode_tokens,
                     "decode_s": round(decode_s, 4), "tokens_per_s": round(measured, 1),
                     "bandwidth_bound_tokens_per_s": round(bound, 1),
                     "fraction_of_bound": float(f"{measured / bound:.4g}"),
                     "step_ms": round(decode_s / steps * 1e3, 3), "step_floor_ms": round(step_floor_s * 1e3, 4),
                     "weight_bytes": weight_bytes, "kv_bytes_per_step": int(kv_bytes),
                     "prefill_ms": round(prefill_s * 1e3, 2)})
        print(f"batch {batch:>3}: decode {measured:>10.1f} tokens/s (bound {bound:>11.1f}, "
              f"{measured / bound * 100:6.2f}%; {rows[-1]['step_ms']:.2f} ms/step vs floor "
              f"{step_floor_s * 1e3:.3f} ms; prefill {rows[-1]['prefill_ms']:.1f} ms)", flush=True)
    return rows


def greedy(model: Any, tokenizer: Any, batch_ids: list[list[int]], new_tokens: int) -> tuple[list[list[int]], Any]:
    """Greedy tokens of each row (cut after EOS) and the per-step logits, ``[steps][rows, vocab]``.

    Left padding with an attention mask, as ``lifecycle.serving.generate.generate_batch`` pads."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(len(ids) for ids in batch_ids)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch_ids], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch_ids], device=device)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos,
                              use_cache=True, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rows = []
    for toks in out.sequences[:, width:].tolist():
        rows.append(toks[: toks.index(eos) + 1] if eos in toks else toks)
    return rows, [step.float().cpu() for step in out.logits]


def batched_vs_single(engine: Any, n: int, new_tokens: int) -> dict[str, Any]:
    """Compare greedy outputs of ``n`` prompts of different lengths, batched vs one at a time."""
    texts = prompts(n)
    batch_ids = [engine.tokenizer(t)["input_ids"] for t in texts]
    batched, batched_logits = greedy(engine.model, engine.tokenizer, batch_ids, new_tokens)
    diverged = []
    drift = 0.0  # how far the first step's logits of a row move when it is padded into the batch
    for i, ids in enumerate(batch_ids):
        (single,), single_logits = greedy(engine.model, engine.tokenizer, [ids], new_tokens)
        drift = max(drift, float((single_logits[0][0] - batched_logits[0][i]).abs().max()))
        if single == batched[i]:
            continue
        pos = next((p for p, (a, b) in enumerate(zip(single, batched[i])) if a != b), min(len(single), len(batched[i])))
        row: dict[str, Any] = {"row": i, "prompt_tokens": len(ids), "first_divergence": pos}
        if pos < len(single_logits) and pos < len(batched_logits):
            a, b = single_logits[pos][0], batched_logits[pos][i]
            top2 = a.topk(2).values
            row.update(logit_max_abs_diff=round(float((a - b).abs().max()), 5),
                       single_top2_margin=round(float(top2[0] - top2[1]), 5))
        diverged.append(row)
    firsts = [d["first_divergence"] for d in diverged]
    result = {"rows": n, "new_tokens": new_tokens, "dtype": str(next(engine.model.parameters()).dtype),
              "identical_fraction": round(1 - len(diverged) / n, 4), "diverged": diverged,
              "first_divergence_min": min(firsts) if firsts else None,
              "first_divergence_median": statistics.median(firsts) if firsts else None,
              "first_step_logit_max_abs_diff": round(drift, 5),
              "near_ties": sum(1 for d in diverged
                               if d.get("single_top2_margin", math.inf) <= d.get("logit_max_abs_diff", 0.0))}
    print(f"greedy batched vs single: {result['identical_fraction']:.1%} of {n} rows identical over {new_tokens} "
          f"tokens; first divergence at {firsts or '-'}; first-step logit drift {drift:.4g}", flush=True)
    return result


def coalescing(engine: Any, threads: int, per_thread: int, new_tokens: int) -> dict[str, Any]:
    """``threads`` clients, ``per_thread`` single-prompt requests each, coalescing on vs off."""
    texts = prompts(threads * per_thread)
    coalescer = engine.coalescer
    out: dict[str, Any] = {"threads": threads, "requests": threads * per_thread, "new_tokens": new_tokens}
    for label, c in (("off", None), ("on", coalescer)):
        engine.coalescer = c
        engine.predict([texts[0]], {"max_new_tokens": new_tokens})  # warm
        before = (c.stats.batches, c.stats.rows) if c is not None else (0, 0)
        gate = threading.Barrier(threads)

        def client(i: int) -> list[float]:
            gate.wait()
            lat = []
            for r in range(per_thread):
                start = time.perf_counter()
                engine.predict([texts[i * per_thread + r]], {"max_new_tokens": new_tokens})
                lat.append(time.perf_counter() - start)
            return lat

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            lat = sorted(x for xs in pool.map(client, range(threads)) for x in xs)
        wall = time.perf_counter() - start
        row = {"wall_s": round(wall, 3), "requests_per_s": round(len(lat) / wall, 2),
               "p50_ms": round(lat[len(lat) // 2] * 1e3, 1),
               "p99_ms": round(lat[min(len(lat) - 1, int(.99 * len(lat)))] * 1e3, 1)}
        if c is not None:
            batches, rows = c.stats.batches - before[0], c.stats.rows - before[1]
            row.update(batches=batches, mean_batch=round(rows / max(batches, 1), 2), largest_batch=c.stats.largest)
        out[label] = row
    engine.coalescer = coalescer
    out["on_vs_off"] = round(out["on"]["requests_per_s"] / out["off"]["requests_per_s"], 3)
    print(f"coalescing, {threads} threads: {out['on']['requests_per_s']} req/s on vs {out['off']['requests_per_s']} "
          f"off ({out['on_vs_off']}x), mean batch {out['on'].get('mean_batch')}", flush=True)
    return out


def main() -> None:
    """Build the model, load it in the engine, run the asked parts, write the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", "--quick", dest="cpu", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--preset", default=None, help="model preset (default gpt2; tiny with --cpu)")
    parser.add_argument("--bandwidth-tbps", type=float, default=4.8, help="HBM bandwidth in TB/s (H200: 4.8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps measured (default 128; 8 --cpu)")
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--compile", action="store_true", help="static KV cache + torch.compile (CUDA only)")
    parser.add_argument("--json", metavar="PATH", help="write the figures here as they are measured")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    preset = args.preset or ("tiny" if args.cpu else "gpt2")
    new_tokens = args.new_tokens or (8 if args.cpu else 128)
    repeats = 1 if args.cpu else 3
    batches = [int(b) for b in args.batches.split(",")]

    from lifecycle.serving.engine import Engine
    from lifecycle.serving.settings import ServingConfig

    fig = Figures("gpu_check.serve" + (".compiled" if args.compile else ""), args.json)
    import torch

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    tok = (corpus_tokenizer(512, documents=40) if args.cpu else corpus_tokenizer(8192, fill_to=GPT2_VOCAB))
    folder = model_dir(Path(tempfile.mkdtemp(prefix="gpu-serve-check-")) / "model", preset, tok, device=device)
    config = ServingConfig(device=device, coalesce=True, max_batch_size=max(batches + [32]),
                           max_new_tokens_cap=max(new_tokens + 1, 64), compile=args.compile, batch_wait_ms=5)
    engine = Engine(folder, config)
    start = time.perf_counter()
    engine.warmup()
    params = sum(p.numel() for p in engine.model.parameters())
    fig.add(device=str(engine.device), dtype=str(next(engine.model.parameters()).dtype), preset=preset,
            vocab=len(tok), params_m=round(params / 1e6, 1), static_cache_compile=engine.static_cache,
            bandwidth_tbps=args.bandwidth_tbps, warmup_s=round(time.perf_counter() - start, 2))
    print(f"device={engine.device} preset={preset} params={params / 1e6:.1f}M compile={engine.static_cache}",
          flush=True)
    if "decode" in parts:
        rows: list[dict[str, Any]] = []
        for batch in batches:  # one at a time, so a timeout (a long compile) keeps the rows measured
            rows += decode_vs_bound(engine, [batch], new_tokens, 8 if args.cpu else args.prompt_words, repeats,
                                    args.bandwidth_tbps)
            fig.add(decode=rows, ratios={f"decode_fraction_of_bound_b{batch}": rows[-1]["fraction_of_bound"]})
    if "greedy" in parts:
        fig.add(greedy=batched_vs_single(engine, 8 if args.cpu else 32, 8 if args.cpu else 32))
    if "coalesce" in parts:
        c = coalescing(engine, 8, 2 if args.cpu else 4, 4 if args.cpu else 32)
        fig.add(coalescing=c, ratios={"coalescing_on_vs_off_8_threads": c["on_vs_off"]})
    engine.close()


if __name__ == "__main__":
    main()
