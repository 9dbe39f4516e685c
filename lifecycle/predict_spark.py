"""``lifecycle predict --engine spark``: the same job as the in-process engine, as ``mlflow.pyfunc.spark_udf``
over a Spark DataFrame.

The rows go through the very pyfunc model the in-process engine and ``mlflow models serve`` load
(``spark_udf(..., env_manager="local")``, one pyfunc call per Arrow batch of ``batch_size`` rows),
so both engines give the same greedy outputs row for row and share one output format and job file:
a Parquet folder of part files beside ``<output>.job.json``.

Resume: Spark writes the rows not yet in the output into a temporary sibling folder
(``.<output>.tmp-*``); only when the whole Spark job has succeeded are its part files renamed into
the output, one atomic rename each, and the folder fsynced. A kill during the Spark job leaves
nothing in the output (the next run removes the temporary folder and redoes the job); a kill while
the parts are being moved leaves whole parts only, whose ids the next run skips (a left-anti join
against the output). No id is ever written twice. An exclusive lock next to the output keeps two
runs from writing it at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from lifecycle.errors import ConfigError, DataError
from lifecycle.predict import (
    INPUT_SUFFIXES,
    ROW_FIELD,
    PredictResult,
    check_request,
    id_field,
    job_record,
    prepare_output,
    write_sidecar,
)

log = logging.getLogger(__name__)

#: The master when none is given: every core of this machine.
DEFAULT_MASTER = "local[*]"


def parse_spark_conf(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` words as a dict, exactly as written after the first ``=``; ConfigError otherwise."""
    conf: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or key != key.strip():
            raise ConfigError(f"--spark-conf {item!r}: expected KEY=VALUE (e.g. spark.executor.memory=4g)")
        conf[key] = value
    return conf


def spark_session(master: str, conf: Mapping[str, str] | None = None) -> Any:
    """A Spark session for one predict job: quiet (fatal JVM messages only), no web UI, few shuffle partitions.

    In local mode the Python workers run this very interpreter (so they import the same packages as
    the driver); on a cluster the executors' Python is the cluster's to configure (``--spark-conf``).
    """
    import warnings

    # pyspark 4.x warns that it does not fully support pandas 3 at every pandas UDF it builds.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("--engine spark needs pyspark: pip install 'lifecycle[spark]'") from None

    builder = SparkSession.builder.master(master).appName("lifecycle-predict")
    defaults = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "true",
                "spark.sql.shuffle.partitions": "4", "spark.sql.execution.arrow.pyspark.enabled": "true",
                # A failed task is reported once, as our one-line error; Spark's own log would add its
                # JVM and Python stack traces (and start-up chatter) to the terminal.
                "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={_quiet_log4j().as_uri()}",
                # ... and so does every Python worker.
                "spark.executorEnv.PYTHONWARNINGS": "ignore::FutureWarning"}
    if master.startswith("local"):
        defaults["spark.pyspark.python"] = sys.executable
        defaults["spark.pyspark.driver.python"] = sys.executable
    for key, value in {**defaults, **dict(conf or {})}.items():
        builder = builder.config(key, value)
    try:
        return builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - a JVM that cannot start or a master that cannot be reached
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot start Spark with master {master!r}: {first}") from None


def _quiet_log4j() -> Path:
    """A log4j2 configuration that lets only fatal JVM messages through (written once per process)."""
    import tempfile

    path = Path(tempfile.gettempdir()) / f"lifecycle-spark-log4j2-{os.getuid()}.properties"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text("rootLogger.level = fatal\nrootLogger.appenderRef.stderr.ref = console\n"
                       "appender.console.type = Console\nappender.console.name = console\n"
                       "appender.console.target = SYSTEM_ERR\nappender.console.layout.type = PatternLayout\n"
                       "appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n\n")
        os.replace(tmp, path)
    return path


def _read(spark: Any, path: Path) -> Any:
    """The input as a Spark DataFrame, read with the same meaning as the in-process reader: CSV values
    are text (header row names the columns), JSONL values keep their JSON types, Parquet its own."""
    suffix = path.suffix.lower()
    reader = spark.read.option("mode", "FAILFAST")
    try:
        if suffix == ".csv":
            return reader.option("header", "true").option("multiLine", "true").option("escape", '"').csv(str(path))
        if suffix == ".jsonl":
            return reader.json(str(path))
        return reader.parquet(str(path))
    except Exception as exc:  # noqa: BLE001 - Spark's analysis errors on an unreadable file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read it with Spark: {first}") from None


def load_input(spark: Any, path: Path, prompt_column: str, id_column: str | None) -> tuple[Any, str, int]:
    """(DataFrame of id and prompt, the output's id field, row count); DataError as the in-process reader says it.

    Checks run as Spark jobs, so the data never has to fit in the driver.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    if not path.is_file():
        raise DataError(f"input not found: {path}")
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise DataError(f"{path}: unsupported input type {path.suffix or '(none)'}; "
                        f"use one of {', '.join(INPUT_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty input (no rows)")
    df = _read(spark, path)
    present = [c for c in df.columns if c != "_corrupt_record"]
    total = df.count()
    if total == 0 or not present:
        raise DataError(f"{path}: empty input (no rows)")
    field = id_field(path, present, prompt_column, id_column)
    if field is None:
        # Row numbers in file order, as the in-process engine counts them.
        schema = StructType([*df.schema.fields, StructField(ROW_FIELD, LongType(), False)])
        df = spark.createDataFrame(df.rdd.zipWithIndex().map(lambda pair: (*pair[0], pair[1])), schema)
        field = ROW_FIELD
    prompt = F.col(f"`{prompt_column}`")
    if not isinstance(df.schema[prompt_column].dataType, StringType):
        raise DataError(f"{path}: {prompt_column!r} is not a non-empty string (column type "
                        f"{df.schema[prompt_column].dataType.simpleString()})")
    bad = df.filter(prompt.isNull() | (F.length(prompt) == 0)).select(F.col(f"`{field}`")).first()
    if bad is not None:
        raise DataError(f"{path}: id {bad[0]!r}: {prompt_column!r} is not a non-empty string")
    dup = df.groupBy(F.col(f"`{field}`")).count().filter(F.col("count") > 1).first()
    if dup is not None:
        raise DataError(f"{path}: duplicate id {dup[0]!r} in column {field!r}; ids must be unique")
    return df.select(F.col(f"`{field}`").alias(field), prompt.alias("prompt")), field, total


def _parts(folder: Path) -> Iterator[Path]:
    return iter(sorted(folder.glob("part-*.parquet")))


def predict_spark(model_uri: str, input_path: str | os.PathLike[str], output: str | os.PathLike[str], *,
                  prompt_column: str = "prompt", id_column: str | None = None, batch_size: int = 16,
                  params: Mapping[str, Any] | None = None, device: str | None = None, overwrite: bool = False,
                  master: str = DEFAULT_MASTER, spark_conf: Mapping[str, str] | None = None) -> PredictResult:
    """Generate for every row of ``input_path`` not yet in the Parquet ``output``, on Spark; see the module
    docstring. JSONL output is refused: Spark writes part files in parallel, not one appended file."""
    from lifecycle.data.publish import OutputLock, clean_stale, fsync_dir, temp_folder

    input_path, output = Path(input_path).expanduser(), Path(output).expanduser()
    params = check_request(output, batch_size, params)
    if output.suffix.lower() != ".parquet":
        raise ConfigError(f"--output {output}: --engine spark writes Parquet; use an --output ending in .parquet")
    spark = spark_session(master, spark_conf)
    try:
        # The input is checked before anything is created next to the output.
        df, field, total = load_input(spark, input_path, prompt_column, id_column)
        job = job_record(model_uri, input_path, prompt_column, field, params)
        output.parent.mkdir(parents=True, exist_ok=True)
        with OutputLock(output, what="lifecycle predict --engine spark"):
            clean_stale(output)
            done = prepare_output(output, job, overwrite=overwrite)
            if done:
                df = df.join(spark.read.parquet(str(output)).select(field), on=field, how="left_anti")
            todo = df.count() if done else total
            result = PredictResult(written=0, skipped=total - todo, total=total, output=output)
            if not todo:
                return result
            work = temp_folder(output)
            try:
                _run_job(spark, df, model_uri, work / "rows", batch_size, params, device)
                # The job file and the output folder appear only once there are rows to put in it.
                write_sidecar(output, job)
                output.mkdir(exist_ok=True)
                for part in _parts(work / "rows"):
                    os.replace(part, output / part.name)  # one whole part at a time: a kill leaves whole parts
                fsync_dir(output)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            result.written = todo
            return result
    finally:
        spark.stop()


def _run_job(spark: Any, df: Any, model_uri: str, dest: Path, batch_size: int, params: Mapping[str, Any],
             device: str | None) -> None:
    """Score ``df`` with the pyfunc as a Spark UDF and write id, prompt and the model's fields as Parquet."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    from lifecycle.data.publish import fsync_tree
    from lifecycle.predict import mlflow_errors

    # One pyfunc call per Arrow batch: the batch size the in-process engine uses.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    # The pyfunc's settings for batch use, in the executors' environment while the model loads.
    env = {"LIFECYCLE_COALESCE": "false", "LIFECYCLE_WARMUP": "false", "LIFECYCLE_MAX_BATCH_SIZE": str(batch_size)}
    if device:
        env["LIFECYCLE_DEVICE"] = device
    with mlflow_errors(f"model {model_uri}"):
        # The result type comes from the model's output schema: a struct of text, token counts, finish reason.
        udf = mlflow.pyfunc.spark_udf(spark, model_uri, env_manager="local", params=dict(params) or None,
                                      extra_env=env)
        slots = spark.sparkContext.defaultParallelism
        if df.rdd.getNumPartitions() < slots:
            df = df.repartition(slots)
        scored = df.withColumn("_out", udf(F.struct(F.col("prompt"))))
        try:
            scored.select(*df.columns, "_out.*").write.parquet(str(dest))
        except Exception as exc:  # noqa: BLE001 - an executor's error comes back as Py4J/PySpark text
            raise _spark_error(exc) from None
    fsync_tree(dest)


def _spark_error(exc: Exception) -> Exception:
    """A failed Spark job as one line: the model's own refusal (as the in-process engine words it), else
    the first line of what Spark says."""
    from lifecycle.errors import LifecycleError

    if type(exc).__module__.startswith("mlflow"):
        return exc
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        for prefix in ("mlflow.exceptions.MlflowException: ", "lifecycle.errors."):
            if line.startswith(prefix):
                return LifecycleError(f"predict: {line[len(prefix):] if prefix.startswith('mlflow') else line}")
    return LifecycleError(f"the Spark job failed: {lines[0] if lines else type(exc).__name__}")
