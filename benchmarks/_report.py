"""Machine-readable benchmark results: each benchmark hands its figures to :func:`write_json`.

A benchmark writes JSON when it is given ``--json PATH`` or when ``LIFECYCLE_BENCH_JSON`` names a
file (what ``benchmarks/run_all.py`` sets for each benchmark it runs); otherwise this does
nothing and the benchmark only prints, as before.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ENV = "LIFECYCLE_BENCH_JSON"


def json_path(argv: list[str] | None = None) -> str | None:
    """Where to write: ``--json PATH`` / ``--json=PATH`` in ``argv``, else ``$LIFECYCLE_BENCH_JSON``."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--json" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--json="):
            return arg.split("=", 1)[1]
    return os.environ.get(ENV) or None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, RAM, GPU, library versions, date (UTC)."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 1024 ** 3:.0f} GiB)"
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPU to report
        gpu = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "mlflow": _version("mlflow"),
        "transformers": _version("transformers"),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_json(benchmark: str, figures: dict[str, Any], *, ratios: dict[str, Any] | None = None,
               path: str | None = None) -> str | None:
    """Write ``figures`` (and the headline ``ratios``) of ``benchmark`` as JSON, if asked to.

    Returns the path written, or None when no path was given. Written to a temporary file and
    renamed, so a reader never sees half a file.
    """
    path = path or json_path()
    if not path:
        return None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": benchmark, "argv": sys.argv[1:], "machine": machine(), "ratios": ratios or {},
            "figures": figures}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    tmp.replace(out)
    return str(out)


class Figures:
    """A benchmark's figures, written to ``path`` (as :func:`write_json` does) every time some
    are added: a benchmark stopped by a timeout or an error still hands over what it measured."""

    def __init__(self, benchmark: str, path: str | None):
        self.benchmark = benchmark
        self.path = path
        self.figures: dict[str, Any] = {}
        self.ratios: dict[str, Any] = {}

    def add(self, ratios: dict[str, Any] | None = None, **figures: Any) -> None:
        """Keep ``figures`` (and headline ``ratios``) and rewrite the file."""
        self.figures.update(figures)
        self.ratios.update(ratios or {})
        if self.path:
            write_json(self.benchmark, self.figures, ratios=self.ratios, path=self.path)
