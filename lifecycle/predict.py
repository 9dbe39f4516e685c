"""Batch generation: every row of a JSONL/CSV/Parquet file through the project's pyfunc model.

The model is the real pyfunc (``mlflow.pyfunc.load_model``), called once per batch with a
DataFrame, so a batch job and a served endpoint cannot drift apart. The output is append-only and
resumable:

* JSONL: one whole line per ``os.write`` on an ``O_APPEND`` file, ``fsync`` after each batch. A
  kill -9 can leave at most a torn last line; the next run drops it (with a warning) and goes on.
* Parquet: a folder of part files, one per batch, each written to a temporary name and renamed,
  so a part is either whole or absent.

Beside the output, ``<output>.job.json`` names the job (model URI, input digest, columns, params).
A rerun of the same job skips the ids already written; an output of another job is refused
unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from lifecycle.errors import ConfigError, DataError, OutputExistsError

log = logging.getLogger(__name__)

INPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".jsonl", ".parquet")
#: Output field holding the row number when the input has no id column.
ROW_FIELD = "row"


@dataclass
class PredictResult:
    """What one run did: rows written now, rows found already written, and where."""

    written: int
    skipped: int
    total: int
    output: Path


def sidecar_path(output: Path) -> Path:
    """``<output>.job.json``: the job an output belongs to."""
    return output.with_name(output.name + ".job.json")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (the input's identity for resume)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """numpy scalars as Python values, so that they serialise to JSON and compare across runs."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _key(value: Any) -> str:
    # Ids are compared by their JSON text: an int id read back from JSONL equals the one from Parquet.
    return json.dumps(_plain(value), sort_keys=True, default=str)


def id_field(path: Path, present: list[str], prompt_column: str, id_column: str | None) -> str | None:
    """The input's id column (``--id-column``, else ``id`` when present; None: row numbers), after
    checking that the named columns exist (both engines refuse the same way)."""
    if prompt_column not in present:
        raise DataError(f"{path}: no prompt column {prompt_column!r}; columns present: {', '.join(present)} "
                        "(use --prompt-column)")
    if id_column is not None and id_column not in present:
        raise DataError(f"{path}: no id column {id_column!r}; columns present: {', '.join(present)} "
                        "(use --id-column)")
    return id_column or ("id" if "id" in present else None)


def read_rows(input_path: Path, prompt_column: str, id_column: str | None) -> tuple[list[Any], list[str], str]:
    """The input's ids and prompts, and the output's id field; DataError on any problem, before any output."""
    from lifecycle.data.config import SourceConfig
    from lifecycle.data.sources import iter_records

    if not input_path.is_file():
        raise DataError(f"input not found: {input_path}")
    if input_path.suffix.lower() not in INPUT_SUFFIXES:
        raise DataError(f"{input_path}: unsupported input type {input_path.suffix or '(none)'}; "
                        f"use one of {', '.join(INPUT_SUFFIXES)}")
    records = list(iter_records(SourceConfig(uri=str(input_path), text_column=prompt_column)))
    if not records:
        raise DataError(f"{input_path}: empty input (no rows)")
    field = id_field(input_path, list(records[0]), prompt_column, id_column)
    ids = [_plain(r.get(field)) for r in records] if field else list(range(len(records)))
    prompts = [r.get(prompt_column) for r in records]
    for n, (row_id, prompt) in enumerate(zip(ids, prompts)):
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{input_path}: row {n} (id {row_id!r}): {prompt_column!r} is not a non-empty string")
    seen: set[str] = set()
    for row_id in ids:
        k = _key(row_id)
        if k in seen:
            raise DataError(f"{input_path}: duplicate id {row_id!r} in column {field!r}; ids must be unique")
        seen.add(k)
    return ids, prompts, field or ROW_FIELD


def _jsonl_done(path: Path, field: str) -> set[str]:
    """Ids already in a JSONL output; a torn last line (kill -9 mid-write) is cut off with a warning."""
    done: set[str] = set()
    good = 0
    with path.open("rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            row = json.loads(line)
        except ValueError:
            # Only the last line can be torn (each line is one os.write); anything else is not ours.
            if good + len(line) != len(data):
                raise DataError(f"{path}: line at byte {good} is not JSON; not an output of lifecycle predict")
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(line))
            os.truncate(path, good)
            break
        done.add(_key(row.get(field)))
        good += len(line)
    return done


def _parquet_done(path: Path, field: str) -> set[str]:
    import pyarrow.parquet as pq

    done: set[str] = set()
    for tmp in path.glob("*.tmp"):
        tmp.unlink()  # a part that was being written when the run stopped: it is written again
    for part in sorted(path.glob("part-*.parquet")):
        done.update(_key(v) for v in pq.read_table(part, columns=[field]).column(field).to_pylist())
    return done


class _Writer:
    """Appends batches of rows to a JSONL file or a folder of Parquet parts, durably."""

    def __init__(self, output: Path):
        self.output = output
        self.parquet = output.suffix.lower() == ".parquet"
        if self.parquet:
            output.mkdir(parents=True, exist_ok=True)
            self.part = len(list(output.glob("part-*.parquet")))
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.parquet:
            import pandas as pd

            final = self.output / f"part-{self.part:05d}.parquet"
            tmp = final.with_suffix(".tmp")
            pd.DataFrame(rows).to_parquet(tmp, index=False)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            self.part += 1
            return
        for row in rows:
            # One os.write per line: a kill can tear only the line being written, never interleave.
            os.write(self.fd, (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
        os.fsync(self.fd)

    def close(self) -> None:
        if not self.parquet:
            os.close(self.fd)


def job_record(model_uri: str, input_path: Path, prompt_column: str, id_field: str,
               params: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a job (not the engine nor the batch size: they do not change greedy outputs)."""
    return {"model_uri": model_uri, "input_digest": file_digest(input_path), "prompt_column": prompt_column,
            "id_column": id_field, "params": dict(sorted(params.items()))}


def prepare_output(output: Path, job: dict[str, Any], *, overwrite: bool) -> set[str]:
    """Claim ``output`` for ``job``: the ids it already holds (resume), or refuse another job's output."""
    side = sidecar_path(output)
    if overwrite:
        if output.is_dir():
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
        side.unlink(missing_ok=True)
    if side.exists():
        try:
            theirs = json.loads(side.read_text())
        except ValueError:
            theirs = None
        if theirs != job:
            raise OutputExistsError(f"{output} holds the output of another job (see {side.name}: other model, "
                                    "input or params); use --overwrite to replace it, or another --output")
    elif output.exists():
        raise OutputExistsError(f"{output} exists and is not a lifecycle predict output; "
                                "use --overwrite to replace it, or another --output")
    if not output.exists():
        return set()
    return _parquet_done(output, job["id_column"]) if output.is_dir() else _jsonl_done(output, job["id_column"])


def write_sidecar(output: Path, job: dict[str, Any]) -> None:
    """Record ``job`` beside ``output`` (temp name + rename: whole or absent)."""
    side = sidecar_path(output)
    side.parent.mkdir(parents=True, exist_ok=True)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(job, indent=1, sort_keys=True))
    os.replace(tmp, side)


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def check_request(output: Path, batch_size: int, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Refuse a bad output extension, batch size or generation param before anything is read or written.

    Returns the params that were given (``None`` values dropped).
    """
    from lifecycle.serving.requests import parse_params
    from lifecycle.serving.settings import ServingConfig

    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--output {output}: unknown extension {output.suffix or '(none)'}; "
                          f"use one of {', '.join(OUTPUT_SUFFIXES)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    params = {k: v for k, v in (params or {}).items() if v is not None}
    defaults = ServingConfig()
    # The model checks params again per call; checking here refuses a bad one before anything is written.
    parse_params(params, max_new_tokens_cap=defaults.max_new_tokens_cap,
                 default_max_new_tokens=defaults.default_max_new_tokens)
    return params


def predict_file(model_uri: str, input_path: str | os.PathLike[str], output: str | os.PathLike[str], *,
                 prompt_column: str = "prompt", id_column: str | None = None, batch_size: int = 16,
                 params: Mapping[str, Any] | None = None, device: str | None = None,
                 overwrite: bool = False, progress: bool = True) -> PredictResult:
    """Generate for every row of ``input_path`` not yet in ``output``; see the module docstring."""
    input_path, output = Path(input_path).expanduser(), Path(output).expanduser()
    params = check_request(output, batch_size, params)
    ids, prompts, id_field = read_rows(input_path, prompt_column, id_column)
    job = job_record(model_uri, input_path, prompt_column, id_field, params)
    done = prepare_output(output, job, overwrite=overwrite)
    todo = [n for n, row_id in enumerate(ids) if _key(row_id) not in done]
    result = PredictResult(written=0, skipped=len(ids) - len(todo), total=len(ids), output=output)
    if not todo:
        return result
    model = load_pyfunc(model_uri, device=device, batch_size=batch_size)
    write_sidecar(output, job)
    writer = _Writer(output)
    from tqdm import tqdm

    bar = tqdm(total=len(ids), initial=result.skipped, unit="row", disable=not progress, desc="predict")
    try:
        for batch in _batches(todo, batch_size):
            rows = run_batch(model, [prompts[n] for n in batch], params)
            writer.write([{id_field: ids[n], "prompt": prompts[n], **row} for n, row in zip(batch, rows)])
            result.written += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    return result


def load_pyfunc(model_uri: str, *, device: str | None = None, batch_size: int = 16) -> Any:
    """The project's pyfunc model, set for batch use: no coalescing (one caller), batches as large as asked.

    The settings go through the ``LIFECYCLE_*`` variables for the load only: MLflow ignores a
    ``model_config`` given to ``load_model`` when the model was logged without one.
    """
    import mlflow.pyfunc

    settings = {"LIFECYCLE_COALESCE": "false", "LIFECYCLE_WARMUP": "false",
                "LIFECYCLE_MAX_BATCH_SIZE": str(max(batch_size, 1))}
    if device:
        settings["LIFECYCLE_DEVICE"] = device
    saved = {var: os.environ.get(var) for var in settings}
    os.environ.update(settings)
    try:
        with mlflow_errors(f"model {model_uri}"):
            return mlflow.pyfunc.load_model(model_uri)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """MLflow's own exceptions as the project's one-line errors; anything else passes through."""
    from lifecycle.tracking import translate_mlflow_error

    try:
        yield
    except Exception as exc:
        if type(exc).__module__.startswith("mlflow"):
            raise translate_mlflow_error(exc, what) from None
        raise


def run_batch(model: Any, prompts: list[str], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One pyfunc call on a DataFrame of prompts; one dict of the model's fields per row."""
    import pandas as pd

    with mlflow_errors("predict"):
        out = model.predict(pd.DataFrame({"prompt": prompts}), params=dict(params) or None)
    return [{k: _plain(v) for k, v in row.items()} for row in out.to_dict(orient="records")]
