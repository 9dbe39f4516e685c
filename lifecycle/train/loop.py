"""The training loop: AdamW, warmup + cosine, accumulation, clipping, validation, checkpoints.

The loop knows nothing about MLflow: it reports metrics through a ``log`` callable (the run
orchestration hands it an asynchronous MLflow logger) so it never waits on a tracking server and
can be tested on its own. Everything that decides the numbers (weights, optimizer, schedule, RNG,
data position) is in the checkpoint, so a resumed run continues bit-for-bit on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lifecycle.errors import AcceleratorOutOfMemoryError, ConfigError, TrainingDivergedError
from lifecycle.precision import tf32
from lifecycle.train.budget import BudgetPlanner, Schedule, autocast_dtype, start_planner
from lifecycle.train.checkpoint import CheckpointManager, set_rng_state
from lifecycle.train.config import TrainConfig
from lifecycle.train.data import PreparedData, SampleOrder
from lifecycle.train.distributed import DistContext

log = logging.getLogger(__name__)

LogFn = Callable[[Mapping[str, float], int], None]
#: A training objective other than the model's own LM loss: ``(model, batch) -> scalar loss``.
#: Distillation uses it to add a teacher term (lifecycle.optimize.distill); validation stays the LM loss.
LossFn = Callable[[Any, Mapping[str, Any]], Any]


class TrainingInterrupted(Exception):
    """SIGTERM (or SIGINT) arrived: a checkpoint was written and the loop stopped cleanly."""

    def __init__(self, step: int, checkpoint: Path | None, signame: str):
        self.step = step
        self.checkpoint = checkpoint
        self.signame = signame
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {checkpoint}")


@dataclass
class TrainResult:
    """What a finished loop hands back to the orchestration."""

    model: Any
    steps: int
    final_train_loss: float
    best_val_loss: float
    best_step: int
    last_val_loss: float
    stopped_early: bool
    tokens_per_s: float
    checkpoint: Path | None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    #: Seconds the loop took (evaluations and checkpoints included), and the budget it had (None: none).
    time_used_s: float = 0.0
    time_budget_s: float | None = None


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases and norm weights (1-D) are not regularised (GPT-2 practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def oom_error(exc: BaseException, cfg: TrainConfig) -> AcceleratorOutOfMemoryError:
    """The one-line OOM message, suggesting a smaller micro-batch with more accumulation."""
    smaller = max(1, cfg.batch_size // 2)
    accum = cfg.grad_accum * max(1, cfg.batch_size // smaller)
    first = str(exc).splitlines()[0] if str(exc) else "out of memory"
    return AcceleratorOutOfMemoryError(
        f"accelerator out of memory at micro-batch {cfg.batch_size} ({first[:160]}); keep the same "
        f"global batch with a smaller micro-batch and more accumulation: --batch-size {smaller} "
        f"--set grad_accum={accum}" + ("" if cfg.batch_size > 1 else ", or a smaller --preset")
    )


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between optimizer steps."""

    def __init__(self) -> None:
        self.signame: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        # Signal handlers can only be installed from the main thread (tests may run elsewhere).
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signame = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """One training run of ``model`` on prepared ``data`` under ``cfg``."""

    def __init__(self, cfg: TrainConfig, model: Any, data: PreparedData, *, ctx: DistContext,
                 log: LogFn | None = None, checkpoints: CheckpointManager | None = None,
                 resume_from: Path | Mapping[str, Any] | None = None, extra_state: Mapping[str, Any] | None = None,
                 loss_fn: LossFn | None = None, probe: tuple[float, float] | None = None):
        """``resume_from``: a checkpoint folder, or what :meth:`CheckpointManager.load` read from one.

        ``loss_fn``: the training objective of a micro-batch (default: the model's LM loss).
        ``probe``: :func:`probe_step`'s timings, for a run with ``time_budget`` (timed here when not given).
        """
        import torch

        self.cfg = cfg
        self.ctx = ctx
        self.data = data
        self.log = log or (lambda metrics, step: None)
        self.checkpoints = checkpoints
        self.extra_state = dict(extra_state or {})
        self.loss_fn = loss_fn
        self.device = ctx.device if ctx.device is not None else torch.device("cpu")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cuda = self.device.type == "cuda"
        # TF32 for the fp32 matmuls that remain outside autocast (Ampere and newer), only while
        # training runs (see fit): evaluation in the same process must stay fp32.
        self.use_tf32 = cuda
        self.autocast_dtype = autocast_dtype(cfg, self.device)
        self.model = model.to(self.device)
        self.module = self.model  # the unwrapped model: saved, evaluated and returned
        self.order = SampleOrder(len(data.train), seed=cfg.seed, micro_batch=cfg.batch_size,
                                 grad_accum=cfg.grad_accum, world_size=ctx.world_size, rank=ctx.rank)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Fused AdamW is one kernel per step (CUDA, and CPU since torch 2.4); measured in bench_train.py.
        fused = cfg.fused_adamw if cfg.fused_adamw is not None else True
        if cfg.learning_rate is None:
            raise ConfigError("learning_rate is unset: --preset auto resolves it in load_starting_point")
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.learning_rate,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused or None)
        self.budget: BudgetPlanner | None = None
        self.time_used_before = 0.0
        if cfg.time_budget is not None:
            self.budget = start_planner(cfg, self.model, data, self.device, probe)
        self.schedule = Schedule(cfg.schedule, cfg.warmup_steps, cfg.max_steps or 1, cfg.min_lr_ratio,
                                 cfg.decay_fraction, end_on_last_step=self.budget is not None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.step = 0
        self.best_val = math.inf
        self.best_step = -1
        self.bad_evals = 0
        self.last_val = math.nan
        self.best_state: dict[str, Any] | None = None
        self.history: dict[str, list[tuple[int, float]]] = {}
        if resume_from is not None:
            self._restore(resume_from)
        if self.budget is not None:
            # Planned before step 1 (or again on resume, with the time already used): the schedule
            # decays over the steps that fit, not over a guess.
            planned = (self.budget.affordable(self.step, self.time_used_before) if self.step
                       else self.budget.first_plan())
            # Every rank plans from the same probe and checkpoint; rank 0's plan is taken all the
            # same, so that no float difference can make two ranks stop at different steps.
            self.schedule.total = self.proposed = max(ctx.broadcast_object(planned), self.step)
            self._refit_lr()
        else:
            self.schedule.total = cfg.max_steps  # max_steps may grow on resume
        self.forward_model = self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward_model = DDP(self.model, device_ids=[self.device.index] if cuda else None)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)

    # -- state -------------------------------------------------------------------------------

    def _restore(self, source: Path | Mapping[str, Any]) -> None:
        # Loaded on the CPU: load_state_dict moves weights and optimizer state to the parameters'
        # device, and the RNG states must stay CPU tensors for torch.set_rng_state.
        ck = CheckpointManager.load(Path(source)) if isinstance(source, (str, Path)) else source
        self.module.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"], self.device)
        st = ck["state"]
        self.step = int(st["step"])
        self.best_val = float(st["best_val_loss"]) if st.get("best_val_loss") is not None else math.inf
        self.best_step = int(st.get("best_step", -1))
        self.bad_evals = int(st.get("bad_evals", 0))
        self.last_val = float(st["last_val_loss"]) if st.get("last_val_loss") is not None else math.nan
        self.best_state = ck["best"]
        self.history = {k: [tuple(x) for x in v] for k, v in st.get("history", self.history).items()}
        self.time_used_before = float(st.get("time_used_s", 0.0))

    def trainer_state(self) -> dict[str, Any]:
        """The JSON part of a checkpoint: position, early-stopping state and lineage."""
        from lifecycle.config import to_dict

        return {
            "step": self.step,
            "samples_consumed": self.order.samples_consumed(self.step),
            "epoch": self.order.epoch_at(self.step),
            "world_size": self.ctx.world_size,
            "global_batch": self.order.global_batch,
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "last_val_loss": None if math.isnan(self.last_val) else self.last_val,
            "config": to_dict(self.cfg),
            "history": self.history,
            "time_used_s": self.time_used(),
            **self.extra_state,
        }

    def save_checkpoint(self, *, background: bool | None = None) -> Path | None:
        """Rank 0 saves the checkpoint of the current step; every rank waits until its state is taken.

        In the background (``checkpoint_background``) the write finishes later, on the writer
        thread: :meth:`finished_checkpoint` joins it.
        """
        path = None
        if self.ctx.is_main and self.checkpoints is not None:
            path = self.checkpoints.save(
                self.step, model_state=self.module.state_dict(), optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(), trainer_state=self.trainer_state(),
                best_state=self.best_state, device=self.device,
                background=self.cfg.checkpoint_background if background is None else background)
        self.ctx.barrier()
        return path

    def finished_checkpoint(self) -> Path | None:
        """Join the save in flight (raising its error) and return the newest checkpoint on disk."""
        if self.checkpoints is None:
            return None
        self.checkpoints.wait()
        return self.checkpoints.last_saved or self.checkpoints.latest()

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self) -> float:
        """Mean token loss on the validation split (sharded over ranks, summed back exactly)."""
        import torch

        rows = self.data.validation
        if self.cfg.eval_batches:
            rows = rows[: self.cfg.eval_batches * self.cfg.batch_size * self.ctx.world_size]
        shard = rows[self.ctx.rank:: self.ctx.world_size]
        was_training = self.module.training
        self.module.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for i in range(0, len(shard), self.cfg.batch_size):
                if self.data.sft:
                    # Mean over response tokens, weighted by their count: batches differ in how many.
                    idx = torch.arange(self.ctx.rank, len(rows), self.ctx.world_size)[i: i + self.cfg.batch_size]
                    batch = self._to_device(self.data.batch("validation", idx))
                    n = (batch["labels"][:, 1:] != -100).sum()
                    if int(n) == 0:
                        continue  # nothing to score (the mean over zero tokens is NaN)
                    with self._autocast():
                        loss = self.module(**batch).loss
                    total[0] += loss.double() * n
                    total[1] += n
                    continue
                x = shard[i: i + self.cfg.batch_size].to(self.device, non_blocking=True)
                with self._autocast():
                    loss = self.module(input_ids=x, labels=x).loss
                total[0] += loss.double() * len(x)
                total[1] += len(x)
        self.ctx.all_reduce_sum(total)
        self.module.train(was_training)
        return float(total[0] / total[1])

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a batch to the device; raw-text blocks are their own labels, so that tensor moves once."""
        moved: dict[int, Any] = {}
        out = {}
        for key, value in batch.items():
            if id(value) not in moved:
                moved[id(value)] = value.to(self.device, non_blocking=True)
            out[key] = moved[id(value)]
        return out

    def _autocast(self) -> Any:
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- the loop ----------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The step the run ends at: ``max_steps``, or what the budget planner set."""
        return self.schedule.total

    def time_used(self) -> float:
        """Seconds of training so far (before a resume included)."""
        start = getattr(self, "_t_start", None)
        return self.time_used_before + (time.perf_counter() - start if start is not None else 0.0)

    def _replan(self, bar: Any) -> None:
        """After each step of a budgeted run: move the planned end so that the loop ends in time.

        Only rank 0's planner decides. In one process its plan applies at once; under torchrun it is
        proposed, and every rank applies it together at the next step's all-reduce (see ``_fit``).
        """
        if self.ctx.is_main:
            self.proposed = self.budget.replan(self.step, self.time_used(), self.proposed)
            if not self.ctx.distributed:
                self._apply_plan(self.proposed, bar)

    def _apply_plan(self, total: int, bar: Any) -> None:
        """Train to ``total`` steps: the schedule decays over them, from this step's LR on."""
        if total != self.limit:
            self.schedule.total = total
            self._refit_lr()
            bar.total = total
            bar.refresh()

    def _refit_lr(self) -> None:
        """Set the next step's LR from the (re-)fitted schedule now, not one scheduler step later."""
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.schedule(self.scheduler.last_epoch)

    def _progress(self) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=self.limit, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not (self.cfg.progress and self.ctx.is_main), mininterval=0.5)

    def fit(self) -> TrainResult:
        """Train until ``max_steps`` or early stopping; restore the best weights at the end.

        Returns (or raises) only after the last checkpoint write has finished.
        """
        self._t_start = time.perf_counter()
        try:
            with tf32(self.use_tf32):
                result = self._fit()
        except BaseException as exc:
            self._close_checkpoints(failing=True)
            import torch

            if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower() and "CUDA" in str(exc):
                raise oom_error(exc, self.cfg) from None
            raise
        self._close_checkpoints(failing=False)
        if self.checkpoints is not None and self.checkpoints.last_saved is not None:
            result.checkpoint = self.checkpoints.last_saved
        result.time_used_s = self.time_used()
        if self.budget is not None:
            result.time_budget_s = self.budget.budget_s
            self._emit({"train/time_used_s": result.time_used_s, "train/time_budget_s": self.budget.budget_s,
                        "train/planned_steps": float(self.limit), "train/step_s": self.budget.step_s,
                        "train/eval_s": self.budget.eval_s})
        return result

    def _close_checkpoints(self, *, failing: bool) -> None:
        """Join the writer before the loop hands back; a write error is raised unless another error is."""
        if self.checkpoints is None:
            return
        try:
            self.checkpoints.close()
        except Exception as exc:  # noqa: BLE001 - the error that stopped the loop matters more
            if not failing:
                raise
            log.error("the last checkpoint write failed too: %s", exc)

    def _fit(self) -> TrainResult:
        import torch

        cfg = self.cfg
        self.model.train()
        tokens_per_step = self.order.global_batch * self.data.block_size
        last_ckpt: Path | None = self.checkpoints.latest() if self.checkpoints is not None else None
        stopped_early = False
        tps = 0.0
        loss_value = math.nan
        every_s = cfg.checkpoint_every_s
        last_save_t = time.monotonic()
        with _StopSignal() as stop, self._progress() as bar:
            while self.step < self.limit:
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=self.device)
                step_tokens = 0
                for a in range(cfg.grad_accum):
                    rows = self.order.micro_batch_rows(self.step, a)
                    batch = self._to_device(self.data.batch("train", rows))
                    if self.data.sft:
                        step_tokens += self.data.real_tokens("train", rows) * self.ctx.world_size
                    sync = a == cfg.grad_accum - 1 or not self.ctx.distributed
                    ctx = contextlib.nullcontext() if sync else self.forward_model.no_sync()
                    with ctx:
                        with self._autocast():
                            loss = (self.loss_fn(self.forward_model, batch) if self.loss_fn is not None
                                    else self.forward_model(**batch).loss) / cfg.grad_accum
                        loss.backward()
                    loss_sum += loss.detach()
                if cfg.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
                # Every rank acts on the same loss, stop flag, timed save and plan (one all-reduce).
                due = bool(every_s) and time.monotonic() - last_save_t >= every_s
                loss_value, stop_now, time_due, planned = self.ctx.agree_step(
                    loss_sum, stop.signame is not None, due, self.proposed if self.budget is not None else 0)
                if self.budget is not None and self.ctx.distributed:
                    # Rank 0's latest plan, applied before the optimizer step (this step's LR follows
                    # it) and never below this step, which is under way on every rank.
                    self._apply_plan(max(planned, self.step + 1), bar)
                gn = float(grad_norm)
                if not (math.isfinite(loss_value) and math.isfinite(gn)):
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    raise TrainingDivergedError(
                        f"training diverged at step {self.step + 1}: {what} is {loss_value if what == 'loss' else gn}; "
                        f"last good checkpoint: {self.finished_checkpoint() or last_ckpt or 'none'}; "
                        f"lower --learning-rate "
                        f"(now {cfg.learning_rate:g}) or raise warmup_steps")
                lr = self.optimizer.param_groups[0]["lr"]  # this step's (a re-plan may have refitted it)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                dt = time.perf_counter() - t0
                if self.budget is not None:
                    self.budget.observe_step(dt)
                    self._replan(bar)
                # sft rows differ in length: count the step's real tokens (this rank's, times ranks).
                tps = (step_tokens if self.data.sft else tokens_per_step) / dt if dt > 0 else 0.0
                if self.step % cfg.log_every == 0 or self.step == self.limit:
                    self._emit({"train/loss": loss_value, "train/lr": lr, "train/grad_norm": gn,
                                "train/tokens_per_s": tps})
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                if self.step % cfg.eval_every == 0 or self.step == self.limit:
                    t_eval = time.perf_counter()
                    stopped_early = self._after_eval(self.evaluate())
                    if self.budget is not None:
                        self.budget.observe_eval(time.perf_counter() - t_eval)
                        self._replan(bar)
                    bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{self.last_val:.4f}", refresh=False)
                if (self.step % cfg.checkpoint_every == 0 or time_due or self.step == self.limit or stopped_early
                        or stop_now):
                    # The signal's checkpoint is written before the process exits: no background.
                    t_save = time.perf_counter()
                    last_ckpt = self.save_checkpoint(background=False if stop_now else None) or last_ckpt
                    last_save_t = time.monotonic()
                    if self.budget is not None and self.step != self.limit:
                        self.budget.observe_checkpoint(time.perf_counter() - t_save)
                if stop_now:
                    raise TrainingInterrupted(self.step, last_ckpt, stop.signame or "SIGTERM")
                if stopped_early:
                    break
        if self.ctx.distributed:  # what each rank did, in its own log: they must agree
            log.info("rank %d of %d: %d steps (planned %d), last lr %s, evaluated at steps %s", self.ctx.rank,
                     self.ctx.world_size, self.step, self.limit, self.history.get("train/lr", [(0, None)])[-1][1],
                     [s for s, _ in self.history.get("val/loss", [])])
        if self.best_state is not None and self.best_step != self.step:
            self.module.load_state_dict({k: v.to(self.device) for k, v in self.best_state.items()})
        return TrainResult(model=self.module, steps=self.step, final_train_loss=loss_value,
                           best_val_loss=self.best_val, best_step=self.best_step, last_val_loss=self.last_val,
                           stopped_early=stopped_early, tokens_per_s=tps, checkpoint=last_ckpt,
                           history=self.history)

    def _emit(self, metrics: Mapping[str, float]) -> None:
        """Report metrics and keep them in the checkpointed history.

        The history lets a resume re-send what a killed process had queued but not delivered
        before its last checkpoint, so a SIGKILL never loses logged steps.
        """
        self.log(metrics, self.step)
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((self.step, value))

    def _after_eval(self, val: float) -> bool:
        """Log validation, keep the best weights; True when early stopping says stop."""
        if not math.isfinite(val):
            raise TrainingDivergedError(f"validation loss is {val} at step {self.step}; lower --learning-rate")
        self.last_val = val
        self._emit({"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))})
        if val < self.best_val - self.cfg.early_stopping_min_delta:
            self.best_val, self.best_step, self.bad_evals = val, self.step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        else:
            self.bad_evals += 1
        patience = self.cfg.early_stopping_patience
        return bool(patience and self.bad_evals >= patience)
