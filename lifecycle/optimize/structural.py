"""The structural variants of ``lifecycle compress``: ``prune`` (a pruned and recovered parent) and
``distill`` (a smaller preset trained against the parent).

:func:`check` runs before any MLflow run or version exists (everything a user can get wrong is
refused there: amount, preset, data, tokenizer); :func:`make` writes the variant folder inside the
compress run, logging the student's training under ``distill/...``. Both variants are ordinary
Hugging Face GPT-2 folders (config matching weights), plus ``lifecycle_variant.json`` saying how
they were made; any runtime loads them with ``from_pretrained``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from lifecycle.errors import ConfigError, DataError
from lifecycle.optimize.distill import DistillConfig, train_student
from lifecycle.optimize.prune import PruneConfig, PrunePlan, count_params, plan

log = logging.getLogger(__name__)

STRUCTURAL = ("prune", "distill")
#: ``--set`` keys with these prefixes go to :class:`StructuralConfig`; the rest to the EvalConfig.
SECTIONS = ("prune.", "distill.")


@dataclass
class StructuralConfig:
    """The ``prune`` and ``distill`` sections of ``lifecycle compress`` (``--set prune.importance=...``)."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    #: The student's preset for ``--method distill`` (``--preset``).
    preset: Optional[str] = None


@dataclass
class Checked:
    """What :func:`check` found: the training data, the tokenizer and (prune) the plan."""

    data: Any
    tokenizer: Any
    parent_config: Any
    plan: PrunePlan | None = None


def split_overrides(overrides: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """(``prune.``/``distill.`` overrides, the EvalConfig ones)."""
    mine = [o for o in overrides if o.startswith(SECTIONS)]
    return mine, [o for o in overrides if not o.startswith(SECTIONS)]


def check(method: str, parent_dir: Path, data_uri: str, scfg: StructuralConfig) -> Checked:
    """Refuse what cannot work before anything is written (ConfigError: exit 2, DataError: exit 4)."""
    from transformers import AutoConfig, AutoTokenizer

    from lifecycle.train.finetune import tokenizer_mismatch
    from lifecycle.train.model import get_preset
    from lifecycle.train.run import resolve_data

    config = AutoConfig.from_pretrained(str(parent_dir))
    the_plan = None
    if method == "prune":
        the_plan = plan(config, scfg.prune.amount, layers=scfg.prune.layers)
    else:
        if not scfg.preset:
            raise ConfigError("--method distill needs --preset (the student's shape: tiny or small)")
        get_preset(scfg.preset)
        if scfg.distill.steps <= 0:
            raise ConfigError("--method distill trains a student from scratch: distill.steps must be positive")
    try:
        data, _ = resolve_data(data_uri, search_runs=False)
    except DataError as exc:
        raise DataError(f"--method {method} trains on --data, which must be prepared data "
                        f"(`lifecycle prepare` output): {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(str(parent_dir))
    why = tokenizer_mismatch(data.tokenizer, tokenizer)
    if why:
        raise DataError(f"--data was not tokenized with the parent's tokenizer ({why}); prepare it with "
                        "`lifecycle prepare --tokenizer <the parent's folder or URI>`")
    if method == "distill" and len(tokenizer) != int(config.vocab_size):
        raise ConfigError(f"the parent's tokenizer has {len(tokenizer)} tokens but its output layer "
                          f"{config.vocab_size}: a student built for the tokenizer could not be matched to its logits")
    limit = int(getattr(config, "n_positions", 0) or 0)
    if limit and data.block_size > limit:
        raise DataError(f"--data blocks have {data.block_size} tokens but the parent takes at most {limit}")
    return Checked(data=data, tokenizer=tokenizer, parent_config=config, plan=the_plan)


def _calibration(data: Any, cfg: PruneConfig, device: Any) -> list[dict[str, Any]]:
    """Fixed, seeded batches of the training split (the importance must not depend on the run)."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = min(len(data.train), cfg.calibration_batches * cfg.calibration_batch_size)
    rows = torch.randperm(len(data.train), generator=g)[:n]
    batches = []
    for i in range(0, n, cfg.calibration_batch_size):
        batch = data.batch("train", rows[i: i + cfg.calibration_batch_size])
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def make(method: str, parent_dir: Path, out: Path, checked: Checked, scfg: StructuralConfig, *, device: str,
         parent_uri: str, log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
         progress: bool = False) -> dict[str, Any]:
    """Write the ``method`` variant of ``parent_dir`` to ``out``; the metadata also written beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    from lifecycle.optimize import importance
    from lifecycle.serving.variant import weights_bytes, write_variant
    from lifecycle.train.model import build_model, get_preset, save_model_dir

    dev = torch.device(device)
    teacher = AutoModelForCausalLM.from_pretrained(str(parent_dir), dtype=torch.float32).to(dev)
    meta: dict[str, Any] = {"method": method, "parent": parent_uri, "torch": torch.__version__,
                            "parent_weights_bytes": weights_bytes(parent_dir), "parent_params": count_params(teacher)}
    dcfg = scfg.distill
    if method == "prune":
        p, pcfg = checked.plan, scfg.prune
        assert p is not None
        batches = _calibration(checked.data, pcfg, dev)
        layer_sc = importance.layer_scores(teacher, batches) if p.drop_layers else None
        neuron_sc = importance.neuron_scores(teacher, batches, pcfg.importance)
        from lifecycle.optimize.prune import block_params_of, prune_model

        student = prune_model(teacher, p, layer_sc, neuron_sc).to(dev)
        if block_params_of(student) != p.kept_block_params:
            raise RuntimeError(f"pruned model has {block_params_of(student)} block parameters, "
                               f"the plan {p.kept_block_params}")
        parent_loss = importance.calibration_loss(teacher, batches)
        pruned_loss = importance.calibration_loss(student, batches)
        meta.update({"amount": p.amount, "amount_achieved": p.achieved, "importance": pcfg.importance,
                     "dropped_layers": p.dropped, "layer_scores": layer_sc, "n_layer": p.keep_layers,
                     "n_inner": p.keep_neurons, "parent_n_layer": p.n_layer, "parent_n_inner": p.n_inner,
                     "block_params": p.kept_block_params, "parent_block_params": p.block_params,
                     "calibration_loss_parent": parent_loss, "calibration_loss_pruned": pruned_loss})
        if log_metrics is not None:
            log_metrics({"prune/calibration_loss_parent": parent_loss,
                         "prune/calibration_loss_before_recovery": pruned_loss}, 0)
        del batches
    else:
        shape = get_preset(scfg.preset or "")
        student = build_model(scfg.preset or "", checked.tokenizer, seed=dcfg.seed,
                              n_positions=max(shape.n_positions, checked.data.block_size)).to(dev)
        meta.update({"preset": scfg.preset, "teacher": parent_uri})
    if dcfg.steps > 0:
        result = train_student(student, teacher, checked.data, dcfg, device=device, log=log_metrics,
                               progress=progress)
        student = result.model
        meta.update({"recovery_steps": result.steps, "recovery_best_val_loss": result.best_val_loss})
    meta.update({"distill": {k: getattr(dcfg, k) for k in ("steps", "kd_weight", "temperature", "learning_rate",
                                                           "batch_size", "seed")},
                 "params": count_params(student)})
    save_model_dir(student.to("cpu").eval(), checked.tokenizer, out)
    _check_loads(out, meta["params"])
    write_variant(out, meta)
    return meta


def _check_loads(folder: Path, params: int) -> None:
    """The written folder loads with plain ``from_pretrained`` to the same number of parameters."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    if count_params(reloaded) != params:
        raise RuntimeError(f"{folder}: config and weights disagree ({count_params(reloaded)} != {params} parameters)")
