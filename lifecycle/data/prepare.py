"""The prepare stage as an MLflow run: resolve inputs, run the pass, log, publish atomically.

The output is locked for the whole run, built in a hidden sibling folder and swapped into place
only after the pass and the logging have succeeded (:mod:`~lifecycle.data.publish`), so a failed
or killed run never leaves a half-written output folder, and two runs into one output cannot
replace each other's result.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lifecycle.config import flatten
from lifecycle.data.card import plot_length_histogram
from lifecycle.data.config import PrepareConfig
from lifecycle.data.pipeline import PipelineResult, prepare_folder
from lifecycle.data.publish import OutputLock, check_output, clean_stale, publish, temp_folder
from lifecycle.data.sft import detect_format
from lifecycle.data.sources import check_source
from lifecycle.errors import ConfigError, NotFoundError

log = logging.getLogger(__name__)

ARTIFACT_PATH = "prepared"


@dataclass
class PrepareOutcome:
    """Where the prepared data went and what the run recorded."""

    output: Path
    run_id: str
    card: dict[str, Any]


def _is_uri(text: str) -> bool:
    return text.startswith(("runs:/", "models:/")) or "://" in text


def _resolve(text: str, what: str) -> Path:
    from lifecycle.tracking import resolve_artifact

    return resolve_artifact(text, what=what)


def _resolve_tokenizer(name: str | None) -> str | Path | None:
    if not name:
        return None
    if _is_uri(name):
        return _resolve(name, "tokenizer")
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.exists():
            raise NotFoundError(f"tokenizer not found: {path}")
        return path
    return name  # a hub name, loaded by transformers (offline here: fails with a clear message)


def prepare(cfg: PrepareConfig, output: str | Path, *, overwrite: bool = False,
            run_name: str | None = None) -> PrepareOutcome:
    """Run the prepare stage as one MLflow run and write the prepared folder to ``output``."""
    output = Path(output).expanduser().absolute()
    check_output(output, overwrite)
    if output.parent.exists() and not output.parent.is_dir():
        raise ConfigError(f"output parent {output.parent} is not a folder")

    source_uri = cfg.source.uri
    if _is_uri(source_uri):
        local = _resolve(source_uri, "source")
        cfg = replace(cfg, source=replace(cfg.source, uri=str(local)))
    check_source(cfg.source)
    fmt = detect_format(cfg)
    if fmt == "sft" and cfg.pack.auto_block:  # format auto found sft records: refused as format=sft is
        raise ConfigError("pack.auto_block (--block-size auto) is for raw text; these are sft records, which need "
                          "--block-size as a number")
    tokenizer_path = _resolve_tokenizer(cfg.tokenizer.name_or_path)
    reference = _resolve(cfg.dedup.against, "--dedup-against folder") if cfg.dedup.against else None

    import mlflow

    from lifecycle.tracking import TAG_DATA_DIGEST, mask_mapping, mask_secrets, stage_run

    output.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(output):
        clean_stale(output)
        check_output(output, overwrite)  # again: another run may have published while we started
        work = temp_folder(output)
        try:
            with stage_run("prepare", run_name=run_name or "prepare") as run:
                params = {f"cfg.{k}": v for k, v in flatten(cfg).items()}
                # An auto size is chosen from the text later: the config's default number is not what
                # runs, so its param says "auto" and the choice is logged as auto.* once made.
                auto = {"pack.block_size": cfg.pack.auto_block, "tokenizer.vocab_size": cfg.tokenizer.auto_vocab}
                params.update({f"cfg.{k}": "auto" for k, on in auto.items() if on})
                params.update({"source": source_uri, "output": str(output)})
                # Params are shown to every reader: a source's user:password@ never reaches them.
                mlflow.log_params({k: v[:6000] for k, v in mask_mapping(params).items()})
                mlflow.set_tag("data_format", fmt)
                result = prepare_folder(cfg, work, data_format=fmt, source_uri=source_uri,
                                        tokenizer_path=tokenizer_path, reference_dir=reference)
                _log_run(result, work, mask_secrets(source_uri))
                card = result.card
                chosen = {"pack.block_size": card["block_size"], "tokenizer.vocab_size": card["vocab_size"]}
                mlflow.log_params({f"auto.{k}": chosen[k] for k, on in auto.items() if on})
                mlflow.set_tag(TAG_DATA_DIGEST, card["digest"])
                run_id = run.info.run_id
            publish(work, output)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return PrepareOutcome(output=output, run_id=run_id, card=result.card)


def metrics_of(card: dict[str, Any], seconds: dict[str, float]) -> dict[str, float]:
    """The ``data/...`` metrics of a data card (the names policies and dashboards use)."""
    m: dict[str, float] = {}
    for key, value in card["counts"].items():
        if isinstance(value, (int, float)):
            m[f"data/{key}"] = value
    for name, value in card["filters"].items():
        m[f"data/filter/{name}"] = value
    for name, value in card["dedup"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "threshold":
            m[f"data/dedup/{name}"] = value
    for name, value in card["pii"].items():
        m[f"data/pii/{name}"] = value
    for split in card["splits"]:
        m[f"data/docs/{split}"] = card["splits"][split]
        m[f"data/tokens/{split}"] = card["tokens"][split]
        m[f"data/blocks/{split}"] = card["blocks"][split]
    for key in ("truncated_examples", "dropped_too_long", "response_tokens"):
        for split, value in card.get("sft", {}).get(key, {}).items():
            m[f"data/sft/{key}/{split}"] = value
    m["data/vocab_size"] = card["vocab_size"]
    m["data/block_size"] = card["block_size"]
    for name, value in seconds.items():
        m[f"data/seconds/{name}"] = round(value, 4)
    total = seconds.get("total") or 0.0
    if total > 0:
        m["data/throughput_mb_s"] = card["counts"]["bytes_read"] / 1e6 / total
        m["data/throughput_tokens_s"] = sum(card["tokens"].values()) / total
    return {k: float(v) for k, v in m.items()}


def _log_run(result: PipelineResult, work: Path, source_uri: str) -> None:
    import mlflow

    card = result.card
    mlflow.log_metrics(metrics_of(card, result.seconds))
    mlflow.log_dict(card, "data_card.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_length_histogram(card["document_length_chars"], Path(tmp) / "document_lengths.png",
                                    title=f"Kept documents of {source_uri}")
        mlflow.log_artifact(str(png), "plots")
    mlflow.log_dict({k: v for k, v in sorted(result.drop_samples.items())}, "samples/dropped.json")
    mlflow.log_artifacts(str(work), ARTIFACT_PATH)
    _log_input(card, work, source_uri)


def _log_input(card: dict[str, Any], work: Path, source_uri: str) -> None:
    """Record the prepared data as a run input (lineage), with its content digest."""
    import mlflow
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    rows = []
    with (work / "raw" / "train.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line)["text"][:2000])
            if len(rows) >= 20:
                break
    try:
        # Local paths resolve to MLflow's local-artifact source, URIs to theirs. MLflow warns
        # that a local path matches two registered source types; either is right.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(source_uri)
    except Exception:  # noqa: BLE001 - builtin:/hf: names have no MLflow source type
        source = CodeDatasetSource({"source": source_uri})
    # A small preview frame gives the dataset a schema; the digest is the content digest of
    # everything (truncated: the tracking store keeps 36 characters).
    dataset = mlflow.data.from_pandas(pd.DataFrame({"text": rows}), source=source,
                                      name=f"prepared:{Path(source_uri).name or source_uri}",
                                      digest=card["digest"][:32])
    mlflow.log_input(dataset, context="prepare")
