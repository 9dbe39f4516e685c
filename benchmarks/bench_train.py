"""Training throughput side by side: the project's loop (tracking on) vs a bare loop vs HF Trainer.

Same model shape, micro-batch, sequence length and number of steps, run in turn in one process;
prints tokens/s of each and the ratios. On a GPU it also prints MFU (bf16 autocast) and peak
memory. The full mode sizes itself for the device: the GPT-2 shape at 16 x 1024 on a GPU, the
``small`` preset at 8 x 256 (20 steps) on a CPU (GPT-2 at 16 x 1024 in fp32 needs more than 24 GB of RAM).
Where ``mlflow`` is not installed the project's loop runs with its metrics kept in memory (the
output says ``tracking=off``); HF Trainer is fed a plain torch dataset (no ``datasets`` needed).

    python benchmarks/bench_train.py --quick            # CPU, about a minute
    python benchmarks/bench_train.py --switches         # the CPU throughput switches side by side

``--switches`` runs the project's loop once per TrainConfig switch (``fused_adamw``, ``precision=bf16``
autocast, ``compile`` with inductor, ``threads=1``) against the reference settings (plain AdamW, fp32,
eager, torch's default threads) and prints tokens/s, the ratio and the final loss of each, so a
switch that is faster but changes the numbers shows it. The data is in-memory token blocks indexed
per step (no loader worker to tune: a batch is one tensor gather).
    python benchmarks/bench_train.py --preset gpt2 --steps 300 --batch-size 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._models import GPT2_VOCAB, PEAK_BF16_TFLOPS, Vocab, build_on, flops_per_token  # noqa: E402
from lifecycle.precision import tf32  # noqa: E402
from lifecycle.train.config import TrainConfig  # noqa: E402
from lifecycle.train.data import PreparedData  # noqa: E402
from lifecycle.train.distributed import DistContext, pick_device  # noqa: E402
from lifecycle.train.model import get_preset  # noqa: E402

#: Sizes per mode: --quick, and the full mode on a GPU and on a CPU.
SHAPES = {
    "quick": dict(preset="small", steps=12, warmup=3, batch_size=8, seq_len=128, vocab=4096),
    "gpu": dict(preset="gpt2", steps=100, warmup=10, batch_size=16, seq_len=1024, vocab=GPT2_VOCAB),
    "cpu": dict(preset="small", steps=20, warmup=4, batch_size=8, seq_len=256, vocab=4096),
}


def shape_for(quick: bool, device_type: str) -> dict[str, Any]:
    """The default sizes: ``--quick``'s, else the full ones for this kind of device."""
    return SHAPES["quick" if quick else ("gpu" if device_type == "cuda" else "cpu")]


def tracking_available() -> bool:
    """Whether the project's loop can log to MLflow here (the GPU machine has no mlflow)."""
    return importlib.util.find_spec("mlflow") is not None


def compiled(module: Any, args: Any) -> Any:
    """``torch.compile`` with the chosen backend (``eager`` checks graph capture in seconds on a
    CPU, where inductor's C++ build takes most of a minute)."""
    return torch.compile(module, backend=args.compile_backend)


class Timer:
    """Wall time between the end of warmup step ``warmup`` and the last step."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.t0: float | None = None
        self.t1: float | None = None
        self.steps = 0

    def step(self, n: int) -> None:
        if n < self.warmup:
            return
        if self.device.type == "cuda" and n == self.warmup:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if n == self.warmup:
            self.t0 = now
        else:
            self.t1, self.steps = now, n - self.warmup

    def finish(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * self.steps / (self.t1 - self.t0)


def run_project(args: Any, model: Any, data: PreparedData, device: torch.device) -> float:
    """The project's Trainer with an MLflow run and the asynchronous metric sink (metrics kept in
    memory instead where mlflow is not installed)."""
    from lifecycle.train.loop import Trainer

    timer = Timer(device, args.warmup)
    total = args.warmup + args.steps
    inductor = args.compile and args.compile_backend == "inductor"
    cfg = TrainConfig(max_steps=total, batch_size=args.batch_size, eval_every=10**9, eval_batches=1,
                      checkpoint_every=10**9, progress=True, compile=inductor, warmup_steps=2,
                      precision="auto", output=tempfile.mkdtemp(prefix="bench-ckpt-"))

    def fit(sink: Callable[[Any, int], None]) -> None:
        def log(metrics: Any, step: int) -> None:
            sink(metrics, step)
            if "train/loss" in metrics:
                timer.step(step)

        trainer = Trainer(cfg, model, data, ctx=DistContext(device=device), log=log, checkpoints=None)
        if args.compile and not inductor:
            trainer.forward_model = compiled(trainer.forward_model, args)  # TrainConfig.compile means inductor
        trainer.fit()

    if tracking_available():
        import mlflow

        from lifecycle.tracking import AsyncMetricLogger
        from lifecycle.train.callbacks import MetricSink

        with mlflow.start_run(run_name="bench_train") as run:
            logger = AsyncMetricLogger(run.info.run_id)
            fit(MetricSink(logger))
            logger.close()
    else:
        kept: list[tuple[Any, int]] = []
        fit(lambda metrics, step: kept.append((dict(metrics), step)))
    if timer.t1 is None:
        raise RuntimeError("no steps timed")
    return timer.tokens_per_s(args.batch_size * args.seq_len)


def run_bare(args: Any, model: Any, data: PreparedData, device: torch.device) -> float:
    """Forward, backward, clip, AdamW step: nothing else."""
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    fwd = compiled(model, args) if args.compile else model
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast(device_type="cpu", enabled=False))
    timer = Timer(device, args.warmup)
    n = len(data.train)
    for step in range(1, args.warmup + args.steps + 1):
        i = ((step - 1) * args.batch_size) % (n - args.batch_size)
        x = data.train[i: i + args.batch_size].to(device, non_blocking=True)
        with amp:
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.step(step)
    timer.finish()
    return timer.tokens_per_s(args.batch_size * args.seq_len)


class Blocks(torch.utils.data.Dataset):
    """Token blocks as HF Trainer's examples (``input_ids`` = ``labels``), without ``datasets``."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def run_hf(args: Any, model: Any, data: PreparedData, device: torch.device) -> float:
    """transformers' Trainer with its defaults for logging and saving turned off."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    timer = Timer(device, args.warmup)

    class Clock(TrainerCallback):
        def on_step_end(self, targs: Any, state: Any, control: Any, **kw: Any) -> None:
            timer.step(state.global_step)

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4, max_grad_norm=1.0, logging_steps=10**6, save_strategy="no", report_to="none",
            bf16=device.type == "cuda", use_cpu=device.type != "cuda", dataloader_num_workers=0,
            torch_compile=args.compile, torch_compile_backend=args.compile_backend if args.compile else None,
            disable_tqdm=True, seed=0)
        Trainer(model=model, args=targs, train_dataset=Blocks(data.train), callbacks=[Clock()]).train()
    timer.finish()
    return timer.tokens_per_s(args.batch_size * args.seq_len)


#: --switches: each variant is the reference settings plus these TrainConfig keys.
SWITCHES: dict[str, dict[str, Any]] = {
    "reference": {"fused_adamw": False},
    "fused_adamw": {"fused_adamw": True},
    "bf16_autocast": {"fused_adamw": False, "precision": "bf16"},
    "threads_1": {"fused_adamw": False, "threads": 1},
    "compile": {"fused_adamw": False, "compile": True},
}


def corpus_blocks(args: Any) -> tuple[PreparedData, Any]:
    """The built-in corpus, BPE-encoded with ``--vocab`` entries and cut into ``--seq-len`` blocks."""
    from benchmarks._models import corpus, corpus_tokenizer

    tok = corpus_tokenizer(args.vocab)
    ids = [i for doc in corpus() for i in (*tok(doc, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    rows = torch.tensor(ids[: len(ids) // args.seq_len * args.seq_len]).view(-1, args.seq_len)
    return PreparedData(root=Path("."), train=rows[8:], validation=rows[:8], tokenizer=tok, card={}), tok


def run_switches(args: Any, data: PreparedData, vocab: Any, names: list[str]) -> dict[str, dict[str, float]]:
    """The project's Trainer once per switch (same seed, model and batches); tokens/s and final loss."""
    from lifecycle.train.loop import Trainer

    out: dict[str, dict[str, float]] = {}
    threads = torch.get_num_threads()
    for name in names:
        torch.set_num_threads(threads)
        model = build_on(torch.device("cpu"), args.preset, vocab, seed=0,
                         n_positions=max(args.seq_len, get_preset(args.preset).n_positions))
        timer = Timer(torch.device("cpu"), args.warmup)
        losses: list[float] = []

        def log(metrics: Any, step: int) -> None:
            if "train/loss" in metrics:
                timer.step(step)
                losses.append(float(metrics["train/loss"]))

        cfg = TrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch_size, eval_every=10**9,
                          eval_batches=1, checkpoint_every=10**9, progress=False, warmup_steps=2, seed=0,
                          **SWITCHES[name])
        Trainer(cfg, model, data, ctx=DistContext(device=torch.device("cpu")), log=log).fit()
        out[name] = {"tokens_per_s": round(timer.tokens_per_s(args.batch_size * args.seq_len), 1),
                     "final_loss": round(losses[-1], 4)}
        print(f"{name:14s} {out[name]['tokens_per_s']:10,.0f} tokens/s   final loss {losses[-1]:.4f}", flush=True)
    torch.set_num_threads(threads)
    base = out.get("reference")
    if base:
        print(f"\npreset={args.preset} batch={args.batch_size} seq={args.seq_len} steps={args.steps} threads={threads}")
        for name, fig in out.items():
            fig["vs_reference"] = round(fig["tokens_per_s"] / base["tokens_per_s"], 3)
            fig["loss_delta"] = round(fig["final_loss"] - base["final_loss"], 4)
            print(f"  {name:14s} {fig['vs_reference']:.3f}x reference   loss {fig['loss_delta']:+.4f}")
    return out


def main() -> None:
    """Run the loops in turn and print tokens/s, ratios and (GPU) MFU and peak memory."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, few steps (CPU smoke run)")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (after warmup)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (GPT-2: 50257; padded to 64: 50304)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--only", default="project,bare,hf", help="comma list of project,bare,hf")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS)
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON (benchmarks/run_all.py)")
    ap.add_argument("--switches", nargs="?", const=",".join(SWITCHES), default=None, metavar="LIST",
                    help=f"compare the CPU switches instead (comma list of {', '.join(SWITCHES)})")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {"project", "bare", "hf"})
    if unknown:
        ap.error(f"unknown loop(s) {', '.join(unknown)} in --only; choose from project, bare, hf")
    device = pick_device(args.device)
    for key, value in shape_for(args.quick, device.type).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tracking = tracking_available() and "project" in names
    if tracking and not os.environ.get("MLFLOW_TRACKING_URI"):
        tmp_tracking = tempfile.mkdtemp(prefix="bench-mlflow-")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_tracking}/mlflow.db"
    # TF32 for every loop measured on CUDA, as the project's loop has it inside fit(): the bare and
    # HF loops do the same math. The stack holds the scope until main() returns (a context manager
    # entered without a reference is collected at once, and its exit would restore the setting).
    precision = contextlib.ExitStack()
    if device.type == "cuda":
        precision.enter_context(tf32(True))
    gen = torch.Generator().manual_seed(0)
    rows = max(4 * args.batch_size, 64)
    vocab = Vocab(args.vocab)
    data = PreparedData(root=Path("."), train=torch.randint(0, args.vocab - 1, (rows, args.seq_len), generator=gen),
                        validation=torch.randint(0, args.vocab - 1, (args.batch_size, args.seq_len), generator=gen),
                        tokenizer=vocab, card={})

    if args.switches:
        from benchmarks._report import write_json

        chosen = [n.strip() for n in args.switches.split(",") if n.strip()]
        if set(chosen) - set(SWITCHES):
            ap.error(f"unknown switch(es) in --switches; choose from {', '.join(SWITCHES)}")
        text_data, tok = corpus_blocks(args)  # real text: a final loss that means something
        figures = run_switches(args, text_data, tok, chosen)
        write_json("train_switches", {"switches": figures, "preset": args.preset, "batch_size": args.batch_size,
                                      "seq_len": args.seq_len, "steps": args.steps},
                   ratios={k: v.get("vs_reference") for k, v in figures.items()}, path=args.json)
        return
    loops: dict[str, Callable[..., float]] = {"project": run_project, "bare": run_bare, "hf": run_hf}
    results: dict[str, float] = {}
    peak_gib: dict[str, float] = {}
    fpt = None
    for name in names:
        model = build_on(device, args.preset, vocab, n_positions=max(args.seq_len, get_preset(args.preset).n_positions),
                         seed=0)
        fpt = fpt or flops_per_token(model, args.seq_len)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results[name] = loops[name](args, model, data, device)
        if device.type == "cuda":
            peak_gib[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        print(f"{name:8s} {results[name]:12,.0f} tokens/s", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    threads = torch.get_num_threads()
    mfu = ({k: round(100 * v * fpt / (args.peak_tflops * 1e12), 2) for k, v in results.items()}
           if device.type == "cuda" and fpt else None)
    print(f"\npreset={args.preset} batch={args.batch_size} seq={args.seq_len} vocab={args.vocab} steps={args.steps} "
          f"device={device} threads={threads} compile={args.compile and args.compile_backend} "
          f"tracking={'mlflow' if tracking else 'off'}")
    for name, tps in results.items():
        line = f"  {name:8s} {tps:12,.0f} tokens/s"
        if "bare" in results:
            line += f"   {tps / results['bare']:.3f}x bare"
        if mfu:
            line += f"   MFU {mfu[name]:.1f}%   peak {peak_gib[name]:.1f} GiB"
        print(line)
    if "project" in results and "bare" in results:
        ratio = results["project"] / results["bare"]
        print(f"project/bare = {ratio:.3f} (target >= 0.95){'' if ratio >= 0.95 else '  BELOW TARGET'}")
    if "project" in results and "hf" in results:
        print(f"project/hf   = {results['project'] / results['hf']:.3f}")
    from benchmarks._report import write_json

    ratios = {f"{n}_vs_bare": round(results[n] / results["bare"], 3)
              for n in results if "bare" in results and n != "bare"}
    if "project" in results and "hf" in results:
        ratios["project_vs_hf"] = round(results["project"] / results["hf"], 3)
    write_json("train", {"tokens_per_s": {k: round(v, 1) for k, v in results.items()}, "preset": args.preset,
                         "batch_size": args.batch_size, "seq_len": args.seq_len, "vocab": args.vocab,
                         "steps": args.steps,
                         "warmup": args.warmup, "device": str(device), "threads": threads, "compile": args.compile,
                         "compile_backend": args.compile_backend if args.compile else None,
                         "tracking": "mlflow" if tracking else "off", "flops_per_token": fpt,
                         "peak_tflops": args.peak_tflops, "mfu_pct": mfu, "peak_memory_gib": peak_gib or None},
               ratios={**ratios, "target": "project_vs_bare >= 0.95"}, path=args.json)
    if math.isnan(sum(results.values())):
        sys.exit(1)


if __name__ == "__main__":
    main()
