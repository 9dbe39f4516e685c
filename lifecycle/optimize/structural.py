"""The structural variants of ``lifecycle compress``: ``prune`` (a pruned and recovered parent) and
``distill`` (a smaller student trained against the parent; it starts as a fresh preset, as the
parent pruned, or from another model's weights: :mod:`lifecycle.optimize.student`).

:func:`check` runs before any MLflow run or version exists (everything a user can get wrong is
refused there: amount, how the student starts, the ``--student`` model, data, tokenizer);
:func:`make` writes the variant folder inside the compress run, logging the student's training
under ``distill/...``. Both variants are ordinary Hugging Face folders (config matching weights),
plus ``lifecycle_variant.json`` saying how they were made; any runtime loads them with
``from_pretrained``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from lifecycle.errors import ConfigError, DataError
from lifecycle.optimize.distill import DistillConfig, train_student
from lifecycle.optimize.prune import PruneConfig, PrunePlan, count_params, plan
from lifecycle.optimize.student import (
    PRUNED,
    SCRATCH,
    StudentInit,
    StudentModel,
    check_preset,
    check_student,
    fresh_student,
    init_of,
)

log = logging.getLogger(__name__)

STRUCTURAL = ("prune", "distill")
#: ``--set`` keys with these prefixes go to :class:`StructuralConfig`; the rest to the EvalConfig.
SECTIONS = ("prune.", "distill.")


@dataclass
class StructuralConfig:
    """The ``prune`` and ``distill`` sections of ``lifecycle compress`` (``--set prune.importance=...``)."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    #: ``--method distill``'s student starts as exactly one of: a fresh preset (``--preset``),
    #: the parent pruned by ``prune.amount`` (``--amount``: ``prune_student``), or the weights of
    #: the model at ``student`` (``--student``).
    preset: Optional[str] = None
    prune_student: bool = False
    student: Optional[str] = None

    def student_init(self) -> StudentInit:
        """How the distilled student starts (ConfigError unless exactly one way is chosen)."""
        return init_of(self.preset, self.prune.amount if self.prune_student else None, self.student)


@dataclass
class Checked:
    """What :func:`check` found: the training data, the tokenizer and (prune) the plan."""

    data: Any
    tokenizer: Any
    parent_config: Any
    plan: PrunePlan | None = None
    init: StudentInit | None = None  # distill: how the student starts
    student: StudentModel | None = None  # distill --student: the checked model


def split_overrides(overrides: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """(``prune.``/``distill.`` overrides, the EvalConfig ones)."""
    mine = [o for o in overrides if o.startswith(SECTIONS)]
    return mine, [o for o in overrides if not o.startswith(SECTIONS)]


def check(method: str, parent_dir: Path, data_uri: str, scfg: StructuralConfig) -> Checked:
    """Refuse what cannot work before anything is written (ConfigError: exit 2, DataError: exit 4).

    The training data's own checks (prepared, readable, no empty split) are the training stage's
    :func:`lifecycle.train.run.resolve_data`.
    """
    from transformers import AutoConfig, AutoTokenizer

    from lifecycle.train.finetune import tokenizer_mismatch
    from lifecycle.train.model import get_preset
    from lifecycle.train.run import resolve_data

    config = AutoConfig.from_pretrained(str(parent_dir))
    the_plan, init = None, None
    if method == "prune":
        if scfg.preset is not None or scfg.prune_student or scfg.student is not None:
            raise ConfigError("--preset and --student are for --method distill, not prune")
        the_plan = plan(config, scfg.prune.amount, layers=scfg.prune.layers)
    else:
        init = scfg.student_init()
        if init.kind == SCRATCH:
            get_preset(init.preset or "")
        elif init.kind == PRUNED:
            the_plan = plan(config, scfg.prune.amount, layers=scfg.prune.layers)
        if scfg.distill.steps <= 0:
            raise ConfigError("--method distill trains its student against the parent: distill.steps must be positive")
    try:
        data, _ = resolve_data(data_uri, search_runs=False)
    except DataError as exc:
        raise DataError(f"--method {method} trains on --data (prepared data, `lifecycle prepare` output): "
                        f"{exc}") from None
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
    student = None
    if init is not None and init.uri is not None:
        student = check_student(init.uri, config, tokenizer, data.block_size)
    if init is not None and init.kind == SCRATCH:
        check_preset(init.preset or "", config, tokenizer, data.block_size)
    return Checked(data=data, tokenizer=tokenizer, parent_config=config, plan=the_plan, init=init, student=student)


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

    from lifecycle.serving.variant import weights_bytes, write_variant
    from lifecycle.train.model import save_model_dir

    dev = torch.device(device)
    teacher = AutoModelForCausalLM.from_pretrained(str(parent_dir), dtype=torch.float32).to(dev)
    meta: dict[str, Any] = {"method": method, "parent": parent_uri, "torch": torch.__version__,
                            "parent_weights_bytes": weights_bytes(parent_dir), "parent_params": count_params(teacher)}
    dcfg = scfg.distill
    if checked.plan is not None:  # prune, and distill --amount: one pruning, the same machinery
        student = _pruned(teacher, checked.plan, checked.data, scfg.prune, dev, meta, log_metrics)
    elif checked.student is not None:
        from lifecycle.optimize.student import load_student

        student = load_student(checked.student).to(dev)
        meta["student"] = checked.student.resolved
    else:
        student = fresh_student(scfg.preset or "", checked.tokenizer, checked.data.block_size, seed=dcfg.seed).to(dev)
        meta["preset"] = scfg.preset
    if method == "distill":
        assert checked.init is not None
        meta.update({"teacher": parent_uri, "student_init": checked.init.text})
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


def _pruned(teacher: Any, p: PrunePlan, data: Any, pcfg: PruneConfig, dev: Any, meta: dict[str, Any],
            log_metrics: Callable[[Mapping[str, float], int], None] | None) -> Any:
    """``teacher`` pruned by plan ``p`` (importance measured on ``data``); what was done goes into ``meta``."""
    from lifecycle.optimize import importance
    from lifecycle.optimize.prune import block_params_of, prune_model

    batches = _calibration(data, pcfg, dev)
    layer_sc = importance.layer_scores(teacher, batches) if p.drop_layers else None
    neuron_sc = importance.neuron_scores(teacher, batches, pcfg.importance)
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
    return student


def _check_loads(folder: Path, params: int) -> None:
    """The written folder loads with plain ``from_pretrained`` to the same number of parameters."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    if count_params(reloaded) != params:
        raise RuntimeError(f"{folder}: config and weights disagree ({count_params(reloaded)} != {params} parameters)")
