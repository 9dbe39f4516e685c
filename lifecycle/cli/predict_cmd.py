"""``lifecycle predict``: batch generation over a file through the pyfunc model, resumable."""

from __future__ import annotations

import click

from lifecycle.cli.params import FLOAT, INT


@click.command("predict")
@click.argument("model_uri")
@click.option("--input", "input_path", required=True, help="JSONL, CSV or Parquet file with a prompt column.")
@click.option("--output", required=True,
              help="Output: .jsonl (a file) or .parquet (a folder of part files). Rerunning resumes it.")
@click.option("--prompt-column", default="prompt", show_default=True, help="Input column holding the prompts.")
@click.option("--id-column", help="Input column of unique row ids (default: id if present, else the row number).")
@click.option("--batch-size", type=INT, default=16, show_default=True, help="Rows per pyfunc call.")
@click.option("--max-new-tokens", type=INT, help="Most tokens generated per row (default: the model's).")
@click.option("--temperature", type=FLOAT, help="Sampling temperature (with --do-sample).")
@click.option("--top-p", type=FLOAT, help="Nucleus sampling threshold (with --do-sample).")
@click.option("--top-k", type=INT, help="Top-k sampling (with --do-sample; 0 = off).")
@click.option("--do-sample", is_flag=True, default=None, help="Sample instead of greedy decoding.")
@click.option("--seed", type=INT, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--repetition-penalty", type=FLOAT, help="Repetition penalty (> 0).")
@click.option("--truncate", is_flag=True, default=None, help="Cut prompts over the context instead of refusing.")
@click.option("--device", help="cpu, cuda or cuda:N (default: CUDA when available).")
@click.option("--overwrite", is_flag=True, help="Replace an output that belongs to another job.")
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True,
              help="local: in this process; spark: mlflow.pyfunc.spark_udf over a Spark DataFrame (Parquet output).")
@click.option("--master", help="Spark master URL with --engine spark (default: local[*], every core here).")
@click.option("--spark-conf", multiple=True, metavar="KEY=VALUE",
              help="Spark setting with --engine spark (repeatable).")
def predict(model_uri: str, input_path: str, output: str, prompt_column: str, id_column: str | None,
            batch_size: int, max_new_tokens: int | None, temperature: float | None, top_p: float | None,
            top_k: int | None, do_sample: bool | None, seed: int | None, stop: tuple[str, ...],
            repetition_penalty: float | None, truncate: bool | None, device: str | None, overwrite: bool,
            engine: str, master: str | None, spark_conf: tuple[str, ...]) -> None:
    """Generate for every row of --input with MODEL_URI (models:/NAME@ALIAS, models:/NAME/V, runs:/..., or a
    local pyfunc folder), writing id, prompt and the model's fields per row to --output.

    An interrupted run continues where it stopped when run again; no row is written twice.
    Exit codes: 2 bad option or output extension (--engine spark: .parquet only), 4 bad input,
    5 model not found, 6 output of another job.
    """
    from pathlib import Path

    from lifecycle.cli import check_writable
    from lifecycle.errors import ConfigError
    from lifecycle.predict import OUTPUT_SUFFIXES, predict_file

    if engine != "spark" and (master or spark_conf):
        raise ConfigError("--master and --spark-conf go with --engine spark")

    if Path(output).suffix.lower() in OUTPUT_SUFFIXES:
        # An unwritable output is refused (exit 14) before the model is loaded, not at the first batch.
        check_writable(output, "--output", file=Path(output).suffix.lower() == ".jsonl")

    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
              "do_sample": do_sample, "seed": seed, "stop": list(stop) or None,
              "repetition_penalty": repetition_penalty, "truncate": truncate}
    common = dict(prompt_column=prompt_column, id_column=id_column, batch_size=batch_size, params=params,
                  device=device, overwrite=overwrite)
    if engine == "spark":
        from lifecycle.predict_spark import DEFAULT_MASTER, parse_spark_conf, predict_spark

        out = predict_spark(model_uri, input_path, output, master=master or DEFAULT_MASTER,
                            spark_conf=parse_spark_conf(spark_conf), **common)
    else:
        out = predict_file(model_uri, input_path, output, **common)
    resumed = f" ({out.skipped} already there)" if out.skipped else ""
    click.echo(f"Wrote {out.written} row(s) to {out.output}{resumed}; {out.total} in the input.")
