"""Validated configuration for every stage: dataclasses, YAML files and ``--set key=value``.

Each stage declares a frozen-ish dataclass tree (nested dataclasses for sections such as
``lora``). This module turns plain mappings (from YAML, flags and overrides) into those
dataclasses, refusing unknown keys with the list of valid ones and coercing scalar strings
(``--set optim.lr=3e-4``) to the declared types. Validation of *values* lives in each dataclass's
``__post_init__``, in the style of transformers' ``run_clm.py`` argument classes.

Nothing here imports MLflow or torch: configs are testable and cheap to import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from lifecycle.errors import ConfigError

T = TypeVar("T")

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested mapping ``{"a": {"b": 1}, "c": "x"}``.

    Values are parsed as YAML scalars so that ``3e-4``, ``true`` and ``[1, 2]`` mean what they
    look like; the dataclass coercion then checks them against the declared type.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            # YAML 1.1 reads "3e-4" (no dot) as a string; users mean the number.
            value = float(value)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into a copy of ``base``; nested mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` with a one-line error when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_mapping(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v, inner, f"{key}[{i}]") if inner is not Any else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _changed(custom: Mapping[str, Any], plain: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``custom`` whose values differ from ``plain`` (nested)."""
    out: dict[str, Any] = {}
    for key, value in custom.items():
        if isinstance(value, Mapping) and isinstance(plain.get(key), Mapping):
            sub = _changed(value, plain[key])
            if sub:
                out[key] = sub
        elif plain.get(key, object()) != value:
            out[key] = value
    return out


def _with_section_defaults(f: dataclasses.Field, value: Any) -> Any:
    """A partial section over the parent's own default for it (``field(default_factory=...)``).

    Without this, ``--set train.eval_every=10`` would rebuild ``train`` from TrainConfig's class
    defaults and silently drop what the parent config chose (the pipeline's learning rate ...).
    """
    if not isinstance(value, Mapping) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    try:
        plain = to_dict(type(default)())
    except Exception:  # noqa: BLE001 - a section without a no-argument default: nothing to compare
        return value
    custom = _changed(to_dict(default), plain)
    return deep_merge(custom, value) if custom else value


def from_mapping(cls: type[T], mapping: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``mapping``, refusing unknown keys and coercing types.

    Errors name the dotted key and, for unknown keys, list the valid ones, so a typo in
    ``--set lora.rank=8`` says ``valid keys: lora.r, lora.alpha, ...``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in mapping if k not in fields]
    if unknown:
        valid = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys: {valid}")
    kwargs = {name: _coerce(_with_section_defaults(fields[name], value), hints[name], prefix + name)
              for name, value in mapping.items()}
    try:
        return cls(**kwargs)  # type: ignore[call-arg]
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    **flags: Any,
) -> T:
    """Resolve a stage config: dataclass defaults < YAML file < explicit flags < ``--set``.

    ``flags`` whose value is ``None`` are ignored so that unset CLI options keep the file's or the
    default's value. Dotted flag names (``"optim.lr"``) address nested sections.
    """
    data: dict[str, Any] = load_yaml(path) if path else {}
    flag_items = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in flags.items() if v is not None]
    data = deep_merge(data, parse_overrides(flag_items))
    data = deep_merge(data, parse_overrides(overrides))
    return from_mapping(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested Python data (for YAML dumps and digests)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a config to ``{"section.key": "value"}`` strings, the shape MLflow params take."""
    data = cfg if isinstance(cfg, Mapping) else to_dict(cfg)
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = "" if value is None else str(value)
    return out


def config_digest(cfg: Any) -> str:
    """A stable short digest of a resolved config, used in cache keys and lineage tags."""
    blob = json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
