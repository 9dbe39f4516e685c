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
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from lifecycle.errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: Texts that unset an optional non-string field (see :func:`_unsets`); YAML's own nulls arrive as None.
_NULL = {"", "none", "null", "~"}
#: A number as text: ASCII digits only. Python's int()/float() also read other scripts' digits ("٥"),
#: underscores ("1_000") and "infinity"; a user's text is never re-parsed into a number it does not show.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|nan)",
                     re.ASCII | re.IGNORECASE)


def number_text(value: Any) -> bool:
    """Whether ``value`` (text from a flag, ``--set`` or a mapping) is written as a plain number."""
    return not isinstance(value, str) or _NUMBER.fullmatch(value.strip()) is not None


class SetText(str):
    """The text of a ``--set KEY=VALUE`` value, typed later by the declared type of the field it sets.

    Parsing it earlier (as YAML) is what turned ``--set model_name=012`` into ``10`` and
    ``--set data.text_column=yes`` into ``True``: only the field knows what the text means.
    """


class FlagValue(str):
    """A string flag's value, already typed by click: a ``str`` field takes it exactly as written."""


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested mapping ``{"a": {"b": "1"}, "c": "x"}`` of :class:`SetText`.

    Values stay text here; :func:`from_mapping` types each by the field it sets, so a ``str``
    field keeps the text exactly and ``3e-4``, ``true`` or ``[1, 2]`` become a number, a bool
    or a list only where the field is one.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _put(out, key, SetText(raw), f"--set {key}")
    return out


def nest(flat: Mapping[str, Any], *, what: str = "flag") -> dict[str, Any]:
    """``{"a.b": 1, "c": 2}`` as ``{"a": {"b": 1}, "c": 2}``, leaving out ``None`` (a flag not given).

    String values become :class:`FlagValue`: taken exactly as written by a ``str`` field.
    """
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        _put(out, key, FlagValue(value) if isinstance(value, str) else value, f"{what} {key}")
    return out


def _put(out: dict[str, Any], key: str, value: Any, where: str) -> None:
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part!r} is not a section")
    node[parts[-1]] = value


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


def _unsets(text: str, tp: Any, optional: bool) -> bool:
    """Whether ``text`` unsets an optional field of type ``tp``: an empty value does, and ``none``/``null``/``~``
    do where the field is not a string (a string field keeps them as its text, whatever their source)."""
    return optional and (text == "" or (tp is not str and text.strip().lower() in _NULL))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _strip_optional(tp)
    if isinstance(value, SetText):
        return _coerce_text(str(value), tp, optional, key)
    if isinstance(value, FlagValue):
        value = str(value)
        if tp is str:
            return value  # a string flag is taken exactly as written: "none", "" and "012" included
    if value is None or (isinstance(value, str) and _unsets(value, tp, optional)):
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
        if isinstance(value, int):
            return value
        if not number_text(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(str(value).strip())
        except ValueError:
            pass
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
        if not number_text(value):
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


def _coerce_text(text: str, tp: Any, optional: bool, key: str) -> Any:
    """Type the text of ``--set KEY=TEXT`` by the field's declared type ``tp``.

    A ``str`` field takes the text exactly. An optional field is unset by an empty value
    (``--set KEY=``), or by ``none``/``null`` where the field is not a string.
    """
    if _unsets(text, tp, optional):
        return None
    if tp is str:
        return text
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key}: is a section; set its keys instead ({key}.KEY=VALUE)")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        for choice in allowed:
            if text == (choice if isinstance(choice, str) else _scalar_text(choice)):
                return choice
        raise ConfigError(f"{key}: {text!r} is not one of {', '.join(map(str, allowed))}")
    if tp in (bool, int):
        return _coerce(text, tp, key)  # a string already takes the one path for true/false and integers
    if tp is float:
        if not number_text(text):
            raise ConfigError(f"{key}: expected a number, got {text!r}")
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
        if math.isnan(number):
            raise ConfigError(f"{key}: expected a number, got {text!r}")
        return number
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        stripped = text.strip()
        if stripped.startswith("["):
            # YAML's BaseLoader keeps every item as text, typed below by the item type like any --set text.
            items = _yaml_text(stripped, key, loader=yaml.BaseLoader)
            if not isinstance(items, list):
                raise ConfigError(f"{key}: expected a list, got {text!r}")
            items = [SetText(v) if isinstance(v, str) else v for v in items]
        else:
            items = [SetText(v.strip()) for v in text.split(",") if v.strip()]
        if inner is Any:
            items = [str(v) if isinstance(v, SetText) else v for v in items]
        return _coerce(items, tp, key)
    # Mappings and untyped fields have no text form of their own: read them as YAML.
    return _coerce(_yaml_text(text, key), tp, key)


def _scalar_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _yaml_text(text: str, key: str, loader: Any = yaml.SafeLoader) -> Any:
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - SafeLoader or BaseLoader only
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read {text!r} ({getattr(exc, 'problem', None) or 'invalid YAML'})") from None


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
    default's value. Dotted flag names (``"optim.lr"``) address nested sections. A flag's value is
    taken as given (a string flag exactly as written); only ``--set`` text is typed, by the field.
    """
    data: dict[str, Any] = load_yaml(path) if path else {}
    # Flags are typed by click already: merged as values, never re-read as text.
    data = deep_merge(data, nest(flags))
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
