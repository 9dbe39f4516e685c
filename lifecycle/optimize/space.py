"""The search-space file of ``lifecycle tune``: which training keys to search, and how.

A space file is YAML::

    params:                       # TrainConfig keys (dotted for sections: lora.r)
      learning_rate: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
      warmup_steps:  {type: int, low: 0, high: 20, step: 5}
      batch_size:    {type: categorical, choices: [4, 8]}
    fixed:                        # TrainConfig keys every trial shares
      max_steps: 60
      eval_every: 10
    pruner: {n_startup_trials: 2, n_warmup_steps: 10}   # optuna's MedianPruner
    sampler: {seed: 0}                                   # optuna's TPESampler
    enqueue:                      # points tried first (known-good settings), then the sampler's
      - {learning_rate: 1.0e-3}

Everything is checked before a study starts: an unknown parameter names the valid keys, an empty
range (``low >= high``, no choices) is refused, and the extremes of every range are built into a
:class:`~lifecycle.train.config.TrainConfig` so a value training would refuse fails now, not in
trial 7. Errors name the file and the parameter.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lifecycle.config import deep_merge, from_mapping, load_yaml, parse_overrides
from lifecycle.errors import ConfigError

#: Keys the search itself controls for every trial (one output folder per trial, no per-trial
#: registration, no progress bars from parallel trials).
CONTROLLED = ("output", "model_name", "log_model", "progress", "experiment", "checkpoint_every",
              "keep_checkpoints", "system_metrics")
_TOP_KEYS = ("description", "params", "fixed", "pruner", "sampler", "enqueue")
_KINDS = ("float", "int", "categorical")
_PRUNER_KEYS = ("n_startup_trials", "n_warmup_steps", "interval_steps")
_SAMPLER_KEYS = ("seed", "n_startup_trials")


@dataclass(frozen=True)
class Param:
    """One searched key: a float or int range, or a list of choices."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Draw this parameter from an Optuna trial."""
        if self.kind == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def extremes(self) -> list[Any]:
        """The values that bound this parameter (checked against TrainConfig up front)."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


@dataclass(frozen=True)
class Space:
    """A validated search space."""

    path: str
    params: tuple[Param, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, int] = field(default_factory=dict)
    sampler: dict[str, int] = field(default_factory=dict)
    enqueue: tuple[dict[str, Any], ...] = ()
    description: str = ""

    @property
    def names(self) -> list[str]:
        """The searched keys, in file order."""
        return [p.name for p in self.params]


def config_keys(cls: type | None = None, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of ``TrainConfig`` (sections flattened) with its declared type."""
    from lifecycle.config import _strip_optional
    from lifecycle.train.config import TrainConfig

    cls = cls or TrainConfig
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out.update(config_keys(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"lora.r": 8}`` -> ``{"lora": {"r": 8}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *sections, last = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _fail(path: str, where: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {message}")


def _check_key(path: str, where: str, name: str, keys: Mapping[str, Any]) -> None:
    if name in CONTROLLED:
        raise _fail(path, where, f"{name!r} is set by the search for every trial and cannot be searched or fixed")
    if name not in keys:
        valid = ", ".join(k for k in keys if k not in CONTROLLED)
        raise _fail(path, where, f"unknown parameter {name!r}; valid parameters (TrainConfig keys): {valid}")


def _number(path: str, where: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # YAML 1.1 reads 3e-4 (no dot) as a string: accept what is plainly a number.
        try:
            value = float(str(value)) if not isinstance(value, bool) else value
        except ValueError:
            raise _fail(path, where, f"expected a number, got {value!r}") from None
        if isinstance(value, bool):
            raise _fail(path, where, f"expected a number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise _fail(path, where, f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _param(path: str, name: str, spec: Any, keys: Mapping[str, Any]) -> Param:
    where = f"params.{name}"
    _check_key(path, where, name, keys)
    if not isinstance(spec, Mapping):
        raise _fail(path, where, "expected a mapping such as {type: float, low: 0.0001, high: 0.01, log: true}")
    allowed = ("type", "low", "high", "step", "log", "choices")
    unknown = [k for k in spec if k not in allowed]
    if unknown:
        raise _fail(path, f"{where}.{unknown[0]}", f"unknown key; valid keys: {', '.join(allowed)}")
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in _KINDS:
        raise _fail(path, f"{where}.type", f"{kind!r} is not one of {', '.join(_KINDS)}")
    declared = keys[name]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list):
            raise _fail(path, f"{where}.choices", "expected a list of values")
        if not choices:
            raise _fail(path, f"{where}.choices", "empty range: give at least one choice")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise _fail(path, f"{where}.choices", "choices must be numbers, strings, booleans or null")
        if len(set(map(repr, choices))) != len(choices):
            raise _fail(path, f"{where}.choices", "duplicate choices")
        extra = [k for k in ("low", "high", "step", "log") if k in spec]
        if extra:
            raise _fail(path, f"{where}.{extra[0]}", "a categorical parameter takes only choices")
        return Param(name, kind, choices=tuple(choices))
    if "choices" in spec:
        raise _fail(path, f"{where}.choices", f"a {kind} range takes low/high, not choices")
    if declared is int and kind == "float":
        raise _fail(path, f"{where}.type", f"{name} is an integer key: use type: int")
    if declared is not int and declared is not float:
        raise _fail(path, f"{where}.type", f"{name} is not numeric: search it with type: categorical")
    for key in ("low", "high"):
        if key not in spec:
            raise _fail(path, where, f"missing {key!r}")
    integer = kind == "int"
    low = _number(path, f"{where}.low", spec["low"], integer)
    high = _number(path, f"{where}.high", spec["high"], integer)
    if low >= high:
        raise _fail(path, where, f"empty range: low ({low:g}) must be below high ({high:g}); "
                                 "a single value belongs under fixed:")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _fail(path, f"{where}.log", f"expected true/false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(path, f"{where}.step", step, integer)
        if step <= 0:
            raise _fail(path, f"{where}.step", "must be positive")
        if step > high - low:
            raise _fail(path, f"{where}.step", f"empty range: step {step:g} is wider than low..high")
        if log and (kind == "float" or step != 1):
            raise _fail(path, f"{where}.step", "a log range takes no step")
    if log and low <= 0:
        raise _fail(path, f"{where}.low", "a log range needs low > 0")
    return Param(name, kind, low=low, high=high, step=step, log=log)


def _int_section(path: str, name: str, raw: Any, allowed: tuple[str, ...]) -> dict[str, int]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _fail(path, name, "expected a mapping")
    out = {}
    for key, value in raw.items():
        if key not in allowed:
            raise _fail(path, f"{name}.{key}", f"unknown key; valid keys: {', '.join(allowed)}")
        number = _number(path, f"{name}.{key}", value, integer=True)
        if number < 0:
            raise _fail(path, f"{name}.{key}", "must be >= 0")
        out[key] = int(number)
    return out


def parse_space(data: Any, path: str = "<space>") -> Space:
    """Validate a loaded space mapping (see the module docstring for the format)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping with params:")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise _fail(path, str(unknown[0]), f"unknown section; valid sections: {', '.join(_TOP_KEYS)}")
    keys = config_keys()
    raw_params = data.get("params")
    if not isinstance(raw_params, Mapping) or not raw_params:
        raise _fail(path, "params", "give at least one parameter to search, e.g. "
                                    "learning_rate: {type: float, low: 0.0003, high: 0.003, log: true}")
    params = tuple(_param(path, str(name), spec, keys) for name, spec in raw_params.items())
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, Mapping):
        raise _fail(path, "fixed", "expected a mapping of TrainConfig keys")
    flat_fixed: dict[str, Any] = {}
    for key, value in fixed.items():
        if isinstance(value, Mapping):  # a section written nested (lora: {r: 8})
            flat_fixed.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat_fixed[str(key)] = value
    for key in flat_fixed:
        _check_key(path, f"fixed.{key}", key, keys)
        if key in (p.name for p in params):
            raise _fail(path, f"fixed.{key}", "is also searched under params: give it in one place")
    enqueue_raw = data.get("enqueue") or []
    if not isinstance(enqueue_raw, list) or not all(isinstance(e, Mapping) for e in enqueue_raw):
        raise _fail(path, "enqueue", "expected a list of {parameter: value} mappings")
    names = {p.name for p in params}
    for i, point in enumerate(enqueue_raw):
        for key in point:
            if key not in names:
                raise _fail(path, f"enqueue[{i}].{key}",
                            f"not a searched parameter; searched: {', '.join(sorted(names))}")
    description = data.get("description") or ""
    return Space(path=path, params=params, fixed=flat_fixed,
                 pruner=_int_section(path, "pruner", data.get("pruner"), _PRUNER_KEYS),
                 sampler=_int_section(path, "sampler", data.get("sampler"), _SAMPLER_KEYS),
                 enqueue=tuple(dict(e) for e in enqueue_raw), description=str(description))


def load_space(path: str | Path) -> Space:
    """Read and validate a space file."""
    return parse_space(load_yaml(path), str(path))


def base_mapping(space: Space, config_path: str | Path | None = None,
                 overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The training config every trial starts from: defaults < --config < fixed: < --set."""
    data: dict[str, Any] = load_yaml(config_path) if config_path else {}
    data = deep_merge(data, nest(space.fixed))
    extra = parse_overrides(overrides)
    searched = set(space.names)
    flat = {k for k in _flat_keys(extra)}
    clash = sorted(flat & searched)
    if clash:
        raise ConfigError(f"--set {clash[0]}: that key is searched by {space.path}; remove it from one of them")
    bad = sorted(flat & set(CONTROLLED))
    if bad:
        raise ConfigError(f"--set {bad[0]}: set by the search for every trial")
    return deep_merge(data, extra)


def _flat_keys(mapping: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out += _flat_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def trial_config(base: Mapping[str, Any], values: Mapping[str, Any], controlled: Mapping[str, Any]) -> Any:
    """The ``TrainConfig`` of one trial: the base, the sampled ``values``, then what tune controls."""
    from lifecycle.train.config import TrainConfig

    merged = deep_merge(deep_merge(base, nest(values)), nest(controlled))
    return from_mapping(TrainConfig, merged)


def check_extremes(space: Space, base: Mapping[str, Any]) -> None:
    """Build a TrainConfig at every bound of every range: refuse what training would refuse."""
    trial_config(base, {}, {})  # the base alone must be valid too
    for p in space.params:
        for value in p.extremes():
            try:
                trial_config(base, {p.name: value}, {})
            except ConfigError as exc:
                raise _fail(space.path, f"params.{p.name}", f"{value!r} is not a valid value: {exc}") from None
