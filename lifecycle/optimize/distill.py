"""Knowledge distillation: train a student against a teacher's logits with the project's training loop.

Used twice: the recovery fine-tune after pruning (the student is the pruned model, the teacher
its parent) and ``--method distill`` (the student is a fresh preset). Both run
:class:`lifecycle.train.loop.Trainer` unchanged, with :class:`DistillLoss` as its ``loss_fn``:

    loss = kd_weight * T^2 * KL(teacher_T || student_T) + (1 - kd_weight) * LM loss

where ``_T`` are the softmaxes at temperature ``T`` over the next-token logits (Hinton et al.;
``T^2`` keeps the gradient scale independent of ``T``). Validation, early stopping and the best
weights are the loop's own, on the plain LM loss of the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lifecycle.errors import ConfigError


@dataclass
class DistillConfig:
    """``--set distill.<key>=...``: the student's training (recovery after pruning, or a distilled student)."""

    #: Optimizer steps (0 skips the recovery fine-tune of a pruned model; a student needs steps).
    steps: int = 100
    #: Weight of the KL term; the LM loss gets ``1 - kd_weight``.
    kd_weight: float = 0.5
    temperature: float = 2.0
    learning_rate: float = 1e-3
    batch_size: int = 8
    warmup_steps: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"distill.{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("steps", "warmup_steps", "eval_batches"):
            if getattr(self, key) < 0:
                raise ConfigError(f"distill.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ConfigError(f"distill.kd_weight must be in [0, 1] (0: LM loss only), got {self.kd_weight}")
        if not (self.temperature > 0 and self.temperature != float("inf")):
            raise ConfigError(f"distill.temperature must be a positive number, got {self.temperature}")
        if not (self.learning_rate > 0 and self.learning_rate != float("inf")):
            raise ConfigError(f"distill.learning_rate must be positive, got {self.learning_rate}")


class DistillLoss:
    """``loss_fn`` for the training loop: KL to the teacher's softened logits plus the LM loss."""

    def __init__(self, teacher: Any, *, kd_weight: float, temperature: float):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.last: dict[str, float] = {}

    def __call__(self, model: Any, batch: Mapping[str, Any]) -> Any:
        """The weighted loss of one micro-batch (``batch`` as the loop builds it: ids, labels, masks)."""
        import torch
        import torch.nn.functional as F

        out = model(**batch)
        if self.kd_weight == 0.0:
            return out.loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        t = self.temperature
        # Next-token positions that the LM loss scores (labels shifted; -100 = not scored).
        scored = batch["labels"][:, 1:] != -100
        s_log = F.log_softmax(out.logits[:, :-1].float() / t, dim=-1)[scored]
        t_log = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)[scored]
        kl = (t_log.exp() * (t_log - s_log)).sum(-1).mean() * t * t
        self.last = {"kd": float(kl.detach()), "lm": float(out.loss.detach())}
        return self.kd_weight * kl + (1.0 - self.kd_weight) * out.loss


def train_student(student: Any, teacher: Any, data: Any, cfg: DistillConfig, *, device: str,
                  log: Callable[[Mapping[str, float], int], None] | None = None, progress: bool = False) -> Any:
    """Train ``student`` on prepared ``data`` against ``teacher`` for ``cfg.steps`` with the project's loop.

    Returns the loop's :class:`~lifecycle.train.loop.TrainResult` (its ``model`` holds the best
    validation weights). Metrics go to ``log`` under ``distill/`` (``distill/train/loss`` ...).
    """
    import torch

    from lifecycle.train.config import TrainConfig
    from lifecycle.train.distributed import DistContext
    from lifecycle.train.loop import Trainer

    tcfg = TrainConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                       warmup_steps=min(cfg.warmup_steps, cfg.steps), eval_every=min(cfg.eval_every, cfg.steps),
                       eval_batches=cfg.eval_batches, seed=cfg.seed, checkpoint_every=cfg.steps,
                       device=device, precision="fp32", progress=progress, log_model=False, system_metrics=False)
    dev = torch.device(device)
    loss = DistillLoss(teacher.to(dev), kd_weight=cfg.kd_weight, temperature=cfg.temperature)
    sink = log or (lambda metrics, step: None)

    def prefixed(metrics: Mapping[str, float], step: int) -> None:
        sink({f"distill/{k}": v for k, v in {**metrics, **{f"train/{k}": v for k, v in loss.last.items()}}.items()},
             step)

    # No checkpoints: a recovery of a few hundred steps is redone rather than resumed.
    trainer = Trainer(tcfg, student, data, ctx=DistContext(device=dev), log=prefixed, loss_fn=loss)
    return trainer.fit()
