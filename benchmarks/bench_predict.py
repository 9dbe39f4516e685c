"""Batch prediction benchmark: `lifecycle predict` at batch 16 vs the pyfunc called one row at a time.

Both sides use the same logged pyfunc model (loaded with ``mlflow.pyfunc.load_model``), the same
prompts and greedy decoding; the figure is rows/s and the ratio is predict / one-at-a-time
(target: >= 3x at batch 16 on CPU). Output writing (JSONL, fsync per batch) is included in predict's time.

    python benchmarks/bench_predict.py --quick      # tiny preset, 64 rows, well under a minute
    python benchmarks/bench_predict.py --preset small --rows 512
    python benchmarks/bench_predict.py --quick --spark   # also --engine spark on local Spark (session start included)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._models import corpus_tokenizer, model_dir, prompts  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def logged_model(tmp: Path, preset: str) -> Path:
    """The preset's model logged as the project's pyfunc into a private sqlite store; its local folder."""
    import mlflow

    from lifecycle.serving import log_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = mlflow.create_experiment("bench-predict", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = log_model(model_dir(tmp / "hf", preset, corpus_tokenizer(1024)))
    return Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp / "pyfunc")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 64 rows")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--spark", action="store_true", help="also time --engine spark (needs pyspark and Java)")
    parser.add_argument("--master", default="local[2]", help="Spark master for --spark")
    parser.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    rows = 64 if args.quick else args.rows
    preset = "tiny" if args.quick else args.preset

    import json

    import torch

    from benchmarks._report import write_json
    from lifecycle.predict import load_pyfunc, predict_file

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    params = {"max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp_name:
        tmp = Path(tmp_name)
        folder = logged_model(tmp, preset)
        texts = prompts(rows)
        src = tmp / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(texts)))

        model = load_pyfunc(str(folder))
        model.predict(texts[:2], params=params)  # warm both paths' kernels before timing
        start = time.perf_counter()
        for text in texts:
            model.predict([text], params=params)
        single_s = time.perf_counter() - start

        start = time.perf_counter()
        out = predict_file(str(folder), src, tmp / "out.jsonl", batch_size=args.batch_size, params=params,
                           progress=False)
        batch_s = time.perf_counter() - start  # includes loading the model once, as a user's run does
        spark_s = None
        if args.spark:
            from lifecycle.predict_spark import predict_spark

            start = time.perf_counter()
            done = predict_spark(str(folder), src, tmp / "out.parquet", batch_size=args.batch_size, params=params,
                                 master=args.master)
            spark_s = time.perf_counter() - start  # includes starting Spark and loading the model per worker
            assert done.written == rows
    assert out.written == rows
    figures = {"rows": rows, "preset": preset, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
               "single_rows_per_s": rows / single_s, "predict_rows_per_s": rows / batch_s}
    ratio = figures["predict_rows_per_s"] / figures["single_rows_per_s"]
    ratios = {"predict_vs_one_at_a_time": ratio}
    if spark_s is not None:
        figures["spark_rows_per_s"] = rows / spark_s
        ratios["spark_vs_predict"] = figures["spark_rows_per_s"] / figures["predict_rows_per_s"]
    print(f"pyfunc one row at a time: {figures['single_rows_per_s']:.1f} rows/s")
    print(f"lifecycle predict, batch {args.batch_size}: {figures['predict_rows_per_s']:.1f} rows/s "
          "(model load included)")
    print(f"predict / one-at-a-time: {ratio:.2f}x (target >= 3x on CPU)")
    if spark_s is not None:
        print(f"lifecycle predict --engine spark ({args.master}): {figures['spark_rows_per_s']:.1f} rows/s "
              f"(Spark start included); spark / in-process: {ratios['spark_vs_predict']:.2f}x")
    write_json("predict", figures, ratios=ratios, path=args.json)


if __name__ == "__main__":
    main()
