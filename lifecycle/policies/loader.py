"""Load a policy file and validate it, naming the file, line and field of every mistake.

PyYAML's ``compose`` keeps each node's ``start_mark``; we validate the node tree directly so an
error reads ``strict.yaml:14: production.thresholds[0].op: '=<' is not one of <, <=, ...``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from pathlib import Path
from typing import Any

import yaml

from lifecycle.errors import ConfigError
from lifecycle.policies import schema as s

#: The policy used when none is named: ``registry_policies/default.yaml`` of the project, else
#: the copy shipped inside the package (``lifecycle/policies/default.yaml``, the same file).
DEFAULT_POLICY = "registry_policies/default.yaml"

_GATE_CLASSES: dict[str, type] = {
    "baseline": s.BaselineGate,
    "latency": s.LatencyGate,
    "model_size": s.ModelSizeGate,
    "signature": s.SignatureGate,
    "required_tags": s.RequiredTagsGate,
    "checks": s.ChecksGate,
    "cooldown": s.CooldownGate,
    "compression": s.CompressionGate,
}
_TOP_KEYS = ("description", "staging", "production", "monitoring", "canary")


class _Ctx:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, node: yaml.Node | None, field: str, message: str) -> ConfigError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        where = f" {field}:" if field else ""
        return ConfigError(f"{self.path}{line}:{where} {message}")


def _scalar(ctx: _Ctx, node: yaml.Node, field: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        got = "list" if isinstance(node, yaml.SequenceNode) else "mapping"
        raise ctx.fail(node, field, "expected a single value, got a " + got)
    return yaml.safe_load(yaml.serialize(node))


def _mapping(ctx: _Ctx, node: yaml.Node, field: str,
             allowed: typing.Iterable[str] | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise ctx.fail(node, field, "expected a mapping")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    allowed = tuple(allowed) if allowed is not None else None
    for key_node, value_node in node.value:
        key = str(_scalar(ctx, key_node, field))
        name = f"{field}.{key}" if field else key
        if allowed is not None and key not in allowed:
            raise ctx.fail(key_node, name, f"unknown key {key!r}; valid keys: {', '.join(allowed)}")
        if key in out:
            raise ctx.fail(key_node, name, "duplicate key")
        out[key] = (key_node, value_node)
    return out


def _number(ctx: _Ctx, node: yaml.Node, field: str, integer: bool = False) -> float | int:
    value = _scalar(ctx, node, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.fail(node, field, f"expected a number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise ctx.fail(node, field, f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _metric(ctx: _Ctx, node: yaml.Node, field: str) -> str:
    value = _scalar(ctx, node, field)
    if not isinstance(value, str) or not s.is_known_metric(value):
        raise ctx.fail(node, field, f"no such metric {value!r}; known: "
                       + ", ".join(f"eval/{m}" for m in s.KNOWN_EVAL_METRICS)
                       + ", eval/check_<name>, compare/<eval metric>_delta, compare/loss_delta_ci_low, "
                         "compare/loss_delta_ci_high, compare/win_rate")
    return value


def _gate(ctx: _Ctx, cls: type, node: yaml.Node, field: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    items = _mapping(ctx, node, field, names)
    kwargs: dict[str, Any] = {}
    for key, (key_node, value_node) in items.items():
        name = f"{field}.{key}"
        tp = hints[key]
        if key == "mode":
            value = _scalar(ctx, value_node, name)
            if value not in s.MODES:
                raise ctx.fail(value_node, name, f"{value!r} is not one of {', '.join(s.MODES)}")
            kwargs[key] = value
        elif key == "metric":
            kwargs[key] = _metric(ctx, value_node, name)
        elif key == "op":
            value = _scalar(ctx, value_node, name)
            if value not in s.COMPARATORS:
                raise ctx.fail(value_node, name, f"bad comparator {value!r}; use one of {' '.join(s.COMPARATORS)}")
            kwargs[key] = value
        elif key == "share_steps":
            if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                raise ctx.fail(value_node, name, "expected a list of shares, e.g. [0.1, 0.5, 1.0]")
            kwargs[key] = tuple(_number(ctx, n, f"{name}[{i}]") for i, n in enumerate(value_node.value))
        elif key == "tags":
            if not isinstance(value_node, yaml.SequenceNode):
                raise ctx.fail(value_node, name, "expected a list of tag names")
            tags = tuple(str(_scalar(ctx, n, f"{name}[{i}]")) for i, n in enumerate(value_node.value))
            kwargs[key] = tags
        elif tp is bool:
            value = _scalar(ctx, value_node, name)
            if not isinstance(value, bool):
                raise ctx.fail(value_node, name, f"expected true/false, got {value!r}")
            kwargs[key] = value
        elif tp is int:
            kwargs[key] = _number(ctx, value_node, name, integer=True)
        else:  # float or float | None
            kwargs[key] = _number(ctx, value_node, name)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [r for r in required if r not in kwargs]
    if missing:
        raise ctx.fail(node, field, f"missing required key {missing[0]!r}")
    gate = cls(**kwargs)
    if isinstance(gate, s.BaselineGate) and gate.min_improvement is not None and gate.max_regression is not None:
        raise ctx.fail(node, field, "give min_improvement or max_regression, not both")
    if isinstance(gate, s.CompressionGate):
        if gate.max_regression is None and gate.max_delta is None:
            raise ctx.fail(node, field, "give max_regression (a fraction of the parent's value) and/or max_delta")
        if not gate.metric.startswith("eval/") or gate.metric.startswith("eval/check_"):
            raise ctx.fail(items["metric"][1], f"{field}.metric", "the compression gate bounds an eval/<metric> "
                           "measured on both the variant and its parent")
    for key in ("max_p95_ms", "max_bytes", "min_seconds", "min_improvement", "max_regression", "min_checks",
                "max_delta"):
        value = getattr(gate, key, None)
        if value is not None and value < 0:
            raise ctx.fail(items[key][1], f"{field}.{key}", f"must be >= 0, got {value}")
    return gate


def _canary(ctx: _Ctx, node: yaml.Node) -> s.CanaryPolicy:
    gate = _gate(ctx, s.CanaryPolicy, node, "canary")
    items = _mapping(ctx, node, "canary", None)

    def fail(key: str, message: str) -> ConfigError:
        return ctx.fail(items[key][1] if key in items else node, f"canary.{key}", message)

    if gate.min_requests < 1:
        raise fail("min_requests", f"must be >= 1, got {gate.min_requests}")
    if gate.bootstrap_resamples < 100:
        raise fail("bootstrap_resamples", f"must be >= 100, got {gate.bootstrap_resamples}")
    if not 0.5 <= gate.confidence < 1:
        raise fail("confidence", f"must be in [0.5, 1), got {gate.confidence}")
    for key in ("max_error_rate_delta", "max_latency_p50_increase", "max_latency_p95_increase",
                "max_completion_length_change", "max_finish_reason_shift"):
        if getattr(gate, key) < 0:
            raise fail(key, f"must be >= 0, got {getattr(gate, key)}")
    for key in ("min_shadow_exact_match", "min_shadow_token_overlap"):
        if not 0 <= getattr(gate, key) <= 1:
            raise fail(key, f"must be between 0 and 1, got {getattr(gate, key)}")
    steps = gate.share_steps
    if any(not 0 < x <= 1 for x in steps) or list(steps) != sorted(set(steps)):
        raise fail("share_steps", f"must be increasing shares in (0, 1], got {list(steps)}")
    return gate


def _target(ctx: _Ctx, node: yaml.Node, field: str) -> s.TargetPolicy:
    keys = ("thresholds", *_GATE_CLASSES)
    items = _mapping(ctx, node, field, keys)
    kwargs: dict[str, Any] = {}
    for key, (_, value_node) in items.items():
        name = f"{field}.{key}"
        if key == "thresholds":
            if not isinstance(value_node, yaml.SequenceNode):
                raise ctx.fail(value_node, name, "expected a list of {metric, op, value[, mode]}")
            kwargs[key] = tuple(_gate(ctx, s.ThresholdGate, n, f"{name}[{i}]") for i, n in enumerate(value_node.value))
        else:
            kwargs[key] = _gate(ctx, _GATE_CLASSES[key], value_node, name)
    return s.TargetPolicy(**kwargs)


def _monitoring(ctx: _Ctx, node: yaml.Node) -> dict[str, s.MonitorThreshold]:
    # Validated loosely: the monitoring stage owns these names; we only check the shape.
    out: dict[str, s.MonitorThreshold] = {}
    for metric, (key_node, value_node) in _mapping(ctx, node, "monitoring", None).items():
        name = f"monitoring.{metric}"
        levels = _mapping(ctx, value_node, name, ("warn", "retrain"))
        values = {k: _number(ctx, v, f"{name}.{k}") for k, (_, v) in levels.items()}
        if not values:
            raise ctx.fail(value_node, name, "give warn and/or retrain")
        out[metric] = s.MonitorThreshold(**values)
    return out


def parse_policy(text: str, path: str = "<policy>") -> s.Policy:
    """Validate policy YAML ``text``; errors name ``path``, the line and the field."""
    ctx = _Ctx(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if root is None:
        raise ConfigError(f"{path}: the policy is empty")
    items = _mapping(ctx, root, "", _TOP_KEYS)
    kwargs: dict[str, Any] = {}
    for key, (_, value_node) in items.items():
        if key == "description":
            kwargs[key] = str(_scalar(ctx, value_node, key))
        elif key == "monitoring":
            kwargs[key] = _monitoring(ctx, value_node)
        elif key == "canary":
            kwargs[key] = _canary(ctx, value_node)
        else:
            kwargs[key] = _target(ctx, value_node, key)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    if kwargs.get("canary") is not None:
        # Checked with production's gates, wherever they run (promote, the guard, repair).
        kwargs["production"] = dataclasses.replace(kwargs.get("production", s.TargetPolicy()), canary=kwargs["canary"])
    return s.Policy(path=path, digest=digest, **kwargs)


def _default_path() -> Path:
    local = Path(DEFAULT_POLICY)
    if local.is_file():
        return local
    # Anywhere else: the copy inside the package. In the checkout it is a symbolic link to
    # registry_policies/default.yaml (one file to edit); a built wheel holds its content.
    return Path(__file__).resolve().parent / "default.yaml"


def load_policy(path: str | Path | None = None) -> s.Policy:
    """Load and validate a policy file (``registry_policies/default.yaml`` when ``path`` is None)."""
    p = Path(path) if path else _default_path()
    if not p.is_file():
        raise ConfigError(f"policy file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read policy {p}: {exc}") from None
    return parse_policy(text, str(p))
