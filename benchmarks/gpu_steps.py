"""Steps of the GPU check (benchmarks/gpu_check.py runs each as its own process): machine facts,
a training-loop smoke with checkpoint and resume, and evaluation loss in fp32 vs bf16.

Each step drives the library's MLflow-free parts directly (``lifecycle.train.loop.Trainer``,
``lifecycle.evaluate.loss``) on data built in memory, so it runs where neither ``mlflow`` nor
``datasets`` is installed. Figures are written to ``--json PATH`` as they are measured.

    PYTHONPATH=. python3 benchmarks/gpu_steps.py facts --json /tmp/facts.json
    PYTHONPATH=. python3 benchmarks/gpu_steps.py train --cpu --json /tmp/train.json
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._models import PEAK_BF16_TFLOPS  # noqa: E402
from benchmarks._report import Figures  # noqa: E402


@dataclass(frozen=True)
class TrainShape:
    """Sizes of the training smoke (GPU: the GPT-2 shape at 16 x 1024 in bf16)."""

    preset: str
    vocab: int
    batch: int
    seq: int
    steps: int
    checkpoint_at: int
    timed_from: int
    precision: str


TRAIN = {"gpu": TrainShape("gpt2", 50257, 16, 1024, 24, 12, 3, "bf16"),
         "cpu": TrainShape("tiny", 512, 4, 64, 8, 4, 1, "fp32")}


@dataclass(frozen=True)
class EvalShape:
    """Sizes of the evaluation step: a briefly trained model scored on held-out blocks."""

    preset: str
    vocab: int
    block: int
    train_steps: int
    batch: int
    eval_blocks: int
    precision: str


EVAL = {"gpu": EvalShape("gpt2", 8192, 1024, 60, 16, 48, "bf16"),
        "cpu": EvalShape("tiny", 512, 64, 15, 8, 16, "fp32")}


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (what a summary shows of an error)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def sync(device: Any) -> None:
    """Wait for the device, so wall time covers the work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- facts ---------------------------------------------------------------------------------


def nvidia_smi() -> dict[str, str] | None:
    """Driver version, clocks and power limit as nvidia-smi reports them (None without it)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    keys = ["name", "driver_version", "memory.total", "clocks.max.sm", "clocks.max.memory", "power.limit"]
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(keys)}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": first_line(exc)}
    return dict(zip(keys, (v.strip() for v in out[0].split(",")))) if out else None


def facts(cpu: bool, fig: Figures) -> None:
    """Versions, the device, bf16 support, and two measured ceilings: copy bandwidth and matmul."""
    import torch
    import transformers

    fig.add(python=platform.python_version(), executable=sys.executable, torch=torch.__version__,
            transformers=transformers.__version__, cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            cuda_available=torch.cuda.is_available(), cpu_threads=torch.get_num_threads(),
            mlflow_importable=importlib.util.find_spec("mlflow") is not None,
            datasets_importable=importlib.util.find_spec("datasets") is not None)
    use_cuda = torch.cuda.is_available() and not cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fig.add(gpu=props.name, gpu_count=torch.cuda.device_count(),
                gpu_memory_gib=round(props.total_memory / 2**30, 1),
                compute_capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                bf16_supported=torch.cuda.is_bf16_supported(), nvidia_smi=nvidia_smi())
    # Measured ceilings, the yardsticks of the later steps' figures.
    dtype = torch.bfloat16 if use_cuda else torch.float32
    n_bytes = (2 << 30) if use_cuda else (64 << 20)
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    reps = 20 if use_cuda else 3
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    copy_s = (time.perf_counter() - start) / reps
    del src, dst
    n = 8192 if use_cuda else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    mm_s = (time.perf_counter() - start) / reps
    fig.add(device=str(device), copy_bandwidth_tbps=round(2 * n_bytes / copy_s / 1e12, 3),
            matmul_tflops=round(2 * n**3 / mm_s / 1e12, 3), matmul_shape=f"{n}x{n}x{n} {str(dtype)[6:]}")


# -- training-loop smoke --------------------------------------------------------------------


def random_data(vocab: int, rows: int, seq: int, val_rows: int) -> Any:
    """Random token blocks as prepared data (a training loop's speed does not depend on text)."""
    import torch

    from benchmarks._models import Vocab
    from lifecycle.train.data import PreparedData

    gen = torch.Generator().manual_seed(0)
    return PreparedData(root=Path("."), train=torch.randint(0, vocab - 1, (rows, seq), generator=gen),
                        validation=torch.randint(0, vocab - 1, (val_rows, seq), generator=gen),
                        tokenizer=Vocab(vocab), card={})


def train_config(s: TrainShape, output: Path, **over: Any) -> Any:
    """The loop's config for the smoke: no evaluation until the end, checkpoints where asked."""
    from lifecycle.train.config import TrainConfig

    base = dict(preset=s.preset, max_steps=s.steps, batch_size=s.batch, learning_rate=6e-4, warmup_steps=2,
                eval_every=10**6, eval_batches=1, checkpoint_every=s.checkpoint_at, keep_checkpoints=4,
                output=str(output), precision=s.precision, progress=False, seed=0)
    return TrainConfig(**{**base, **over})


class Recorder:
    """The loop's ``log`` callable: each step's train loss and the wall time it was reported."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.at: dict[int, float] = {}
        self.val: float | None = None

    def __call__(self, metrics: Any, step: int) -> None:
        if "train/loss" in metrics:
            self.loss[step] = float(metrics["train/loss"])
            self.at[step] = time.perf_counter()  # the loop read the loss back: the step is done
        if "val/loss" in metrics:
            self.val = float(metrics["val/loss"])


def run_loop(s: TrainShape, data: Any, device: Any, work: Path, name: str, *, save: bool,
             resume_from: Path | None = None) -> tuple[Recorder, Any, Any]:
    """One run of the project's loop, checkpointing at ``s.checkpoint_at`` and the end when
    ``save``; (recorder, result, checkpoint manager or None)."""
    from benchmarks._models import Vocab, build_on
    from lifecycle.train.checkpoint import CheckpointManager
    from lifecycle.train.distributed import DistContext
    from lifecycle.train.loop import Trainer
    from lifecycle.train.model import get_preset

    rec = Recorder()
    checkpoints = CheckpointManager(work / name, keep=4) if save else None
    model = build_on(device, s.preset, Vocab(s.vocab), n_positions=max(s.seq, get_preset(s.preset).n_positions), seed=0)
    trainer = Trainer(train_config(s, work / name), model, data, ctx=DistContext(device=device), log=rec,
                      checkpoints=checkpoints, resume_from=resume_from)
    return rec, trainer.fit(), checkpoints


def complete_checkpoint(checkpoints: Any, step: int, wait_s: float = 60.0) -> Path:
    """The complete checkpoint of ``step`` (waiting a while, should it still be written in the background)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [p for p in checkpoints.checkpoints() if p.name == f"step-{step:08d}"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not found:
        raise RuntimeError(f"no complete checkpoint of step {step} in {checkpoints.root}")
    return found[0]


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weights_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between two state dicts (same keys)."""
    return max(float((a[k].float() - b[k].float().to(a[k].device)).abs().max()) for k in a)


def losses_diff(a: Recorder, b: Recorder, steps: range) -> float | None:
    """Largest absolute train-loss difference over ``steps`` (None when a step is missing)."""
    if not all(s in a.loss and s in b.loss for s in steps):
        return None
    return max(abs(a.loss[s] - b.loss[s]) for s in steps)


def train_smoke(cpu: bool, fig: Figures) -> None:
    """Train, checkpoint, resume from the checkpoint and compare with the uninterrupted run; a
    second uninterrupted run gives the noise floor (GPU kernels need not be deterministic)."""
    import torch

    from benchmarks._models import flops_per_token
    from lifecycle.precision import tf32_matmul_enabled
    from lifecycle.train.distributed import pick_device

    s = TRAIN["cpu" if cpu else "gpu"]
    device = pick_device("cpu" if cpu else "cuda")
    cuda = device.type == "cuda"
    fig.add(shape=s.__dict__, device=str(device))
    data = random_data(s.vocab, s.steps * s.batch, s.seq, s.batch)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-train-"))
    errors: list[str] = []
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        rec_a, res_a, ck_a = run_loop(s, data, device, work, "a", save=True)
        first, last = s.timed_from, s.checkpoint_at  # the checkpoint is written after `last` was reported
        tps = (last - first) * s.batch * s.seq / (rec_a.at[last] - rec_a.at[first])
        step_s = statistics.median(rec_a.at[i + 1] - rec_a.at[i] for i in range(first, last))
        ckpt = complete_checkpoint(ck_a, s.checkpoint_at)
        fpt = flops_per_token(res_a.model, s.seq) if cuda else None
        fig.add(tokens_per_s=round(tps, 1),
                mfu_pct=round(100 * tps * fpt / (PEAK_BF16_TFLOPS * 1e12), 2) if fpt else None,
                step_ms=round(1000 * s.batch * s.seq / tps, 2), loop_reported_tokens_per_s=round(res_a.tokens_per_s, 1),
                peak_memory_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
                # What the loop waited for the checkpoint: the step after it, less a normal step.
                checkpoint_stall_s=round(rec_a.at[last + 1] - rec_a.at[last] - step_s, 3),
                checkpoint_gib=round(folder_bytes(ckpt) / 2**30, 3), run_s=round(time.perf_counter() - start, 1),
                final_train_loss=rec_a.loss[s.steps], val_loss=rec_a.val,
                tf32_matmul_after_fit=tf32_matmul_enabled())
        final_a = {k: v.detach().to("cpu", copy=True) for k, v in res_a.model.state_dict().items()}
        del res_a
        after = range(s.checkpoint_at + 1, s.steps + 1)
        try:
            rec_b, res_b, _ = run_loop(s, data, device, work, "b", save=False, resume_from=ckpt)
            diff_w = weights_diff(final_a, res_b.model.state_dict())
            diff_l = losses_diff(rec_a, rec_b, after)
            fig.add(resume_steps=sorted(rec_b.loss), resume_max_loss_diff=diff_l, resume_max_weight_diff=diff_w,
                    resume_identical=diff_l == 0.0 and diff_w == 0.0)
            del res_b
        except Exception as exc:  # noqa: BLE001 - the rerun below still runs; the step fails at the end
            errors.append(f"resume: {first_line(exc)}")
            fig.add(resume_error=first_line(exc))
        if cuda:
            torch.cuda.empty_cache()
        try:
            rec_c, res_c, _ = run_loop(s, data, device, work, "c", save=False)
            fig.add(rerun_max_loss_diff=losses_diff(rec_a, rec_c, range(1, s.steps + 1)),
                    rerun_max_loss_diff_after_checkpoint=losses_diff(rec_a, rec_c, after),
                    rerun_max_weight_diff=weights_diff(final_a, res_c.model.state_dict()))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"rerun: {first_line(exc)}")
            fig.add(rerun_error=first_line(exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if errors:
        raise RuntimeError("; ".join(errors))


# -- evaluation loss, fp32 vs bf16 ----------------------------------------------------------


def eval_precisions(cpu: bool, fig: Figures) -> None:
    """Train the preset briefly on the built-in corpus, then score held-out blocks with fp32
    weights, fp32 weights under bf16 autocast, and bf16 weights (as the serving engine loads them)."""
    import torch

    from benchmarks._models import build_on, corpus, corpus_tokenizer
    from lifecycle.evaluate.loss import block_losses, pack_documents
    from lifecycle.precision import tf32, tf32_matmul_enabled
    from lifecycle.train.data import PreparedData
    from lifecycle.train.distributed import DistContext, pick_device
    from lifecycle.train.loop import Trainer

    s = EVAL["cpu" if cpu else "gpu"]
    device = pick_device("cpu" if cpu else "cuda")
    docs = corpus()[: 40 if cpu else None]
    tok = corpus_tokenizer(s.vocab, documents=len(docs))
    blocks = torch.from_numpy(pack_documents(tok, docs, s.block))
    n_eval = min(s.eval_blocks, len(blocks) // 5)
    fig.add(shape=s.__dict__, device=str(device), blocks=len(blocks), eval_blocks=n_eval)
    data = PreparedData(root=Path("."), train=blocks[:-n_eval], validation=blocks[-n_eval:][: s.batch], tokenizer=tok,
                        card={})
    work = Path(tempfile.mkdtemp(prefix="gpu-check-eval-"))
    try:
        cfg = train_config(TrainShape(s.preset, s.vocab, s.batch, s.block, s.train_steps, 10**6, 0, s.precision), work,
                           learning_rate=1e-3, warmup_steps=5)
        model = build_on(device, s.preset, tok, n_positions=s.block, seed=0)
        result = Trainer(cfg, model, data, ctx=DistContext(device=device)).fit()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model = result.model.float().eval()
    fig.add(train_steps=result.steps, final_train_loss=result.final_train_loss,
            tf32_matmul_after_fit=tf32_matmul_enabled())
    held_out = blocks[-n_eval:].numpy()
    dev = str(device)

    def score(label: str, autocast: bool = False) -> float:
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast
               else torch.autocast(device.type, enabled=False))
        with ctx:
            r = block_losses(model, held_out, batch_size=s.batch, device=dev, progress=False, desc=label)
        fig.add(**{f"loss_{label}": r.loss, f"tokens_per_s_{label}": round(r.tokens_per_s, 1)})
        return r.loss

    # The evaluate stage scopes TF32 off (lifecycle.precision); fp32_tf32 shows what it would cost.
    with tf32(False):
        fp32 = score("fp32")
    if device.type == "cuda":
        with tf32(True):
            score("fp32_tf32")
    autocast = score("bf16_autocast", autocast=True)
    model.to(torch.bfloat16)
    bf16 = score("bf16_weights")
    fig.add(ratios={"eval_loss_bf16_minus_fp32": round(bf16 - fp32, 5)},
            bf16_weights_minus_fp32=bf16 - fp32, bf16_autocast_minus_fp32=autocast - fp32,
            bf16_weights_rel_diff=abs(bf16 - fp32) / fp32 if fp32 else math.nan)


STEPS = {"facts": facts, "train": train_smoke, "evaluate": eval_precisions}


def main() -> None:
    """Run one step and write its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the smoke run of the check)")
    parser.add_argument("--json", metavar="PATH", help="write the figures here as they are measured")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fig = Figures(f"gpu_check.{args.step}", args.json)
    STEPS[args.step](args.cpu, fig)
    for key, value in fig.figures.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
