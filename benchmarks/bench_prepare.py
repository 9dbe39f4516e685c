"""Prepare throughput vs a bare tokenizer pass, and how time and memory scale with 10x the data.

Prints, from one run:
  * prepare throughput (MB/s, tokens/s) with every filter, both dedups and PII scrubbing on and
    the default configuration (so the tokenizer is trained on the first ``tokenizer.sample_bytes``
    of the train split), next to a bare batched pass of the same tokenizer over the same text
    (target: ratio >= 0.5);
  * two labelled variants on the 10x corpus, same filters and dedups: the tokenizer trained on
    the whole train split (``tokenizer.sample_bytes=0``), and a reused tokenizer (no training);
  * the time ratio of a 10x corpus to the 1x one (target: <= 11);
  * the peak RSS of both sizes (target: 10x <= 2x of 1x).

Each measurement runs in its own subprocess so that peak RSS means something; ``--repeat N``
keeps the fastest of N runs of every measurement (prepare and bare alike), which takes most of
the noise of a shared machine out. The prepare runs are the library pipeline
(lifecycle.data.pipeline.prepare_folder) without MLflow logging, since logging cost depends on the
tracking server, not on this code.

    python benchmarks/bench_prepare.py --quick      # ~0.5 MB and ~5 MB corpora
    python benchmarks/bench_prepare.py              # ~4 MB and ~40 MB corpora
    python benchmarks/bench_prepare.py --quick --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> dict:
    """A jsonl corpus of generated documents with planted exact/near duplicates and PII."""
    from lifecycle.data.synthetic import english_document, generate_documents

    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    size = n = 0
    recent: list[str] = []
    docs = generate_documents(10**9, seed=seed, chinese_share=0.1)
    with path.open("w", encoding="utf-8") as fh:
        while size < target:
            r = rng.random()
            if r < 0.05 and recent:
                doc = rng.choice(recent)  # exact duplicate
            elif r < 0.08 and recent:
                words = rng.choice(recent).split(" ")
                doc = " ".join(words[:-2] + ["slightly", "changed."])  # near duplicate
            elif r < 0.10:
                doc = english_document(rng) + f" Mail user{n}@example.com or call +1 415 555 {1000 + n % 9000}."
            else:
                doc = next(docs)
            recent = (recent + [doc])[-200:]
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            fh.write(line)
            size += len(doc.encode("utf-8"))
            n += 1
    return {"documents": n, "bytes": size}


def _cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children (the prepare workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0  # Linux reports KiB


def _preimport() -> None:
    # Import time (transformers alone takes seconds) is not data work: both sides pay it before
    # their clock starts.
    import datasets  # noqa: F401
    import datasketch  # noqa: F401
    import tokenizers  # noqa: F401
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401


def worker_prepare(corpus: Path, out: Path, num_proc: int, vocab_size: int, tokenizer: str | None = None,
                   overrides: list[str] | None = None) -> dict:
    """Run the full pipeline (all filters, exact + near dedup, PII) on ``corpus``."""
    from lifecycle.config import load_config
    from lifecycle.data.config import PrepareConfig
    from lifecycle.data.pipeline import prepare_folder

    _preimport()
    cfg = load_config(PrepareConfig, None, [f"num_proc={num_proc}", f"tokenizer.vocab_size={vocab_size}",
                                            "pack.block_size=256", *(overrides or [])],
                      **{"source.uri": str(corpus)})
    out.mkdir(parents=True)
    cpu, t = _cpu_seconds(), time.perf_counter()
    result = prepare_folder(cfg, out, tokenizer_path=tokenizer)
    seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    card = result.card
    return {"seconds": seconds, "cpu_seconds": cpu, "bytes": card["counts"]["bytes_read"],
            "tokens": sum(card["tokens"].values()),
            "kept": card["counts"]["documents_kept"], "dedup": {k: card["dedup"][k] for k in ("exact", "near")},
            "tokenizer_sample_bytes": card["tokenizer"].get("trained_on_bytes"),
            "steps": {k: round(v, 2) for k, v in result.seconds.items()}, "peak_rss_mb": _peak_rss_mb()}


def worker_bare(corpus: Path, tokenizer_dir: Path) -> dict:
    """A bare batched pass of the same tokenizer over the same text (read from the same file)."""
    from transformers import AutoTokenizer

    from lifecycle.data.tokenizer import batched, encode_batch

    _preimport()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cpu, t = _cpu_seconds(), time.perf_counter()
    n_bytes = tokens = 0

    def texts():
        nonlocal n_bytes
        with corpus.open(encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                n_bytes += len(text.encode("utf-8"))
                yield text

    for batch in batched(texts(), 512):
        tokens += sum(len(ids) for ids in encode_batch(tok, batch))
    seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "bytes": n_bytes, "tokens": tokens, "peak_rss_mb": _peak_rss_mb()}


def _sub(args: list[str]) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(args: list[str], repeat: int, out: Path | None = None) -> dict:
    """The fastest of ``repeat`` runs of one measurement (each in a fresh subprocess and folder)."""
    runs = []
    for i in range(repeat):
        run_args = list(args)
        if out is not None:
            target = out.with_name(f"{out.name}-{i}")
            run_args += ["--out", str(target)]
        runs.append(_sub(run_args))
    return min(runs, key=lambda r: r["seconds"])


def main() -> None:
    """Run the side-by-side measurements and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small corpora (~0.5 MB / ~5 MB), about 1 minute")
    ap.add_argument("--base-mb", type=float, default=None, help="size of the 1x corpus in MB")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1, help="keep the fastest of N runs of each measurement")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--worker", choices=["prepare", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "prepare":
        print(json.dumps(worker_prepare(Path(args.corpus), Path(args.out), args.num_proc, args.vocab_size,
                                        args.tokenizer, args.set)))
        return
    if args.worker == "bare":
        print(json.dumps(worker_bare(Path(args.corpus), Path(args.out))))
        return

    base = args.base_mb or (0.5 if args.quick else 4.0)
    common = ["--num-proc", str(args.num_proc), "--vocab-size", str(args.vocab_size)]
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        rows = {}
        for label, mb in (("1x", base), ("10x", base * 10)):
            corpus = root / f"corpus-{label}.jsonl"
            info = make_corpus(corpus, mb, seed=1)
            out = root / f"prepared-{label}"
            prep = _best(["--worker", "prepare", "--corpus", str(corpus), *common], args.repeat, out)
            # The bare pass uses the tokenizer the (first) prepare run trained.
            tokenizer = root / f"prepared-{label}-0" / "tokenizer"
            bare = _best(["--worker", "bare", "--corpus", str(corpus), "--out", str(tokenizer)], args.repeat)
            rows[label] = {"corpus": info, "prepare": prep, "bare": bare}
        corpus10 = str(root / "corpus-10x.jsonl")
        # Variant: the tokenizer trained on the whole train split (no sample cap).
        whole = _best(["--worker", "prepare", "--corpus", corpus10, *common, "--set", "tokenizer.sample_bytes=0"],
                      args.repeat, root / "prepared-whole")
        # Variant: reusing the trained tokenizer: the pipeline's own cost without tokenizer
        # training (what fine-tuning an existing model pays).
        reuse = _best(["--worker", "prepare", "--corpus", corpus10, *common,
                       "--tokenizer", str(root / "prepared-10x-0" / "tokenizer")], args.repeat, root / "prepared-reuse")

    print(f"bench_prepare: num_proc={args.num_proc}, cpus={os.cpu_count()}, vocab={args.vocab_size}, block=256, "
          f"best of {args.repeat}")
    ratios: dict[str, float] = {}
    for label, r in rows.items():
        p, b = r["prepare"], r["bare"]
        p_mb, b_mb = p["bytes"] / 1e6 / p["seconds"], b["bytes"] / 1e6 / b["seconds"]
        p_tok, b_tok = p["tokens"] / p["seconds"], b["tokens"] / b["seconds"]
        print(f"[{label}] {r['corpus']['documents']} docs, {r['corpus']['bytes'] / 1e6:.1f} MB; "
              f"kept {p['kept']}, dedup {p['dedup']}; tokenizer trained on {p['tokenizer_sample_bytes'] / 1e6:.2f} MB; "
              f"steps {p['steps']}")
        print(f"[{label}] prepare: {p['seconds']:.2f} s ({p['cpu_seconds']:.2f} s CPU), {p_mb:.2f} MB/s, "
              f"{p_tok:,.0f} tokens/s, peak RSS {p['peak_rss_mb']:.0f} MB")
        print(f"[{label}] bare tokenizer pass: {b['seconds']:.2f} s ({b['cpu_seconds']:.2f} s CPU), {b_mb:.2f} MB/s, "
              f"{b_tok:,.0f} tokens/s")
        print(f"[{label}] prepare / bare throughput ratio (MB/s): {p_mb / b_mb:.3f}   (target >= 0.5)")
        ratios[f"prepare_vs_bare_{label}"] = round(p_mb / b_mb, 3)
    b = rows["10x"]["bare"]
    b_mb = b["bytes"] / 1e6 / b["seconds"]
    for name, key, v in (("tokenizer trained on the whole train split", "whole_train_tokenizer", whole),
                         ("reused tokenizer, no training", "reused_tokenizer", reuse)):
        v_mb = v["bytes"] / 1e6 / v["seconds"]
        print(f"[10x, {name}] prepare: {v['seconds']:.2f} s ({v['cpu_seconds']:.2f} s CPU), {v_mb:.2f} MB/s, "
              f"steps {v['steps']}; "
              f"ratio to bare: {v_mb / b_mb:.3f}")
        ratios[f"prepare_vs_bare_10x_{key}"] = round(v_mb / b_mb, 3)
    t_ratio = rows["10x"]["prepare"]["seconds"] / rows["1x"]["prepare"]["seconds"]
    m_ratio = rows["10x"]["prepare"]["peak_rss_mb"] / rows["1x"]["prepare"]["peak_rss_mb"]
    print(f"time ratio 10x/1x: {t_ratio:.2f}   (target <= 11)")
    print(f"peak RSS ratio 10x/1x: {m_ratio:.2f}   (target <= 2)")
    ratios.update(time_10x_over_1x=round(t_ratio, 2), peak_rss_10x_over_1x=round(m_ratio, 2))
    if args.json:
        _write_json(args.json, {"rows": rows, "whole_train_tokenizer": whole, "reused_tokenizer": reuse}, ratios)


def _write_json(path: str, figures: dict, ratios: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
    try:
        from benchmarks._report import write_json
    except ImportError:  # run as a plain script from elsewhere: write the figures alone
        Path(path).write_text(json.dumps({"benchmark": "prepare", "ratios": ratios, "figures": figures}, indent=2))
        return
    write_json("prepare", figures, ratios=ratios, path=path)


if __name__ == "__main__":
    main()
