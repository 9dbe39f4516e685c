"""Training to a wall-clock budget: duration parsing, the LR schedule and the step planner.

``lifecycle train --time-budget 10m`` does not know how many steps fit in ten minutes until it has
timed some. The :class:`BudgetPlanner` starts from one timed step (taken before the budget's clock
starts), re-estimates after every step from the measured step, evaluation and checkpoint times,
and sets the number of steps so that the whole loop (the last evaluation, checkpoint and writer
join included) ends at ``TARGET`` of the budget. The :class:`Schedule` reads that number, so the
learning rate reaches its floor on the last step that actually runs.

The planner is arithmetic over measured seconds; only :func:`probe_step` runs torch (imported there).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from lifecycle.errors import ConfigError

#: ``90s``, ``10m``, ``1h``, ``1.5h`` or plain seconds (``600``); nothing else.
_DURATION = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>[smh]?)")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
#: The longest budget taken (366 days): a longer one is a typo, and ``9...9h`` overflows to infinity.
MAX_BUDGET_S = 366 * 24 * 3600.0

#: Where the planner aims the end of the loop, as a fraction of the budget: the rest absorbs the
#: noise of step times on a shared machine (a 2-core box shared by other jobs varies by +-20 %).
TARGET = 0.97
#: Replan downwards when the predicted end passes this fraction, upwards when it falls below LOW.
HIGH, LOW = 0.99, 0.945
#: Never grow the plan once this fraction of it has run: late growth would bend a decay already under way.
GROW_UNTIL = 0.85


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``10m``, ``1h``, ``1.5h`` or plain seconds; anything else is refused.

    Strict on purpose (no spaces, no ``1h30m``, no exponent, only ASCII digits, nothing zero,
    negative or over :data:`MAX_BUDGET_S`): a budget that is misread trains for the wrong time
    without telling anyone.
    """
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"time_budget: {text!r} is not a duration; write it like 90s, 10m, 1h or plain seconds")
    seconds = float(match["num"]) * _UNIT_S[match["unit"]]
    if not seconds > 0:
        raise ConfigError(f"time_budget: {text!r} must be more than zero seconds")
    if seconds > MAX_BUDGET_S:  # also what float() makes infinite: a budget nobody means
        raise ConfigError(f"time_budget: {text!r} is more than a year; give at most {MAX_BUDGET_S / 3600:g}h")
    return seconds


@dataclass
class Schedule:
    """The LR factor per step: linear warmup, then cosine decay or warmup-stable-decay (WSD).

    An object rather than a closure so that ``LambdaLR.state_dict()`` saves its fields (the
    planned ``total`` included) in the checkpoint, and a resume continues the same schedule.
    ``total`` may change while training (the budget planner); the floor ``min_ratio`` is reached
    at ``total`` for cosine (the reference formula) and on the last step ``total - 1`` for a
    planned run (``end_on_last_step``), so the last update of a budgeted run uses the minimum LR.
    """

    kind: str = "cosine"
    warmup: int = 0
    total: int = 1
    min_ratio: float = 0.1
    decay_fraction: float = 0.2
    end_on_last_step: bool = False

    def __call__(self, step: int) -> float:
        """The factor of the peak LR at optimizer step ``step`` (0-based)."""
        last = self.total - 1 if self.end_on_last_step else self.total
        warmup = self.warmup
        if self.end_on_last_step:
            if step >= last:
                return self.min_ratio
            if self.total < 2 * warmup:  # a plan shorter than twice the warmup: warm up over a fifth of it
                warmup = max(1, self.total // 5)
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if self.kind == "wsd":
            decay_steps = max(1, round((last - warmup) * self.decay_fraction))
            start = last - decay_steps
            if step < start:
                return 1.0
            progress = min(1.0, (step - start) / decay_steps)
            return 1.0 - (1.0 - self.min_ratio) * progress  # linear to the floor (the WSD papers' choice)
        span = max(1, last - warmup)
        progress = min(1.0, max(0.0, step - warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _count(start: int, end: int, every: int) -> int:
    """Multiples of ``every`` in (start, end]."""
    return end // every - start // every


@dataclass
class BudgetPlanner:
    """Sets the number of steps so that the loop ends within ``budget_s`` seconds.

    Costs are in seconds: one optimizer step, one evaluation, one checkpoint save as seen by the
    loop, and the final join of the checkpoint writer. Unmeasured costs start from estimates the
    loop gives (an evaluation from the step time and the validation size) and are replaced by
    measurements as soon as there are some.
    """

    budget_s: float
    eval_every: int
    checkpoint_every: int
    max_steps: int | None = None
    step_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    final_write_s: float = 0.0
    _steps_seen: int = 0
    _evals_seen: int = 0
    _saves_seen: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)

    # -- measurements ----------------------------------------------------------------------------

    def observe_step(self, seconds: float) -> None:
        """One optimizer step took ``seconds`` (evaluation and checkpoint excluded)."""
        self._steps_seen += 1
        if self._steps_seen > 1:
            # One step stalled by another process must not triple the estimate at once.
            seconds = min(seconds, 4.0 * self.step_s)
        # A plain mean for the first steps, then an EMA that follows a machine whose load changes.
        alpha = max(1.0 / self._steps_seen, 0.05)
        self.step_s += alpha * (seconds - self.step_s)

    def observe_eval(self, seconds: float) -> None:
        """One evaluation took ``seconds``."""
        self._evals_seen += 1
        self.eval_s = seconds if self._evals_seen == 1 else max(seconds, 0.5 * (self.eval_s + seconds))

    def observe_checkpoint(self, seconds: float) -> None:
        """One checkpoint save held the loop ``seconds``."""
        self._saves_seen += 1
        self.checkpoint_s = seconds if self._saves_seen == 1 else 0.5 * (self.checkpoint_s + seconds)

    # -- planning --------------------------------------------------------------------------------

    def predicted_end(self, step: int, elapsed: float, total: int) -> float:
        """Seconds since the start at which a run planned to ``total`` steps would end, from ``step``."""
        left = max(0, total - step)
        evals = _count(step, total, self.eval_every) + (0 if total % self.eval_every == 0 else 1)
        saves = _count(step, total, self.checkpoint_every) + (0 if total % self.checkpoint_every == 0 else 1)
        if left == 0:
            evals = saves = 0
        return (elapsed + left * self.step_s + evals * self.eval_s + saves * self.checkpoint_s
                + self.final_write_s)

    def affordable(self, step: int, elapsed: float) -> int:
        """The largest total step count whose predicted end is within ``TARGET`` of the budget (>= step)."""
        target = TARGET * self.budget_s
        lo, hi = step, step + 1
        while self.predicted_end(step, elapsed, hi) <= target and hi < 10**9:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # the predicted end grows with the total: bisect
            mid = (lo + hi) // 2
            if self.predicted_end(step, elapsed, mid) <= target:
                lo = mid
            else:
                hi = mid
        if self.max_steps is not None:
            lo = min(lo, self.max_steps)
        return lo

    def replan(self, step: int, elapsed: float, total: int) -> int:
        """The total to train to from ``step``: unchanged while the predicted end is in [LOW, HIGH] of the budget."""
        end = self.predicted_end(step, elapsed, total)
        new = total
        if end > HIGH * self.budget_s:
            new = max(step, self.affordable(step, elapsed))
        elif end < LOW * self.budget_s and step < GROW_UNTIL * total:
            new = max(total, self.affordable(step, elapsed))
            if new < total * 1.02 + 1:
                new = total  # not worth bending the schedule for

        if self.max_steps is not None:
            new = min(new, self.max_steps)
        if new != total:
            self.history.append((step, new))
        return new

    def first_plan(self) -> int:
        """The total before any step ran (from the timed step taken before the clock started)."""
        total = self.affordable(0, 0.0)
        self.history.append((0, total))
        return total

    def summary(self) -> dict[str, Any]:
        """The planner's figures for params/metrics."""
        return {"step_s": self.step_s, "eval_s": self.eval_s, "checkpoint_s": self.checkpoint_s,
                "replans": max(0, len(self.history) - 1)}


def start_planner(cfg: Any, model: Any, data: Any, device: Any,
                  probe: tuple[float, float] | None = None) -> BudgetPlanner:
    """The planner of a run with ``time_budget``, its costs seeded from :func:`probe_step` (run here when not given).

    Under torchrun rank 0 probes and every rank gets its figures, so every rank starts from the same plan.
    """
    planner = BudgetPlanner(parse_duration(cfg.time_budget), cfg.eval_every, cfg.checkpoint_every,
                            max_steps=cfg.max_steps)
    step_s, eval_s = probe if probe is not None else probe_step(cfg, model, data, device)
    planner.observe_step(step_s * 1.1)  # 1.1: the optimizer step, not timed by the probe
    planner.eval_s = eval_s
    # A save writes the weights, two Adam moments and the best weights: four copies of the trained parameters.
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) * 4
    planner.checkpoint_s = planner.final_write_s = 0.05 + n_bytes / 200e6
    return planner


def too_small(planner: BudgetPlanner, text: str, step: int = 0, used_s: float = 0.0) -> ConfigError | None:
    """The error for a budget whose plan from ``step`` holds no step at all, else None.

    Judged by the planner's own arithmetic (a step, the final evaluation, checkpoint and write),
    so a budget that passes here always plans at least one step. ``used_s``: what a resumed run
    already spent of the budget (one budget for the whole run).
    """
    if planner.affordable(step, used_s) > step:
        return None
    need = planner.predicted_end(step, used_s, step + 1) - used_s
    at_least = f"give at least {math.ceil((used_s + need) / TARGET + 0.5)}s"
    if step > 0 or used_s > 0:
        return ConfigError(f"time_budget {text} is used up: the run spent {used_s:.1f} s of it by step {step}, "
                           f"and one more step with the final evaluation and checkpoint takes about {need:.2f} s "
                           f"here; {at_least} to continue it")
    return ConfigError(f"time_budget {text} is too small: one step with the final evaluation and checkpoint takes "
                       f"about {need:.2f} s here; {at_least} or a smaller model")


def autocast_dtype(cfg: Any, device: Any) -> Any:
    """bf16 where asked (CUDA, or a CPU with bf16 instructions), by default on CUDA only; else None (fp32)."""
    import torch

    cuda = device.type == "cuda"
    return torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and cuda) else None


def probe_step(cfg: Any, model: Any, data: Any, device: Any) -> tuple[float, float]:
    """Seconds of one forward/backward step and of one full evaluation, timed before training starts.

    Run twice and timed the second time (the first pays one-time allocations). Random states are
    restored and gradients dropped, so the run's numbers do not change. This is what lets the
    budget planner size the schedule before step 1, and refuse a budget too small for one step.
    """
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model.to(device).train()
    dtype = autocast_dtype(cfg, device)
    amp = torch.autocast(device_type=device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    rows = torch.arange(min(cfg.batch_size, len(data.train)))
    batch = {k: v.to(device) for k, v in data.batch("train", rows).items()}
    val = data.validation[: cfg.batch_size].to(device)
    step_s = fwd_s = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(2):
            t0 = time.perf_counter()
            for _ in range(cfg.grad_accum):
                with amp:
                    loss = model(**batch).loss
                loss.backward()
            float(loss.detach())
            step_s = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with torch.no_grad(), amp:
                float(model(input_ids=val, labels=val).loss)
            fwd_s = time.perf_counter() - t0
    n_val = len(data.validation)
    if cfg.eval_batches:
        n_val = min(n_val, cfg.eval_batches * cfg.batch_size)
    return step_s, fwd_s * math.ceil(n_val / max(1, len(val)))
