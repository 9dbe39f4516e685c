"""Registry speed against a local `mlflow server` this script starts.

Prints, from one run against the same server:

* the median and p95 of ``promote`` (all default-policy gates, lock, ledger, alias, stage mirror)
  and ``rollback`` called in-process (the library API: what the pipeline and a long-lived
  process pay), with the REST requests each makes;
* the same two as CLI processes (``lifecycle promote ...``), which add Python start-up and
  ``import mlflow`` (measured alone too, as the floor any CLI call pays);
* a bare ``MlflowClient.set_registered_model_alias`` and a bare REST round trip, as the reference
  (the ratio is the cost of doing it safely);
* the wall time of 20 concurrent CLI processes (forked after import) on one model.

Target (issue #5): promote and rollback each under one second at the median.

    python benchmarks/bench_registry.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class RequestCounter:
    """Counts the HTTP requests this process makes (every MLflow REST call goes through requests)."""

    def __init__(self) -> None:
        import requests

        self.count = 0
        original = requests.Session.request

        def counted(session, method, url, *args, **kwargs):  # noqa: ANN001 - requests' own signature
            self.count += 1
            return original(session, method, url, *args, **kwargs)

        requests.Session.request = counted

    def take(self) -> int:
        """Requests since the last call."""
        n, self.count = self.count, 0
        return n


def summary(values: list[float]) -> dict[str, float]:
    """Median and p95 in milliseconds."""
    return {"median_ms": round(statistics.median(values) * 1000, 1), "p95_ms": round(pct(values, .95) * 1000, 1),
            "n": len(values)}


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="Few repetitions, 8 concurrent calls (well under a minute).")
    parser.add_argument("--json", metavar="PATH", help="Also write the figures as JSON.")
    parser.add_argument("--server", default=os.environ.get("LIFECYCLE_BENCH_MLFLOW_SERVER"),
                        help="Use this running `mlflow server` (a throwaway one: the benchmark registers models "
                             "there) instead of starting a private one (env LIFECYCLE_BENCH_MLFLOW_SERVER).")
    args = parser.parse_args()
    reps = 3 if args.quick else 20
    cli_reps = 1 if args.quick else 6
    n_concurrent = 4 if args.quick else 20

    from benchmarks._report import write_json
    from tests import servers
    from tests.registry_support import make_source, make_version, run_at_once

    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    t0 = time.monotonic()
    if args.server:
        server = None
        url = args.server.rstrip("/")
        print(f"using the mlflow server at {url}", flush=True)
    else:
        server = servers.start_mlflow_server(f"sqlite:///{work / 'backend.db'}", work)
        url = server.url
        print(f"mlflow server up in {time.monotonic() - t0:.1f} s at {url}", flush=True)
    os.environ["MLFLOW_TRACKING_URI"] = url
    suffix = uuid.uuid4().hex[:6]  # a shared server may hold an earlier run's models
    try:
        from lifecycle.registry.client import get_client, registry
        from lifecycle.registry.promote import promote
        from lifecycle.registry.rollback import rollback

        client = get_client()
        name = f"bench-model-{suffix}"
        source = make_source(client, f"bench-runs-{suffix}")
        versions = [make_version(client, name, {"eval/loss": f"{3.0 - i * 0.001:.3f}"}, source=source)
                    for i in range(reps + 2)]
        counter = RequestCounter()

        bare: list[float] = []
        bare_rest: list[float] = []
        for v in versions[:reps]:
            t = time.perf_counter()
            client.set_registered_model_alias(name, "bench", v)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            registry(client).set_registered_model_alias(name, "bench", v)
            bare_rest.append(time.perf_counter() - t)

        promote_s: list[float] = []
        rollback_s: list[float] = []
        requests_made = {"promote": 0, "rollback": 0}
        promote(name, versions[0], "production")
        for v in versions[1:reps + 1]:
            counter.take()
            t = time.perf_counter()
            promote(name, v, "production")
            promote_s.append(time.perf_counter() - t)
            requests_made["promote"] = counter.take()
            t = time.perf_counter()
            rollback(name, reason="bench", expect_current=v)
            rollback_s.append(time.perf_counter() - t)
            requests_made["rollback"] = counter.take()
            promote(name, v, "production")  # back up, so the next rollback has the same shape

        # CLI processes: what a shell script or CI job pays per call.
        env = {**os.environ, "MLFLOW_TRACKING_URI": url}
        lifecycle_cmd = [sys.executable, "-m", "lifecycle"]

        def timed(cmd: list[str]) -> float:
            t = time.perf_counter()
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr[-1500:]}")
            return time.perf_counter() - t

        import_s = [timed([sys.executable, "-c", "import mlflow.tracking"]) for _ in range(cli_reps)]
        cli_promote: list[float] = []
        cli_rollback: list[float] = []
        for v in versions[1:cli_reps + 1]:
            cli_promote.append(timed(lifecycle_cmd + ["promote", name, v, "--to", "production"]))
            cli_rollback.append(timed(lifecycle_cmd + ["rollback", name, "--reason", "bench", "--expect-current", v]))
            promote(name, v, "production")

        conc_name = f"bench-concurrent-{suffix}"
        conc_versions = [make_version(client, conc_name, {"eval/loss": f"{3.0 - i * 0.001:.3f}"}, source=source)
                         for i in range(6)]
        promote(conc_name, conc_versions[0], "production")
        commands = [["rollback", conc_name, "--reason", "bench"] if i % 4 == 3 else
                    ["promote", conc_name, conc_versions[1 + i % 5], "--to", "production"] for i in range(n_concurrent)]
        t = time.perf_counter()
        results = run_at_once(commands, work)
        conc_wall = time.perf_counter() - t
        codes = sorted(code for _, code, _ in results)
        from lifecycle.registry.status import status

        consistent = status(conc_name)["consistent"]

        figures = {
            "server": "given: " + url if server is None else "mlflow server, sqlite backend, loopback, 2 workers",
            "repetitions": reps,
            "bare_set_alias_mlflowclient": summary(bare),
            "bare_rest_round_trip": summary(bare_rest),
            "promote_api": {**summary(promote_s), "requests": requests_made["promote"]},
            "rollback_api": {**summary(rollback_s), "requests": requests_made["rollback"]},
            "import_mlflow_process": summary(import_s),
            "promote_cli": summary(cli_promote),
            "rollback_cli": summary(cli_rollback),
            "concurrent": {"processes": n_concurrent, "wall_s": round(conc_wall, 2),
                           "ms_per_call": round(conc_wall / n_concurrent * 1000), "exit_codes": codes,
                           "consistent": consistent},
        }
        med_bare = statistics.median(bare)
        print(f"\nregistry benchmark ({reps} repetitions, {figures['server']})")
        print(f"  {'bare MlflowClient alias set':<36} median {med_bare * 1000:7.1f} ms  "
              f"p95 {pct(bare, .95) * 1000:7.1f} ms"
              "  (2 requests: MLflow reads the model first)")
        print(f"  {'bare REST round trip (alias set)':<36} median {statistics.median(bare_rest) * 1000:7.1f} ms  "
              f"p95 {pct(bare_rest, .95) * 1000:7.1f} ms")
        ratios = {}
        for key, label, values in (("promote_api", "promote, in-process API", promote_s),
                                   ("rollback_api", "rollback, in-process API", rollback_s)):
            med = statistics.median(values)
            ratios[f"{key}_vs_bare_alias_set"] = round(med / med_bare, 2)
            print(f"  {label:<36} median {med * 1000:7.1f} ms  p95 {pct(values, .95) * 1000:7.1f} ms  "
                  f"= {med / med_bare:4.1f}x a bare alias set, {figures[key]['requests']} requests  "
                  f"(target < 1000 ms: {'met' if med < 1 else 'MISSED'})")
        label = 'python -c "import mlflow.tracking"'
        print(f"  {label:<36} median {statistics.median(import_s) * 1000:7.1f} ms  (the floor of any CLI call)")
        for key, label, values in (("promote_cli", "lifecycle promote (CLI process)", cli_promote),
                                   ("rollback_cli", "lifecycle rollback (CLI process)", cli_rollback)):
            med = statistics.median(values)
            print(f"  {label:<36} median {med * 1000:7.1f} ms  p95 {pct(values, .95) * 1000:7.1f} ms  "
                  f"(= import {statistics.median(import_s) * 1000:.0f} ms + work)")
        print(f"  {n_concurrent} concurrent CLI processes{'':<10} wall {conc_wall:7.1f} s  "
              f"({conc_wall / n_concurrent * 1000:.0f} ms "
              f"per call serialised by the lock), exit codes {codes}, ledger and aliases consistent: {consistent}")
        ratios.update({"promote_api_median_ms": figures["promote_api"]["median_ms"],
                       "rollback_api_median_ms": figures["rollback_api"]["median_ms"],
                       "promote_cli_median_ms": figures["promote_cli"]["median_ms"],
                       "rollback_cli_median_ms": figures["rollback_cli"]["median_ms"],
                       "concurrent_ms_per_call": figures["concurrent"]["ms_per_call"]})
        written = write_json("registry", figures, ratios=ratios, path=args.json)
        if written:
            print(f"figures written to {written}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
