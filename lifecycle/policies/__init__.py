"""Promotion and monitoring policies: schema, loading with line-numbered errors, pure gate checks.

A policy file (``registry_policies/*.yaml``) says, for each target (``staging``,
``production``), which gates a model version must pass and in which ``mode``
(``disabled | dry_run | enabled``). Nothing here talks to MLflow: the registry gathers the facts
(:class:`Candidate`) and :func:`check_gates` turns them into one :class:`GateResult` per gate.
"""

from lifecycle.policies.gates import Candidate, GateResult, blocking_failures, check_gates
from lifecycle.policies.loader import DEFAULT_POLICY, load_policy
from lifecycle.policies.schema import (
    KNOWN_EVAL_METRICS,
    TARGETS,
    Policy,
    TargetPolicy,
    is_known_metric,
    lower_is_better,
)

__all__ = [
    "Candidate", "GateResult", "blocking_failures", "check_gates", "DEFAULT_POLICY", "load_policy",
    "KNOWN_EVAL_METRICS", "TARGETS", "Policy", "TargetPolicy", "is_known_metric", "lower_is_better",
]
