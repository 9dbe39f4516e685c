"""Registry speed against a local `mlflow server` this script starts.

Prints the median and p95 of ``promote`` (all default-policy gates, lock, ledger, alias, stage
mirror) and ``rollback``, next to a bare ``set_registered_model_alias`` call measured in the same
run (the ratio is the cost of doing it safely), and the wall time of 20 concurrent CLI processes.

    python benchmarks/bench_registry.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Few repetitions (about a minute here).")
    args = parser.parse_args()
    reps = 6 if args.quick else 20

    from tests import servers
    from tests.test_registry_support import make_source, make_version, run_at_once

    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    t0 = time.monotonic()
    server = servers.start_mlflow_server(f"sqlite:///{work / 'backend.db'}", work,
                                         extra_env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    print(f"mlflow server up in {time.monotonic() - t0:.1f} s at {server.url}")
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    try:
        from lifecycle.registry.client import get_client
        from lifecycle.registry.promote import promote
        from lifecycle.registry.rollback import rollback

        client = get_client()
        name = "bench-model"
        source = make_source(client, "bench-runs")
        versions = [make_version(client, name, {"eval/loss": f"{3.0 - i * 0.001:.3f}"}, source=source)
                    for i in range(reps + 2)]

        bare: list[float] = []
        for v in versions[:reps]:
            t = time.perf_counter()
            client.set_registered_model_alias(name, "bench", v)
            bare.append(time.perf_counter() - t)

        promote_s: list[float] = []
        rollback_s: list[float] = []
        promote(name, versions[0], "production")
        for v in versions[1:reps + 1]:
            t = time.perf_counter()
            promote(name, v, "production")
            promote_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            rollback(name, reason="bench", expect_current=v)
            rollback_s.append(time.perf_counter() - t)
            promote(name, v, "production")  # back up, so the next rollback has the same shape

        conc_name = "bench-concurrent"
        conc_versions = [make_version(client, conc_name, {"eval/loss": f"{3.0 - i * 0.001:.3f}"}, source=source)
                         for i in range(6)]
        promote(conc_name, conc_versions[0], "production")
        commands = [["rollback", conc_name, "--reason", "bench"] if i % 4 == 3 else
                    ["promote", conc_name, conc_versions[1 + i % 5], "--to", "production"] for i in range(20)]
        t = time.perf_counter()
        results = run_at_once(commands, work)
        conc_wall = time.perf_counter() - t
        codes = sorted(code for _, code, _ in results)

        med_bare = statistics.median(bare)
        print(f"\nregistry benchmark ({reps} repetitions, sqlite-backed mlflow server, loopback)")
        print(f"  bare set_registered_model_alias  median {med_bare * 1000:7.1f} ms  p95 {pct(bare, .95) * 1000:7.1f} ms")
        for label, values in (("promote (default policy gates)", promote_s), ("rollback (--expect-current)", rollback_s)):
            med = statistics.median(values)
            print(f"  {label:<32} median {med * 1000:7.1f} ms  p95 {pct(values, .95) * 1000:7.1f} ms  "
                  f"= {med / med_bare:5.1f}x a bare alias set  (target < 1000 ms: {'met' if med < 1 else 'MISSED'})")
        print(f"  20 concurrent CLI processes       wall {conc_wall:7.1f} s  ({conc_wall / 20 * 1000:.0f} ms per call "
              f"serialised by the lock), exit codes {codes}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
