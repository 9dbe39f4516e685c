"""``lifecycle evaluate``: measure a model on held-out data, optionally against a baseline."""

from __future__ import annotations

import click

#: Metrics printed in the summary, in this order (all of them are logged).
_SHOWN = ("loss", "perplexity", "bits_per_byte", "rougeL", "bleu", "exact_match", "latency_p50_ms",
          "latency_p95_ms", "tokens_per_s", "loss_tokens_per_s")


@click.command("evaluate")
@click.option("--model", required=True,
              help="Model: folder, runs:/<run_id>/model, models:/NAME/VERSION or models:/NAME@ALIAS.")
@click.option("--data", required=True,
              help="Prepared data (folder or runs:/<run_id>/prepared) or a raw source (text/JSONL file, hf:NAME).")
@click.option("--baseline", help="Compare against this model (default: models:/NAME@production when --model "
                                 "names another version of NAME).")
@click.option("--prompts", "prompts", type=click.Path(dir_okay=False),
              help="Prompt set: JSONL with 'prompt' and 'reference' (default: the split's documents cut in two).")
@click.option("--split", help="Split of prepared data: train, validation or test (default test).")
@click.option("--checks", help="Behavioural suite YAML (default: the packaged checks.yaml).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Device for the measurements.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="Precision of the measurements: auto (fp32 on CPU, bf16 on CUDA as served), fp32, or bf16 (CUDA).")
@click.option("--experiment", help="MLflow experiment of the run.")
@click.option("--no-tags", is_flag=True, help="Do not write eval/... tags on the registered version.")
@click.option("--no-baseline", is_flag=True, help="Do not compare with the production version by default.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of EvalConfig keys.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
def evaluate(model: str, data: str, baseline: str | None, prompts: str | None, split: str | None,
             checks: str | None, device: str | None, precision: str | None,
             experiment: str | None, no_tags: bool, no_baseline: bool,
             config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Evaluate MODEL on DATA in one MLflow run; tag the registered version with the results.

    Logs eval/loss, eval/perplexity, eval/bits_per_byte, eval/rougeL, eval/bleu, eval/exact_match,
    eval/latency_p50_ms, eval/latency_p95_ms, eval/tokens_per_s and eval/check_<name>; with a
    baseline also compare/<metric>_delta, compare/loss_delta_ci_low/high and compare/win_rate.

    On instruction data (prepared with --format sft) loss, perplexity and bits-per-byte are on the
    response tokens only, the prompts are the split's held-out prompts with their responses as
    references, and eval/examples.json is a table of prompt, reference and answer.
    """
    from lifecycle.config import load_config
    from lifecycle.evaluate.config import EvalConfig
    from lifecycle.evaluate.run import evaluate_model

    flags = {"split": split, "checks": checks, "device": device, "precision": precision, "experiment": experiment,
             "write_tags": False if no_tags else None,
             "compare.default_to_production": False if no_baseline else None}
    cfg = load_config(EvalConfig, config_path, overrides, **flags)
    out = evaluate_model(model, data, cfg=cfg, baseline=baseline, prompts_file=prompts)
    shown = "  ".join(f"{k}={out.metrics[k]:.4g}" for k in _SHOWN if k in out.metrics)
    click.echo(f"Evaluated {model} on data {out.data_digest[:12]}: {shown}")
    failed = [k[len('check_'):] for k, v in out.metrics.items() if k.startswith("check_") and v < 1]
    click.echo(f"Checks: {'all passed' if not failed else 'FAILED ' + ', '.join(failed)}")
    if out.baseline:
        c = out.compare
        click.echo(f"Against {out.baseline}: loss delta {c['loss_delta']:+.4f} "
                   f"[{c['loss_delta_ci_low']:+.4f}, {c['loss_delta_ci_high']:+.4f}] (paired on {out.paired_on}), "
                   f"bits/byte delta {c['bits_per_byte_delta']:+.4f}, win rate {c['win_rate']:.2f}")
    if out.tags_written and out.version is not None:
        click.echo(f"Tagged {out.version.uri} (eval_run_id={out.run_id})")
    click.echo(f"run {out.run_id}")
