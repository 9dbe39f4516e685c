"""The best model a time budget buys: `lifecycle train --time-budget T --preset auto` vs a nanoGPT reference.

The reference is nanoGPT's CPU configuration written here in plain PyTorch: char-level, 4 layers,
4 heads, 128 wide, block 64, batch 12, AdamW lr 1e-3 (betas 0.9/0.99, weight decay 0.1), warmup 100
and cosine decay to 1e-4 over 2000 iterations, no dropout, stopped after T seconds (or 2000
iterations). Ours is the real CLI in a subprocess: `lifecycle prepare --vocab-size auto --block-size
auto` on the benchmark's train text, then `lifecycle train --time-budget T --preset auto`; the reference trains
on the text of the prepared train split, so both see the same documents. Both are scored by
:func:`bits_per_byte` on the same held-out text (every 20th document, never given to prepare).

The corpus (no download): CPython's documentation topics, the licence texts under
/usr/share/common-licenses (long-form legal English prose), and the docstrings of the standard
library, in that order, cut at ``--corpus-bytes`` (1 MB).

    python benchmarks/bench_budget.py                 # T=2m: about 5 minutes
    python benchmarks/bench_budget.py --quick         # T=10s on 200 KB: about a minute
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lifecycle.train.budget import parse_duration  # noqa: E402

LN2 = math.log(2.0)


# -- corpus ------------------------------------------------------------------------------------

def _docstrings() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 300:
                    yield doc


def corpus_documents(limit_bytes: int) -> list[str]:
    """Documents of the benchmark corpus, in a fixed order, up to ``limit_bytes`` of UTF-8."""
    from lifecycle.data.sources import pydoc_documents

    def sources() -> Iterator[str]:
        yield from pydoc_documents()
        for lic in sorted(Path("/usr/share/common-licenses").glob("*")):
            if lic.is_file() and not lic.is_symlink():
                yield from (p for p in lic.read_text(encoding="utf-8", errors="replace").split("\n\n\n") if p.strip())
        yield from _docstrings()

    out, total, seen = [], 0, set()
    for doc in sources():
        doc = doc.strip()
        if not doc or doc in seen:
            continue
        seen.add(doc)
        out.append(doc)
        total += len(doc.encode("utf-8")) + 2
        if total >= limit_bytes:
            break
    return out


# -- scoring: one function for both models -----------------------------------------------------

@torch.no_grad()
def bits_per_byte(logits_of: Callable[[torch.Tensor], torch.Tensor], ids: list[int], text: str, window: int) -> float:
    """Bits per UTF-8 byte of ``text``, whose token ids are ``ids[1:]`` (``ids[0]`` is a context token).

    Disjoint windows of ``window`` inputs: every token is scored once, from the tokens before it
    in its window. ``logits_of`` maps [1, L] ids to [1, L, vocab] logits.
    """
    seq = torch.tensor(ids, dtype=torch.long)
    nll = 0.0
    for i in range(0, len(seq) - 1, window):
        x = seq[i: i + window][None]
        y = seq[i + 1: i + 1 + window][None]
        x = x[:, : y.shape[1]]
        logits = logits_of(x).float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
    return nll / LN2 / len(text.encode("utf-8"))


# -- the reference: nanoGPT's CPU configuration, char-level, plain PyTorch -----------------------

class Block(nn.Module):
    """Pre-LN transformer block (nanoGPT)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """nanoGPT: token + position embeddings, blocks, final LN, tied head."""

    def __init__(self, vocab: int, block: int = 64, layers: int = 4, heads: int = 4, d: int = 128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))


def train_reference(train_text: str, seconds: float, seed: int = 1337) -> tuple[CharGPT, dict[str, int], dict]:
    """nanoGPT's CPU run for ``seconds`` of wall time (or 2000 iterations): model, char map, figures."""
    torch.manual_seed(seed)
    chars = sorted(set(train_text))
    stoi = {c: i + 1 for i, c in enumerate(chars)}  # 0: a character the train text never had
    data = torch.tensor([stoi[c] for c in train_text], dtype=torch.long)
    model = CharGPT(len(chars) + 1)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    block, batch, lr, min_lr, warmup, iters = 64, 12, 1e-3, 1e-4, 100, 2000
    t0 = time.perf_counter()
    it = 0
    while it < iters and time.perf_counter() - t0 < seconds:
        f = (it + 1) / warmup if it < warmup else 0.5 * (1 + math.cos(math.pi * (it - warmup) / (iters - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f if it < warmup else min_lr + (lr - min_lr) * f
        ix = torch.randint(len(data) - block - 1, (batch,))
        x = torch.stack([data[i: i + block] for i in ix])
        y = torch.stack([data[i + 1: i + 1 + block] for i in ix])
        loss = F.cross_entropy(model(x).view(-1, len(chars) + 1), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        it += 1
    used = time.perf_counter() - t0
    return model.eval(), stoi, {"iterations": it, "seconds": round(used, 2),
                                "parameters": sum(p.numel() for p in model.parameters())}


# -- ours: the CLI ---------------------------------------------------------------------------------

def _cli(args: list[str], env: dict[str, str], cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "lifecycle", *args], capture_output=True, text=True, env=env, cwd=cwd)
    if res.returncode != 0:
        raise SystemExit(f"lifecycle {args[0]} exited {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    return res.stdout


def train_ours(train_file: Path, budget: str, work: Path, extra: list[str],
               vocab: str = "auto", prepare_extra: tuple[str, ...] = (),
               block: str = "auto") -> tuple[Any, Any, dict, Path]:
    """prepare + train through the CLI; returns the registered model, its tokenizer, figures, prepared dir."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lifecycle.tracking import resolve_model_dir

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1"}
    prepared = work / "prepared"
    _cli(["prepare", "--source", str(train_file), "--output", str(prepared), "--vocab-size", vocab,
          "--block-size", block,
          "--set", "split.test=0.01", "--set", "split.validation=0.03", *prepare_extra], env, work)
    t0 = time.perf_counter()
    out = _cli(["train", "--data", str(prepared), "--preset", "auto", "--time-budget", budget,
                "--output", str(work / "ckpt"), "--set", "progress=false", "--set", "system_metrics=false", *extra],
               env, work)
    wall = time.perf_counter() - t0
    uri = out.strip().splitlines()[-1]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run_id = next(line.rsplit(" ", 1)[1] for line in out.splitlines() if line.startswith("Trained "))
    run = mlflow.MlflowClient().get_run(run_id)
    folder = resolve_model_dir(uri)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    m, p = run.data.metrics, run.data.params
    figures = {"time_used_s": round(m["train/time_used_s"], 2), "steps": int(m["train/steps"]),
               "planned_steps": int(m["train/planned_steps"]), "command_wall_s": round(wall, 1),
               "parameters": int(p["model.parameters"]), "vocab": len(tok),
               "shape": {k: int(p[f"shape.{k}"]) for k in ("n_layer", "n_head", "n_embd", "n_positions")},
               "block_size": int(p["data.block_size"]), "val_loss": round(m.get("val/best_loss", math.nan), 4)}
    return model, tok, figures, prepared


def main() -> None:
    """Build the corpus, train both for the same wall time, score both, print the ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T=10s on 200 KB (the test suite's smoke run)")
    ap.add_argument("--budget", default=None, help="time budget for both (default 2m; --quick: 10s)")
    ap.add_argument("--corpus-bytes", type=int, default=None, help="corpus size (default 1 MB; --quick: 200 KB)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for our `lifecycle train` (repeatable)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both (default 1: on a shared 2-core machine 1 thread ran 3.3x faster "
                         "than 2, bench_train.py --switches)")
    ap.add_argument("--prepare-set", dest="prepare_extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for our `lifecycle prepare` (repeatable), e.g. pack.block_size=128")
    ap.add_argument("--block", default="auto", help="prepare --block-size for ours (default auto)")
    ap.add_argument("--vocab", default="auto", help="prepare --vocab-size for ours (default auto)")
    ap.add_argument("--skip-reference", action="store_true", help="only train ours (for sweeps)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args()
    budget = args.budget or ("10s" if args.quick else "2m")
    seconds = parse_duration(budget)
    limit = args.corpus_bytes or (200_000 if args.quick else 1_000_000)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-budget-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    docs = corpus_documents(limit)
    heldout = "\n\n".join(d for i, d in enumerate(docs) if i % 20 == 10)
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 10]
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in train_docs), encoding="utf-8")
    print(f"corpus: {len(docs)} documents, {sum(len(d.encode()) for d in docs):,} bytes; held-out "
          f"{len(heldout.encode()):,} bytes; budget {budget}", flush=True)

    extra = [f"--set=threads={args.threads}", *(f"--set={s}" for s in args.extra)]
    model, tok, ours, prepared = train_ours(train_file, budget, work, extra, args.vocab,
                                           tuple(f"--set={s}" for s in args.prepare_extra), args.block)
    ids = [tok.eos_token_id, *tok(heldout, add_special_tokens=False)["input_ids"]]
    ours["bits_per_byte"] = round(bits_per_byte(lambda x: model(input_ids=x).logits, ids, heldout,
                                                ours["block_size"]), 4)
    print(f"ours      {ours}", flush=True)
    result: dict[str, Any] = {"budget": budget, "budget_s": seconds, "corpus_bytes": limit, "ours": ours,
                              "budget_met": ours["time_used_s"] <= seconds * 1.05,
                              "threads": torch.get_num_threads()}
    if not args.skip_reference:
        # The reference trains on the documents prepare kept for its train split, joined as one text.
        raw = prepared / "raw" / "train.jsonl"
        text = "\n\n".join(json.loads(line)["text"] for line in raw.open(encoding="utf-8"))
        ref, stoi, figures = train_reference(text, seconds)
        ref_ids = [stoi.get("\n", 0), *(stoi.get(c, 0) for c in heldout)]
        figures["bits_per_byte"] = round(bits_per_byte(ref, ref_ids, heldout, 64), 4)
        figures["train_bytes"] = len(text.encode("utf-8"))
        print(f"reference {figures}", flush=True)
        result["reference"] = figures
        result["improvement"] = round(1 - ours["bits_per_byte"] / figures["bits_per_byte"], 4)
        print(f"\nbits/byte: ours {ours['bits_per_byte']:.4f} vs reference {figures['bits_per_byte']:.4f}: "
              f"{100 * result['improvement']:.1f} % lower (goal >= 10 %); time used {ours['time_used_s']} s "
              f"of {seconds:g} s ({'within' if result['budget_met'] else 'OVER'} 5 %)")
    from benchmarks._report import write_json

    write_json("budget", result, ratios={"improvement": result.get("improvement"),
                                         "time_used_vs_budget": round(ours["time_used_s"] / seconds, 3)},
               path=args.json)


if __name__ == "__main__":
    main()
