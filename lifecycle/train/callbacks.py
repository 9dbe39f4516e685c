"""The loop's metric sink for MLflow: asynchronous, and exactly-once across a resume.

A run killed after step k but resumed from a checkpoint at step c < k replays steps c+1..k. Those
steps may already be in MLflow (the asynchronous logger delivers in order, so what reached the
server is a prefix of each metric's steps). The sink asks MLflow for the last step of each metric
once, at resume, and drops replayed points up to it: no step is duplicated and none is missing.
On CPU the replayed values are bit-identical, so nothing is lost by dropping them.

The opposite gap: a SIGKILL can also destroy metrics that were queued but not yet delivered when
the last checkpoint was written. The checkpoint keeps the loop's metric history, and
:func:`replay` re-sends the part MLflow does not hold, up to the checkpoint's step.
"""

from __future__ import annotations

from typing import Any, Mapping


def last_logged_steps(client: Any, run_id: str) -> dict[str, int]:
    """The largest step MLflow holds for each metric of ``run_id``."""
    run = client.get_run(run_id)
    # run.data carries, per key, the value at the largest step (MLflow's own system-metrics
    # resume reads it the same way): one call instead of a full history per key.
    objs = getattr(run.data, "_metric_objs", None)
    if objs is not None:
        return {m.key: int(m.step) for m in objs}
    return {key: max(int(m.step) for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}


class MetricSink:
    """Forward metrics to an :class:`~lifecycle.tracking.AsyncMetricLogger`, skipping replays."""

    def __init__(self, logger: Any, already_logged: Mapping[str, int] | None = None):
        self._logger = logger
        self._skip = dict(already_logged or {})
        self.skipped = 0

    def __call__(self, metrics: Mapping[str, float], step: int, model_id: str | None = None) -> None:
        """Queue ``metrics`` at ``step`` (linked to logged model ``model_id``) unless MLflow holds that step."""
        if self._skip:
            fresh = {k: v for k, v in metrics.items() if step > self._skip.get(k, -1)}
            self.skipped += len(metrics) - len(fresh)
            metrics = fresh
        if metrics:
            self._logger.log(metrics, step, model_id=model_id)


def replay(logger: Any, history: Mapping[str, Any], already_logged: Mapping[str, int]) -> int:
    """Re-send checkpointed metrics that MLflow lacks; returns how many points were sent."""
    sent = 0
    for key, points in history.items():
        for step, value in points:
            if int(step) > already_logged.get(key, -1):
                logger.log({key: float(value)}, int(step))
                sent += 1
    return sent
