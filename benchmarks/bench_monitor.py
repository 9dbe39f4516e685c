"""Monitoring speed on a synthetic inference log (no model, no server).

Prints the time to read and window N records (JSONL contract of the serving stage), to compute the
service metrics, and the numpy drift statistics next to straightforward pure-Python versions
measured in the same run (the ratio is what the vectorised versions buy on a large window).

    python benchmarks/bench_monitor.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synth_log(path: Path, n: int, seed: int = 0) -> None:
    """``n`` records of one version over the last two days (2 % errors, 1-4 rows each)."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            ts = now - timedelta(seconds=172800 * (n - i) / n)
            err = rng.random() < 0.02
            rows = [] if err else [{"prompt_tokens": int(rng.lognormvariate(4, 0.7)),
                                    "completion_tokens": rng.randint(1, 64), "finish_reason": "stop",
                                    "truncated": False} for _ in range(rng.randint(1, 4))]
            fh.write(json.dumps({
                "ts": ts.isoformat(timespec="milliseconds"), "model_name": "m", "model_version": "1",
                "latency_ms": rng.lognormvariate(5, 0.5), "n_rows": len(rows),
                "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                "completion_tokens": sum(r["completion_tokens"] for r in rows), "batch_size": len(rows),
                "finish_reason": None if err else "stop", "rows": rows, "params": {},
                "error": "refused" if err else None, "status": "invalid" if err else "ok"}) + "\n")


def py_psi(ref: list[float], cur: list[float], bins: int = 10) -> float:
    """PSI with sorted-list quantiles and bisect, no numpy."""
    import bisect

    s = sorted(ref)
    edges = sorted({s[min(len(s) - 1, int(q * len(s) / bins))] for q in range(1, bins)})
    def frac(xs: list[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for x in xs:
            counts[bisect.bisect_left(edges, x)] += 1
        return [max(c / len(xs), 1e-4) for c in counts]
    p, q = frac(ref), frac(cur)
    return sum((b - a) * math.log(b / a) for a, b in zip(p, q))


def py_ks(a: list[float], b: list[float]) -> float:
    """KS by merging two sorted lists."""
    a, b = sorted(a), sorted(b)
    i = j = 0
    best = 0.0
    while i < len(a) and j < len(b):
        x = min(a[i], b[j])
        while i < len(a) and a[i] <= x:
            i += 1
        while j < len(b) and b[j] <= x:
            j += 1
        best = max(best, abs(i / len(a) - j / len(b)))
    return best


def timed(fn, repeat: int = 3):
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="20k records instead of 200k")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON (benchmarks/run_all.py)")
    args = ap.parse_args()
    n = 20_000 if args.quick else 200_000

    from lifecycle.monitoring import drift, service
    from lifecycle.monitoring.records import parse_since, read_records, select_window

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.jsonl"
        synth_log(path, n)
        mb = path.stat().st_size / 1e6
        t_read, recs = timed(lambda: read_records(path), 1)
        t_win, win = timed(lambda: select_window(recs, name="m", version="1", since=parse_since("24h")), 1)
    t_svc, _ = timed(lambda: service.service_metrics(win.records))
    cur = service.row_values(win.records, "prompt_tokens")
    ref = service.row_values(win.baseline, "prompt_tokens")
    t_psi, v_psi = timed(lambda: drift.psi(ref, cur))
    t_ks, v_ks = timed(lambda: drift.ks_statistic(ref, cur))
    refl, curl = ref.tolist(), cur.tolist()
    t_ppsi, v_ppsi = timed(lambda: py_psi(refl, curl))
    t_pks, v_pks = timed(lambda: py_ks(refl, curl))
    print(f"records: {n} ({mb:.1f} MB), window {len(win.records)}, rows {cur.size} vs {ref.size}")
    print(f"read+parse: {t_read:.3f} s ({n / t_read:,.0f} records/s); window: {t_win:.3f} s; "
          f"service metrics: {t_svc:.3f} s")
    print(f"PSI numpy {t_psi * 1e3:.1f} ms vs pure Python {t_ppsi * 1e3:.1f} ms: x{t_ppsi / t_psi:.1f} "
          f"(values {v_psi:.4f} / {v_ppsi:.4f})")
    print(f"KS  numpy {t_ks * 1e3:.1f} ms vs pure Python {t_pks * 1e3:.1f} ms: x{t_pks / t_ks:.1f} "
          f"(values {v_ks:.4f} / {v_pks:.4f})")
    from benchmarks._report import write_json

    write_json("monitor", {"records": n, "megabytes": round(mb, 2), "read_parse_s": round(t_read, 4),
                           "records_per_s": round(n / t_read), "window_s": round(t_win, 4),
                           "service_metrics_s": round(t_svc, 4),
                           "psi_ms": {"numpy": t_psi * 1e3, "python": t_ppsi * 1e3},
                           "ks_ms": {"numpy": t_ks * 1e3, "python": t_pks * 1e3}},
               ratios={"psi_numpy_vs_python": round(t_ppsi / t_psi, 1), "ks_numpy_vs_python": round(t_pks / t_ks, 1),
                       "records_per_s": round(n / t_read)}, path=args.json)


if __name__ == "__main__":
    main()
