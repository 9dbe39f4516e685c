"""What a checkpoint costs the training loop: synchronous writes vs the background writer.

Runs the project's Trainer three times on the same model and data: without checkpoints, saving
every ``--every`` steps synchronously, and saving every ``--every`` steps in the background
(``checkpoint_background``). Prints the wall time of each and the loop time one save costs.

    python benchmarks/bench_checkpoint.py                    # small preset on the CPU, about a minute
    python benchmarks/bench_checkpoint.py --preset gpt2 --steps 60 --every 10 --batch-size 8 --seq-len 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import Vocab  # noqa: E402
from lifecycle.train.checkpoint import CheckpointManager  # noqa: E402
from lifecycle.train.config import TrainConfig  # noqa: E402
from lifecycle.train.data import PreparedData  # noqa: E402
from lifecycle.train.distributed import DistContext, pick_device  # noqa: E402
from lifecycle.train.loop import Trainer  # noqa: E402
from lifecycle.train.model import build_model, get_preset  # noqa: E402


class TimedManager(CheckpointManager):
    """The project's CheckpointManager, timing how long a save waits for the previous write."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.wait_s: list[float] = []

    def wait(self) -> Any:
        t0 = time.perf_counter()
        try:
            return super().wait()
        finally:
            self.wait_s.append(time.perf_counter() - t0)


class TimedTrainer(Trainer):
    """The project's Trainer, timing how long each save holds the loop up."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.save_s: list[float] = []

    def save_checkpoint(self, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return super().save_checkpoint(*args, **kw)
        finally:
            self.save_s.append(time.perf_counter() - t0)


def timed_fit(cfg: TrainConfig, args: argparse.Namespace, data: PreparedData,
              device: torch.device) -> tuple[float, list[float], list[float]]:
    """Wall seconds of one ``fit`` (the last write included), the seconds each save held the loop up,
    and of those the seconds spent waiting for the previous write."""
    vocab = Vocab(args.vocab)
    model = build_model(args.preset, vocab, n_positions=max(args.seq_len, get_preset(args.preset).n_positions), seed=0)
    out = tempfile.mkdtemp(prefix="bench-ckpt-")
    try:
        cfg = dataclasses.replace(cfg, output=out)
        manager = TimedManager(out, keep=2)
        trainer = TimedTrainer(cfg, model, data, ctx=DistContext(device=device), checkpoints=manager)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.fit()
        if device.type == "cuda":
            torch.cuda.synchronize()
        # Each save starts with one wait (the manager's first call); later calls are the final joins.
        waits = manager.wait_s[: len(trainer.save_s)] if hasattr(manager, "wait_s") else []
        return time.perf_counter() - t0, trainer.save_s, waits
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    """Time the three variants and print the per-save cost of each."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each variant")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = pick_device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = max(4 * args.batch_size, 64)
    data = PreparedData(root=Path("."), train=torch.randint(0, args.vocab - 1, (rows, args.seq_len), generator=gen),
                        validation=torch.randint(0, args.vocab - 1, (args.batch_size, args.seq_len), generator=gen),
                        tokenizer=Vocab(args.vocab), card={})
    base = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, eval_every=10**9, eval_batches=1,
                       warmup_steps=2, progress=False, preset=args.preset)
    saves = args.steps // args.every
    variants = {"no checkpoints": dict(checkpoint_every=10**9), "sync": dict(checkpoint_every=args.every)}
    if any(f.name == "checkpoint_background" for f in dataclasses.fields(TrainConfig)):
        variants = {"no checkpoints": dict(checkpoint_every=10**9, checkpoint_background=False),
                    "sync": dict(checkpoint_every=args.every, checkpoint_background=False),
                    "background": dict(checkpoint_every=args.every, checkpoint_background=True)}
    times: dict[str, float] = {}
    blocked: dict[str, list[float]] = {}
    waited: dict[str, list[float]] = {}
    for name, kw in variants.items():
        for _ in range(args.repeats):
            wall, saves_s, waits = timed_fit(dataclasses.replace(base, **kw), args, data, device)
            if name not in times or wall < times[name]:
                times[name], blocked[name], waited[name] = wall, saves_s, waits
    n_params = sum(p.numel() for p in build_model(args.preset, Vocab(args.vocab), seed=0).parameters())
    print(f"{args.preset} preset ({n_params / 1e6:.1f}M parameters), {args.steps} steps, a save every {args.every} "
          f"steps ({saves} saves), device {device}; wall time includes the final write")
    for name, t in times.items():
        # The periodic saves (a run without them still saves once at the end).
        s = sorted(blocked[name][:saves]) if name != "no checkpoints" else []
        w = sorted(waited[name][:saves]) if s else []
        extra = (f"  loop held up per save: median {s[len(s) // 2] * 1000:.1f} ms, max {s[-1] * 1000:.1f} ms"
                 + (f" (of which waiting for the previous write: median {w[len(w) // 2] * 1000:.1f} ms)"
                    if w and name == "background" else "") if s else "")
        print(f"  {name:15s} wall {t:7.2f} s{extra}")


if __name__ == "__main__":
    main()
