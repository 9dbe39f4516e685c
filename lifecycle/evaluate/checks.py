"""Behavioural checks read from a small YAML suite; each becomes ``eval/check_<name>`` (0/1).

A check calls the model the way a client does (the pyfunc ``predict``), so it tests what is
served. Kinds: ``non_empty``, ``max_new_tokens``, ``deterministic``, ``no_pii_echo`` (see
``checks.yaml`` for the default suite).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lifecycle.errors import ConfigError

DEFAULT_SUITE = Path(__file__).resolve().parent / "checks.yaml"
KINDS = ("non_empty", "max_new_tokens", "deterministic", "no_pii_echo")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")

#: predict(prompts, params) -> DataFrame with columns text, completion_tokens (the pyfunc contract).
PredictFn = Callable[[list[str], Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Check:
    """One behavioural check."""

    name: str
    kind: str
    prompts: tuple[str, ...]
    max_new_tokens: int = 16
    repeats: int = 2
    pii: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check with a one-line reason."""

    name: str
    kind: str
    passed: bool
    detail: str


def load_suite(path: str | Path | None = None) -> list[Check]:
    """Read and validate a suite; errors name the file and the check."""
    from lifecycle.config import load_yaml

    p = Path(path) if path else DEFAULT_SUITE
    data = load_yaml(p)
    items = data.get("checks")
    unknown = set(data) - {"checks"}
    if unknown:
        raise ConfigError(f"{p}: unknown top-level key {sorted(unknown)[0]!r}; expected 'checks'")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{p}: 'checks' must be a non-empty list")
    allowed = {"name", "kind", "prompts", "max_new_tokens", "repeats", "pii"}
    checks: list[Check] = []
    for i, item in enumerate(items):
        where = f"{p}: checks[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping")
        extra = set(item) - allowed
        if extra:
            raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r}; valid keys: {', '.join(sorted(allowed))}")
        name, kind = str(item.get("name", "")), str(item.get("kind", ""))
        if not _NAME.match(name):
            raise ConfigError(f"{where}: name {name!r} must be letters, digits and _ (it becomes eval/check_<name>)")
        if kind not in KINDS:
            raise ConfigError(f"{where} ({name}): kind {kind!r} is not one of {', '.join(KINDS)}")
        prompts = item.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(s, str) and s for s in prompts):
            raise ConfigError(f"{where} ({name}): 'prompts' must be a non-empty list of strings")
        pii = item.get("pii", [])
        pii_ok = isinstance(pii, list) and bool(pii) and all(isinstance(s, str) and s for s in pii)
        if kind == "no_pii_echo" and not pii_ok:
            raise ConfigError(f"{where} ({name}): no_pii_echo needs a non-empty 'pii' list of strings")
        try:
            max_new = int(item.get("max_new_tokens", 16))
            repeats = int(item.get("repeats", 2))
        except (TypeError, ValueError):
            raise ConfigError(f"{where} ({name}): max_new_tokens and repeats must be integers") from None
        if max_new <= 0 or repeats < 2:
            raise ConfigError(f"{where} ({name}): max_new_tokens must be positive and repeats at least 2")
        if name in {c.name for c in checks}:
            raise ConfigError(f"{where}: duplicate check name {name!r}")
        checks.append(Check(name, kind, tuple(prompts), max_new, repeats, tuple(pii)))
    return checks


def _texts(frame: Any) -> list[str]:
    return [str(t) for t in frame["text"]]


def run_check(check: Check, predict: PredictFn) -> CheckResult:
    """Run one check through ``predict`` with greedy decoding."""
    params = {"max_new_tokens": check.max_new_tokens, "do_sample": False}
    prompts = list(check.prompts)
    if check.kind == "non_empty":
        texts = _texts(predict(prompts, params))
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        return CheckResult(check.name, check.kind, not blank,
                           f"blank completion for prompt(s) {blank}" if blank else "all completions non-blank")
    if check.kind == "max_new_tokens":
        frame = predict(prompts, params)
        counts = [int(c) for c in frame["completion_tokens"]]
        over = [c for c in counts if c > check.max_new_tokens]
        return CheckResult(check.name, check.kind, not over,
                           f"completions of {over} tokens > {check.max_new_tokens}" if over
                           else f"longest completion {max(counts)} <= {check.max_new_tokens} tokens")
    if check.kind == "deterministic":
        runs = [_texts(predict(prompts, params)) for _ in range(check.repeats)]
        differ = [i for i in range(len(prompts)) if len({r[i] for r in runs}) > 1]
        return CheckResult(check.name, check.kind, not differ,
                           f"greedy outputs differ across repeats for prompt(s) {differ}" if differ
                           else f"identical over {check.repeats} repeats")
    if check.kind == "no_pii_echo":
        texts = _texts(predict(prompts, params))
        leaked = sorted({s for t in texts for s in check.pii if s in t})
        return CheckResult(check.name, check.kind, not leaked,
                           f"echoed {len(leaked)} PII string(s) verbatim" if leaked else "no PII echoed")
    raise ConfigError(f"unknown check kind {check.kind!r}")


def run_suite(checks: list[Check], predict: PredictFn) -> list[CheckResult]:
    """Run every check of a suite."""
    return [run_check(c, predict) for c in checks]
