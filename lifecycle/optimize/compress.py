"""``lifecycle compress``: a smaller variant of a registered version, measured beside its parent.

One MLflow run (stage ``compress``) with a nested evaluation run:

1. everything that can be refused is checked first (method, version, data, device): a refusal
   leaves no run and no version behind;
2. the variant is written to a temporary folder (:mod:`lifecycle.serving.variant` knows the
   formats: ``int8-dynamic`` for CPU serving, ``fp16``/``bf16`` for GPU serving; ``prune`` and
   ``distill``, made by :mod:`lifecycle.optimize.structural`, are smaller dense models trained
   against the parent on ``--data``, their training logged under ``distill/...``);
3. the evaluation stage measures the variant with the parent as its baseline, on the same data
   and the same machine in the same process, so size, speed and quality deltas are like for like.
   Both are measured as registered pyfunc models (the variant is registered first, so parent and
   variant go through the same loading and serving path);
4. the new version of the same name is tagged ``compressed_from=<parent version>`` with the
   deltas and the evaluation's ``eval/...``/``compare/...`` tags, ready for ``lifecycle promote``.
   If the evaluation or the tagging fails, the new version is deleted again;
5. the trade-off table (parameters, bytes, tokens/s at each measured batch size, bits-per-byte,
   time spent making the variant) is logged as a table and a PNG.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle import tracking
from lifecycle.errors import ConfigError
from lifecycle.optimize.structural import STRUCTURAL, StructuralConfig
from lifecycle.serving.variant import HALF_DTYPES, METHODS, read_variant, weights_bytes, write_variant

log = logging.getLogger(__name__)

TAG_COMPRESSED_FROM = "compressed_from"
#: Metrics whose parent value and delta are kept on the variant (``compress/parent_<m>``, ``compress/<m>_delta``).
TRACKED = ("bits_per_byte", "loss", "perplexity", "tokens_per_s", "latency_p50_ms", "latency_p95_ms")
#: Tags that say what the variant is (also put on the logged model, before any measurement).
LINEAGE_TAGS = ("compress/amount", "compress/teacher", "compress/student_init", "compress/student",
                "compress/student_preset", "compress/importance")


@dataclass
class CompressOutcome:
    """What ``lifecycle compress`` reports."""

    name: str
    parent_version: str
    version: str
    model_uri: str
    method: str
    run_id: str
    eval_run_id: str
    device: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


def check_method(method: str) -> str:
    """Validate a method name."""
    if method not in METHODS:
        raise ConfigError(f"unknown compression method {method!r}; use one of: {', '.join(METHODS)}")
    return method


def _parent_data(client: Any, name: str, version: str, tags: dict[str, str]) -> str:
    """The data the parent was last evaluated on (its evaluation run's ``eval.data`` param)."""
    run_id = tags.get("eval_run_id")
    if run_id:
        try:
            data = client.get_run(run_id).data.params.get("eval.data")
        except Exception:  # noqa: BLE001 - a deleted run: ask for --data below
            data = None
        if data:
            return data
    raise ConfigError(f"{name} v{version} has no evaluation to take the data from: give --data "
                      "(the prepared data or raw source to measure parent and variant on)")


def make_variant(parent_dir: Path, method: str, out: Path, *, parent_uri: str) -> Path:
    """Write the ``method`` variant of the model in ``parent_dir`` to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lifecycle.serving.variant import quantize_int8, save_int8

    out.mkdir(parents=True, exist_ok=True)
    from lifecycle.optimize.prune import count_params

    model = AutoModelForCausalLM.from_pretrained(str(parent_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(parent_dir))
    params = count_params(model)  # quantisation and half precision keep every parameter
    meta: dict[str, Any] = {"method": method, "parent": parent_uri, "torch": torch.__version__,
                            "parent_weights_bytes": weights_bytes(parent_dir), "parent_params": params,
                            "params": params}
    if method == "int8-dynamic":
        quantized, names = quantize_int8(model)
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        save_int8(quantized, out)
        meta.update({"quantized_modules": names, "weights": "int8 per output channel (symmetric), dynamic "
                                                            "int8 activations; other parameters fp32"})
    else:
        dtype = getattr(torch, HALF_DTYPES[method])
        model.to(dtype).save_pretrained(out, safe_serialization=True)
        meta["weights"] = HALF_DTYPES[method]
    tokenizer.save_pretrained(out)
    write_variant(out, meta)
    return out


def compress(name: str, version: str, method: str, *, data: str | None = None, cfg: Any = None,
             experiment: str | None = None, progress: bool = True,
             structural: StructuralConfig | None = None) -> CompressOutcome:
    """Make, evaluate and register the ``method`` variant of ``name`` v``version``.

    ``structural``: the ``prune``/``distill`` settings (amount, importance, how the student starts,
    distillation steps and weights); ignored by the other methods.
    """
    import mlflow

    from lifecycle.evaluate.config import EvalConfig
    from lifecycle.evaluate.dataset import load_eval_data
    from lifecycle.registry import facts
    from lifecycle.registry.client import get_client
    from lifecycle.serving.variant import choose_device

    # --- everything that can be refused, before any run or version exists ----------------------
    check_method(method)
    cfg = cfg or EvalConfig()
    # The one device choice of serve/evaluate/compress: a CPU-only method falls back to CPU (logged).
    device = choose_device(cfg.device, method)
    cfg = _with(cfg, device=device)
    client = get_client()
    mv = facts.get_version(client, name, version)
    version = str(mv.version)
    parent_tags = dict(mv.tags or {})
    parent_uri = f"models:/{name}/{version}"
    parent_dir = tracking.resolve_model_dir(parent_uri)
    parent_variant = read_variant(parent_dir)
    if parent_variant is not None:
        raise ConfigError(f"{name} v{version} is already a compressed variant ({parent_variant['method']} of "
                          f"{parent_variant.get('parent', '?')}); compress the original version instead")
    data = data or _parent_data(client, name, version, parent_tags)
    # Unreadable data, an empty split or another tokenizer fails here, before the variant is made
    # (every method keeps the parent's tokenizer, so the parent answers for the variant).
    from lifecycle.evaluate.run import check_model

    eval_data = load_eval_data(data, cfg.split)
    check_model(eval_data, parent_dir, parent_uri)
    scfg = structural or StructuralConfig()
    checked = None
    if method in STRUCTURAL:
        from lifecycle.optimize import structural as shrink

        # amount, preset, student, data (its splits), tokenizer
        checked = shrink.check(method, parent_dir, data, scfg)
    cfg = _with(cfg, write_tags=True, compare=_with(cfg.compare, default_to_production=False))

    lineage = {k: parent_tags[k] for k in (tracking.TAG_DATA_DIGEST, tracking.TAG_DATA_RUN, tracking.TAG_TRAIN_RUN,
                                            tracking.TAG_BASE_MODEL) if parent_tags.get(k)}
    run_tags = {TAG_COMPRESSED_FROM: version, "compress.method": method, "compress.parent": parent_uri, **lineage}
    with tempfile.TemporaryDirectory(prefix="lifecycle-compress-") as tmp, \
            tracking.stage_run("compress", run_name=f"{name}-v{version}-{method}", tags=run_tags,
                               experiment=experiment) as run:
        from lifecycle.evaluate.run import evaluate_model
        from lifecycle.serving import log_model

        started = time.perf_counter()
        if checked is not None:
            from lifecycle.optimize import structural as shrink
            from lifecycle.tracking import AsyncMetricLogger

            mlflow.log_params(_structural_params(method, scfg))
            sink = AsyncMetricLogger(run.info.run_id)
            try:
                meta = shrink.make(method, parent_dir, Path(tmp) / "model", checked, scfg, device=device,
                                   parent_uri=parent_uri, log_metrics=sink.log, progress=progress)
            finally:
                sink.close()
            variant_dir = Path(tmp) / "model"
        else:
            variant_dir = make_variant(parent_dir, method, Path(tmp) / "model", parent_uri=parent_uri)
            meta = read_variant(variant_dir) or {}
        spent = time.perf_counter() - started
        sizes = (weights_bytes(parent_dir), weights_bytes(variant_dir))
        mlflow.log_params({"compress.method": method, "compress.parent": parent_uri, "compress.data": data,
                           "compress.device": device})
        shape_tags = _shape_tags(meta, spent)
        info = log_model(variant_dir, name="model", registered_model_name=name,
                         tags={**lineage, TAG_COMPRESSED_FROM: version, "compress/method": method,
                               **{k: v for k, v in shape_tags.items() if k in LINEAGE_TAGS}})
        new_version = str(info.registered_model_version)
        uri = f"models:/{name}/{new_version}"
        try:
            # Both sides are measured as registered pyfunc models: the same loading and serving
            # path for parent and variant, so the speed ratio compares the models, not the paths.
            with mlflow.start_run(run_name="evaluate", nested=True, experiment_id=run.info.experiment_id):
                ev = evaluate_model(uri, data, cfg=cfg, baseline=parent_uri, progress=progress)
            rows, tags, metrics = _results(ev, method, version, sizes, device, meta, spent)
            tags.update(shape_tags)
            rows[1]["model"] = f"v{new_version} ({method})"
            mlflow.log_metrics(metrics)
            _log_tradeoff(rows, name, version, method)
            _tag_version(client, name, new_version, parent_uri, tags, run.info.run_id, rows)
        except BaseException:
            # Nothing half-written: a version without its measurements must not stay registered.
            try:
                client.delete_model_version(name, new_version)
            except Exception as exc:  # noqa: BLE001 - report the original failure
                log.error("could not delete the unmeasured version %s v%s: %s", name, new_version, exc)
            raise
        mlflow.set_tag("registered_model_version", uri)
        return CompressOutcome(name=name, parent_version=version, version=new_version, model_uri=uri, method=method,
                               run_id=run.info.run_id, eval_run_id=ev.run_id, device=device, rows=rows, tags=tags)


def _structural_params(method: str, scfg: StructuralConfig) -> dict[str, Any]:
    """The run's params for a prune/distill variant (what decides the numbers)."""
    from lifecycle.config import flatten

    out = {f"distill.{k}": v for k, v in flatten(scfg.distill).items()}
    init = scfg.student_init() if method == "distill" else None
    if method == "prune" or scfg.prune_student:
        out.update({f"prune.{k}": v for k, v in flatten(scfg.prune).items()})
    if init is not None:
        out["compress.student_init"] = init.text
        if init.preset:
            out["distill.preset"] = init.preset
    return out


def _shape_tags(meta: dict[str, Any], spent: float) -> dict[str, str]:
    """compress/... tags on what the variant is: parameters, amount, teacher, time spent making it."""
    from lifecycle.evaluate.results import format_value

    tags = {"compress/time_s": format_value(spent)}
    if meta.get("params") and meta.get("parent_params"):
        tags.update({"compress/params": str(meta["params"]), "compress/parent_params": str(meta["parent_params"]),
                     "compress/param_ratio": format_value(meta["params"] / meta["parent_params"])})
    if "amount" in meta:  # prune, and a distilled student that started as the parent pruned
        tags.update({"compress/amount": repr(float(meta["amount"])),
                     "compress/amount_achieved": format_value(meta["amount_achieved"]),
                     "compress/importance": str(meta["importance"]),
                     "compress/block_params": str(meta["block_params"]),
                     "compress/parent_block_params": str(meta["parent_block_params"]),
                     "compress/dropped_layers": ",".join(str(i) for i in meta["dropped_layers"]) or "none",
                     "compress/n_layer": str(meta["n_layer"]), "compress/n_inner": str(meta["n_inner"])})
    if meta.get("method") == "distill":
        tags.update({"compress/teacher": str(meta["teacher"]), "compress/student_init": str(meta["student_init"])})
        if meta.get("preset"):
            tags["compress/student_preset"] = str(meta["preset"])
        if meta.get("student"):  # --student: the version an alias named when the student was taken
            tags["compress/student"] = str(meta["student"])
    if "recovery_steps" in meta:
        d = meta["distill"]
        tags.update({"compress/distill_steps": str(meta["recovery_steps"]),
                     "compress/distill_kd_weight": format_value(d["kd_weight"]),
                     "compress/distill_temperature": format_value(d["temperature"])})
    return tags


def _with(cfg: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def _baseline_metrics(run_id: str) -> dict[str, float]:
    """The parent's metrics as the evaluation logged them (``baseline/<metric>``), e.g. tokens/s per batch size."""
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient().get_run(run_id).data.metrics
    return {k[len("baseline/"):]: v for k, v in metrics.items() if k.startswith("baseline/")}


def _results(ev: Any, method: str, parent_version: str, sizes: tuple[int, int], device: str,
             meta: dict[str, Any] | None = None,
             spent: float = float("nan")) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, float]]:
    """Trade-off rows, the variant's compress/... tags and the run's compress/... metrics."""
    from lifecycle.evaluate.results import format_value

    meta = meta or {}
    mine = ev.metrics
    parent = {k: mine[k] - ev.compare[f"{k}_delta"] for k in TRACKED if k in mine and f"{k}_delta" in ev.compare}
    parent_all = _baseline_metrics(ev.run_id) if ev.run_id else {}
    parent_bytes, variant_bytes = sizes
    ratio = variant_bytes / parent_bytes if parent_bytes else float("nan")
    tags = {"compress/method": method, "compress/weights_bytes": str(variant_bytes),
            "compress/parent_weights_bytes": str(parent_bytes), "compress/size_ratio": format_value(ratio),
            "compress/eval_data_digest": ev.data_digest, "compress/device": device}
    metrics = {"compress/weights_bytes": float(variant_bytes), "compress/parent_weights_bytes": float(parent_bytes),
               "compress/size_ratio": ratio}
    for key, value in parent.items():
        tags[f"compress/parent_{key}"] = format_value(value)
        tags[f"compress/{key}_delta"] = format_value(mine[key] - value)
        metrics[f"compress/parent_{key}"] = value
        metrics[f"compress/{key}_delta"] = mine[key] - value
    # Speed ratios per batch size (variant / parent, the same generate call through the pyfunc model).
    for key in sorted(k for k in mine if k.startswith("tokens_per_s_bs") and parent_all.get(k)):
        tags[f"compress/parent_{key}"] = format_value(parent_all[key])
        tags[f"compress/{key}_ratio"] = format_value(mine[key] / parent_all[key])
        metrics[f"compress/{key}_ratio"] = mine[key] / parent_all[key]
    if "params" in meta:
        metrics.update({"compress/params": float(meta["params"]),
                        "compress/parent_params": float(meta["parent_params"]), "compress/time_s": spent})
    rows = []
    pairs = ((f"v{parent_version} (parent)", {**parent_all, **parent}, parent_bytes, meta.get("parent_params"), 0.0),
             ("variant", mine, variant_bytes, meta.get("params"), spent))
    for label, values, size, params, seconds in pairs:
        rows.append({"model": label, "params": int(params) if params else 0, "size_mb": size / 1e6,
                     "size_ratio": size / parent_bytes if parent_bytes else 1.0,
                     "tokens_per_s": float(values.get("tokens_per_s", float("nan"))),
                     "tokens_per_s_bs1": float(values.get("tokens_per_s_bs1", float("nan"))),
                     "tokens_per_s_bs8": float(values.get("tokens_per_s_bs8", float("nan"))),
                     "latency_p50_ms": float(values.get("latency_p50_ms", float("nan"))),
                     "bits_per_byte": float(values.get("bits_per_byte", float("nan"))),
                     "bits_per_byte_delta": float(values.get("bits_per_byte", 0.0) - parent.get("bits_per_byte", 0.0)),
                     "time_s": float(seconds), "device": device})
    return rows, tags, metrics


def _log_tradeoff(rows: list[dict[str, Any]], name: str, version: str, method: str) -> None:
    import mlflow

    from lifecycle.optimize.plots import plot_tradeoff

    mlflow.log_table(data={k: [r[k] for r in rows] for k in rows[0]}, artifact_file="compress/tradeoff.json")
    with tempfile.TemporaryDirectory(prefix="lifecycle-tradeoff-") as tmp:
        png = plot_tradeoff(rows, Path(tmp) / "tradeoff.png",
                            title=f"{name} v{version}: {method} trade-off (measured on {rows[0]['device']})")
        mlflow.log_artifact(str(png), artifact_path="plots")


def _tag_version(client: Any, name: str, version: str, parent_uri: str, tags: dict[str, str], run_id: str,
                 rows: list[dict[str, Any]]) -> None:
    """The compress/... tags (the evaluation already wrote eval/... and compare/...) and a description."""
    for key, value in {**tags, "compress_run_id": run_id}.items():
        client.set_model_version_tag(name, version, key, value)
    parent, variant = rows
    client.update_model_version(name, version, description=(
        f"{tags['compress/method']} variant of {parent_uri} made by run {run_id}: weights "
        f"{variant['size_mb']:.2f} MB ({variant['size_ratio']:.2f}x), {variant['tokens_per_s']:.1f} tokens/s "
        f"(parent {parent['tokens_per_s']:.1f}), bits/byte {variant['bits_per_byte']:.4f} "
        f"({variant['bits_per_byte_delta']:+.4f}), measured on {variant['device']}."))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The trade-off table as aligned text."""
    header = ("model", "params", "weights MB", "size", "tokens/s bs1", "tokens/s bs8", "p50 ms", "bits/byte",
              "Δ bits/byte", "time s")
    lines = [[r["model"], f"{r.get('params', 0) or '-'}", f"{r['size_mb']:.2f}", f"{r['size_ratio']:.2f}x",
              f"{r.get('tokens_per_s_bs1', r['tokens_per_s']):.1f}", f"{r.get('tokens_per_s_bs8', float('nan')):.1f}",
              f"{r['latency_p50_ms']:.1f}", f"{r['bits_per_byte']:.4f}", f"{r['bits_per_byte_delta']:+.4f}",
              f"{r.get('time_s', 0.0):.0f}"]
             for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(row) for row in lines])
