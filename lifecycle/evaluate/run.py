"""`lifecycle evaluate`: measure a model (and its baseline) on held-out data in one MLflow run.

Everything that can be refused is checked before the run starts (model, data, tokenizer, prompt
file, checks suite, baseline), so bad input leaves no run behind; inside the run every metric is
computed and logged before any tag is written on the model version, so a failure half-way leaves
the version's tags as they were.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle.config import flatten
from lifecycle.errors import DataError
from lifecycle.evaluate import compare as cmp
from lifecycle.evaluate import generation, results
from lifecycle.evaluate.checks import load_suite
from lifecycle.evaluate.config import EvalConfig
from lifecycle.evaluate.dataset import EvalData, load_eval_data, tokenizers_match
from lifecycle.evaluate.measure import SideResult, measure_model
from lifecycle.precision import tf32

log = logging.getLogger(__name__)

#: Metrics compared as ``compare/<metric>_delta`` (challenger - baseline).
COMPARED = ("loss", "perplexity", "bits_per_byte", "reference_bits_per_byte", "rougeL", "bleu", "exact_match",
            "latency_p50_ms", "latency_p95_ms", "tokens_per_s")


@dataclass
class EvalOutcome:
    """What an evaluation produced (returned to the CLI and to callers such as the pipeline)."""

    run_id: str
    metrics: dict[str, float]
    compare: dict[str, float] = field(default_factory=dict)
    data_digest: str = ""
    version: results.VersionRef | None = None
    baseline: str | None = None
    tags_written: bool = False
    paired_on: str | None = None


def _model_dir(uri: str) -> Path:
    from lifecycle.tracking import resolve_model_dir

    path = resolve_model_dir(uri)
    if not path.exists():
        from lifecycle.errors import NotFoundError

        raise NotFoundError(f"model not found: {uri} (give a local folder, runs:/<run_id>/<path> or "
                            "models:/<name>@<alias>)")
    return path


def check_model(data: EvalData, model_dir: Path, uri: str, *, same_tokenizer: bool = True) -> Any:
    """Refuse, before any run exists, a model that cannot read ``data``: another tokenizer than
    the prepared data's (unless ``same_tokenizer`` is False: a baseline re-packs the raw text
    with its own) or a context shorter than the prepared blocks."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = AutoConfig.from_pretrained(str(model_dir))
    context = next((v for v in (getattr(config, k, None) for k in ("n_positions", "max_position_embeddings"))
                    if isinstance(v, int) and v > 0), None)
    matches = tokenizers_match(data, tokenizer)
    if same_tokenizer and not matches:
        theirs, ours = data.card.get("vocab_size", "?"), len(tokenizer)
        how = (f"vocabularies differ: data {theirs} tokens, model {ours}" if theirs != ours
               else f"both have {ours} tokens, but not the same ones")
        raise DataError(f"{data.source} was tokenized with a different tokenizer than {uri} ({how}); "
                        "evaluate on data prepared with the model's tokenizer, or on a raw text source")
    if matches and data.block_size and context and data.block_size > context:
        raise DataError(f"{data.source} has blocks of {data.block_size} tokens but {uri} reads at most "
                        f"{context}; prepare the data with --block-size {context} or less")
    return tokenizer


def sft_prompts(data: EvalData, num_prompts: int) -> list[generation.Prompt]:
    """Instruction data's prompt set: the split's first examples, each prompt as the model is
    served it (chat rendered with the template) and its response as the reference."""
    assert data.sft is not None
    return [generation.Prompt(e["prompt"], e["response"]) for e in data.sft.examples[:num_prompts]]


def example_table(prompts: list[generation.Prompt], ch: SideResult, bl: SideResult | None) -> dict[str, list[Any]]:
    """Prompt, reference and answer per held-out example, with its scores, for people to read."""
    norm = lambda t: " ".join(t.split())  # noqa: E731 - exact match ignores whitespace runs and ends
    table: dict[str, list[Any]] = {
        "prompt": [p.prompt for p in prompts],
        "reference": [p.reference for p in prompts],
        "answer": list(ch.generations),
        "exact_match": [float(norm(a) == norm(p.reference)) for a, p in zip(ch.generations, prompts)],
        "rougeL": list(ch.prompt_rouge),
    }
    if bl is not None:
        table["baseline_answer"] = list(bl.generations)
        table["baseline_exact_match"] = [float(norm(a) == norm(p.reference)) for a, p in zip(bl.generations, prompts)]
    return table


def compare_sides(ch: SideResult, bl: SideResult, cfg: EvalConfig) -> tuple[dict[str, float], str, Any, Any]:
    """compare/... values, the unit the bootstrap paired on, the table and the bootstrap result."""
    out = {f"{k}_delta": v for k, v in cmp.deltas({k: ch.metrics[k] for k in COMPARED if k in ch.metrics},
                                                   bl.metrics).items()}
    for key in ch.metrics:
        if key.startswith("check_") and key in bl.metrics:
            out[f"{key}_delta"] = ch.metrics[key] - bl.metrics[key]
    kw = {"samples": cfg.compare.bootstrap_samples, "confidence": cfg.compare.confidence, "seed": cfg.seed}
    doc_boot = cmp.paired_bootstrap(ch.doc_bpb, bl.doc_bpb, **kw)
    out["bits_per_byte_delta_ci_low"], out["bits_per_byte_delta_ci_high"] = doc_boot.low, doc_boot.high
    if ch.vocab_digest == bl.vocab_digest and ch.blocks_digest == bl.blocks_digest:
        paired_on = "blocks"
        boot = cmp.paired_bootstrap(ch.block_nll, bl.block_nll, **kw)
    else:
        # Different tokenizers cut the text into different blocks: block losses do not pair up.
        # The documents do, and bits-per-byte does not depend on the tokenizer.
        paired_on = "documents_bits_per_byte"
        boot = doc_boot
    out["loss_delta_ci_low"], out["loss_delta_ci_high"] = boot.low, boot.high
    out["win_rate"] = cmp.win_rate(ch.prompt_bpb, bl.prompt_bpb, lower_is_better=True)
    out["win_rate_rougeL"] = cmp.win_rate(ch.prompt_rouge, bl.prompt_rouge, lower_is_better=False)
    shown = {k: v for k, v in ch.metrics.items() if not k.startswith("num_")}
    table = cmp.comparison_table(shown, bl.metrics)
    return out, paired_on, table, boot


def evaluate_model(model: str, data: str, *, cfg: EvalConfig | None = None, baseline: str | None = None,
                   prompts_file: str | None = None, progress: bool = True) -> EvalOutcome:
    """Evaluate ``model`` on ``data`` (and against ``baseline``) in one MLflow run; tag the version."""
    import mlflow

    from lifecycle.evaluate.loss import resolve_precision
    from lifecycle.serving.variant import variant_device
    from lifecycle.tracking import TAG_DATA_DIGEST, mask_mapping, stage_run

    cfg = cfg or EvalConfig()
    # --- everything that can be refused, before any run exists --------------------------------
    model_dir = _model_dir(model)
    # A CPU-only variant falls back to CPU (logged) unless a device was asked for.
    device = variant_device(model_dir, cfg.device)
    precision = resolve_precision(cfg.precision, device)
    version = results.registered_version(model)
    eval_data = load_eval_data(data, cfg.split)
    check_model(eval_data, model_dir, model)
    if prompts_file:
        prompts = generation.load_prompts(prompts_file, limit=cfg.generation.num_prompts)
        prompt_source = prompts_file
    elif eval_data.sft is not None:
        prompts = sft_prompts(eval_data, cfg.generation.num_prompts)
        prompt_source = f"sft: the first {len(prompts)} examples of split {eval_data.split} (prompt, response)"
    else:
        g = cfg.generation
        prompts = generation.default_prompts(eval_data.documents, num_prompts=g.num_prompts,
                                             cut_fraction=g.cut_fraction, max_prompt_chars=g.max_prompt_chars,
                                             min_document_chars=g.min_document_chars,
                                             reference_words=g.reference_words)
        prompt_source = f"default: {len(prompts)} documents of split {eval_data.split} cut in two"
    suite = load_suite(cfg.checks)
    baseline_uri = baseline
    if baseline_uri is None and version is not None and cfg.compare.default_to_production:
        prod = results.production_version(version.name)
        if prod is not None and prod.version != version.version:
            baseline_uri = prod.uri
    baseline_dir = _model_dir(baseline_uri) if baseline_uri else None
    if baseline_uri and baseline_dir:
        check_model(eval_data, baseline_dir, baseline_uri, same_tokenizer=False)

    # --- measure, log, then tag ---------------------------------------------------------------
    run_tags = {TAG_DATA_DIGEST: eval_data.digest, results.TAG_EVAL_DIGEST: eval_data.digest,
                "eval_model": model, "data_format": "sft" if eval_data.sft is not None else "lm"}
    if version is not None:
        run_tags["eval_model_version"] = version.uri
    # fp32 means fp32: TF32 off while measuring, whatever an earlier stage in this process left set.
    with stage_run("evaluate", tags=run_tags, experiment=cfg.experiment) as run, tf32(False):
        run_id = run.info.run_id
        # Namespaced: under `mlflow run` the entry point's own parameters (model, data, ...) are
        # already logged with their raw values, and MLflow refuses to change a logged param.
        params = {"eval.model": model, "eval.data": data, "eval.split": eval_data.split,
                  "eval.prompts": prompt_source, "eval.baseline": baseline_uri or "",
                  "eval.data_digest": eval_data.digest, "eval.device": device, "eval.precision": precision,
                  **{f"config.{k}": v for k, v in flatten(cfg).items()}}
        # Model, data and baseline URIs may carry user:password@: params show only the masked form.
        mlflow.log_params({k: v[:6000] for k, v in mask_mapping(params).items()})
        from lifecycle.lineage import CONTEXT_EVALUATION, log_data_input

        eval_dataset = log_data_input(eval_data.source, eval_data.digest, context=CONTEXT_EVALUATION,
                                      split=eval_data.split)
        ch = measure_model("challenger", model, model_dir, eval_data, prompts, suite, cfg, device=device,
                           progress=progress)
        bl = (measure_model("baseline", baseline_uri, baseline_dir, eval_data, prompts, suite, cfg,
                            device=device, progress=progress) if baseline_uri and baseline_dir else None)
        metrics = {f"eval/{k}": v for k, v in ch.metrics.items()}
        compare_values: dict[str, float] = {}
        paired_on = None
        extra_tags = {"eval_served_via": ch.served_via, "eval_served_device": ch.served_device,
                      "eval_precision": ch.precision}
        mlflow.set_tag("eval_precision", ch.precision)
        with tempfile.TemporaryDirectory(prefix="lifecycle-eval-") as tmp:
            tmpdir = Path(tmp)
            generation.write_prompts(prompts, tmpdir / "prompts.jsonl")
            mlflow.log_artifact(str(tmpdir / "prompts.jsonl"), "eval")
            rows: dict[str, list[Any]] = {"prompt": [p.prompt for p in prompts],
                                          "reference": [p.reference for p in prompts],
                                          "challenger": ch.generations,
                                          "challenger_reference_bpb": ch.prompt_bpb}
            if bl is not None:
                metrics.update({f"baseline/{k}": v for k, v in bl.metrics.items()})
                compare_values, paired_on, table, boot = compare_sides(ch, bl, cfg)
                metrics.update({f"compare/{k}": v for k, v in compare_values.items()})
                rows.update({"baseline": bl.generations, "baseline_reference_bpb": bl.prompt_bpb})
                mlflow.log_table(data=table, artifact_file="compare/comparison.json")
                chart = cmp.comparison_chart(table, boot, tmpdir / "comparison.png",
                                             title=f"{model} vs {baseline_uri}",
                                             boot_label="loss" if paired_on == "blocks" else "bits/byte")
                mlflow.log_artifact(str(chart), "compare")
                mlflow.set_tags(mask_mapping({
                    "compare_baseline": baseline_uri, "compare_paired_on": paired_on,
                    "compare_data_digest": eval_data.digest,
                    "compare_note": ("both models measured on the same data digest "
                                     f"{eval_data.digest[:12]}; bootstrap paired on {paired_on}")}))
                extra_tags["compare_paired_on"] = paired_on
            mlflow.log_table(data=rows, artifact_file="eval/generations.json")
            if eval_data.sft is not None:
                mlflow.log_table(data=example_table(prompts, ch, bl), artifact_file="eval/examples.json")
            checks_out = {side.label: [vars(r) for r in side.checks] for side in (ch, bl) if side is not None}
            notes = {side.label: side.notes for side in (ch, bl) if side is not None and side.notes}
            summary = {"model": model, "baseline": baseline_uri, "data": data, "split": eval_data.split,
                       "data_digest": eval_data.digest, "metrics": metrics, "checks": checks_out, "notes": notes,
                       "paired_on": paired_on}
            (tmpdir / "results.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
            mlflow.log_artifact(str(tmpdir / "results.json"), "eval")
        # The challenger's own results also go on its logged model's page, against the evaluation data.
        model_id = results.logged_model_id(model, version)
        own = {k: v for k, v in metrics.items() if k.startswith("eval/")} if model_id else {}
        if own:
            mlflow.log_metrics(own, model_id=model_id, dataset=eval_dataset)
        mlflow.log_metrics({k: v for k, v in metrics.items() if k not in own})
        outcome = EvalOutcome(run_id=run_id, metrics=ch.metrics, compare=compare_values,
                              data_digest=eval_data.digest, version=version, baseline=baseline_uri,
                              paired_on=paired_on)
        # Last: the version's tags, once everything above has succeeded.
        if version is not None and cfg.write_tags:
            tags = mask_mapping(results.version_tags(ch.metrics, run_id=run_id, data_digest=eval_data.digest,
                                                     compare=compare_values or None, baseline=baseline_uri,
                                                     extra=extra_tags))
            results.write_version_tags(version, tags)
            outcome.tags_written = True
    return outcome
