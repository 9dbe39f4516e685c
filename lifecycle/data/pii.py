"""PII scrubbing: e-mail, phone, IPv4, Luhn-valid card numbers and secrets.

:func:`scrub` is public and dependency-free: serving runs it on inference records too. Secrets
are matched first so that, say, the digits inside a PEM block are not reported as a phone.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

PLACEHOLDERS = {
    "private_key": "<PRIVATE_KEY>",
    "aws_access_key": "<AWS_ACCESS_KEY>",
    "api_key": "<API_KEY>",
    "email": "<EMAIL>",
    "credit_card": "<CREDIT_CARD>",
    "ipv4": "<IPV4>",
    "phone": "<PHONE>",
}

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

_PATTERNS: dict[str, re.Pattern[str]] = {
    "private_key": re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    # AWS access key ids (long-term AKIA, temporary ASIA) and secret keys assigned in config files.
    "aws_access_key": re.compile(
        r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"
        r"|(?i:aws_secret_access_key)\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{40}\b"),
    # OpenAI/Anthropic-style sk-..., GitHub, Google, Slack tokens.
    "api_key": re.compile(
        r"\bsk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{20,}"
        r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"
        r"|\bAIza[0-9A-Za-z_\-]{35}\b"
        r"|\bxox[baprs]-[A-Za-z0-9-]{10,}\b"),
    "email": re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"),
    # Contiguous 13-19 digits, or the printed groupings (4-4-4-4(-3), Amex 4-6-5) with one
    # consistent separator: arbitrary digit runs in code samples are not card numbers.
    "credit_card": re.compile(
        r"(?<![\d.,])(?:\d{13,19}|\d{4}([ \-])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{4}([ \-])\d{6}\2\d{5})(?![\d.,])"),
    "ipv4": re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d]|\.\d)"),
    "phone": re.compile(
        # mainland China mobile, optional +86 / 0086 prefix: 1[3-9]x xxxx xxxx. Lookarounds test
        # digits only, because Chinese text puts the number right next to ideographs (\w).
        r"(?<![\d+])(?:(?:\+|00)86[ \-]?)?1[3-9]\d(?:[ \-]?\d{4}){2}(?!\d)"
        # international: +CC (no leading 0), then digit groups separated by space, dash or (..)
        r"|(?<![\w+])\+[1-9]\d{0,2}(?:[ \-]?\(\d{1,4}\))?(?:[ \-]?\d{2,4}){2,5}(?![\d.,])"
        # North American (xxx) xxx-xxxx / xxx-xxx-xxxx
        r"|(?<!\w)\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}(?!\d)|(?<![\w\-.])\d{3}[.\-]\d{3}[.\-]\d{4}(?![\w\-.])"),
}

ORDER = ("private_key", "aws_access_key", "api_key", "email", "credit_card", "ipv4", "phone")

# Cheap gates: a full pattern runs only when its gate matches. The full patterns carry
# lookarounds that Python's regex engine tries at every position, which made scrubbing the
# slowest step of prepare; a literal or a plain character class is scanned many times faster.
_AWS_PREFIXES = ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA")
_API_PREFIXES = ("sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "AIza", "xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-")
_DIGITS_4 = re.compile(r"\d{4}")
_DOTTED = re.compile(r"\d\.\d{1,3}\.\d")
_DIGITS_3 = re.compile(r"\d{3}")
_AWS_SECRET = "ws_secret_access_key"
_GATES: dict[str, Callable[[str], bool]] = {
    "private_key": lambda t: "PRIVATE KEY" in t,
    # Substring tests run at memchr speed; the cheap first test skips the rest for most text.
    "aws_access_key": lambda t: ("A" in t and any(p in t for p in _AWS_PREFIXES))
    or ("_" in t and _AWS_SECRET in t.lower()),
    "api_key": lambda t: ("-" in t and ("sk-" in t or "xox" in t)) or ("_" in t and "gh" in t) or "AIza" in t,
    "email": lambda t: "@" in t,
    "credit_card": lambda t: _DIGITS_4.search(t) is not None,
    "ipv4": lambda t: _DOTTED.search(t) is not None,
    "phone": lambda t: _DIGITS_3.search(t) is not None,
}
# Card numbers, addresses and phones need a digit: most prose has none, and one check for any
# digit skips all three patterns.
_NEEDS_DIGIT = frozenset({"credit_card", "ipv4", "phone"})
_ANY_DIGIT = re.compile(r"\d")


def _has_digit(text: str) -> bool:
    if text.isascii():
        return any(d in text for d in "0123456789")
    return _ANY_DIGIT.search(text) is not None  # \d also matches other scripts' digits


def luhn_ok(digits: str) -> bool:
    """True when the digit string passes the Luhn checksum (as card numbers do)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _phone_ok(m: re.Match[str]) -> bool:
    digits = sum(ch.isdigit() for ch in m.group(0))
    return 7 <= digits <= 15


# A dotted quad right after a version word is a version (".NET 4.8.1.0", "Python 3.11.7.1",
# "v1.2.0.4"), not an address. Five or more groups never match the pattern at all.
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|release|build|python|ver\.?)|\bv)\s*[:=]?\s*$", re.IGNORECASE)


def _ipv4_ok(m: re.Match[str]) -> bool:
    return _VERSION_BEFORE.search(m.string, max(0, m.start() - 16), m.start()) is None


_VALIDATORS: dict[str, Callable[[re.Match[str]], bool]] = {
    "credit_card": lambda m: luhn_ok("".join(ch for ch in m.group(0) if ch.isdigit())),
    "ipv4": _ipv4_ok,
    "phone": _phone_ok,
}


def scrub(text: str, types: Iterable[str] | None = None) -> tuple[str, dict[str, int]]:
    """Replace PII in ``text`` with typed placeholders; return the new text and counts per type.

    ``types`` limits the scrubbers (default: all of :data:`ORDER`). Only types found appear in
    the counts.
    """
    wanted = ORDER if types is None else set(types)
    counts: dict[str, int] = {}
    # Placeholders hold no digits, so scrubbing never adds one: checked once, up front.
    digits = _has_digit(text)
    for kind in ORDER:
        if kind not in wanted or (not digits and kind in _NEEDS_DIGIT):
            continue
        pattern = _PATTERNS[kind]
        if not _GATES[kind](text):
            continue
        validator = _VALIDATORS.get(kind)
        placeholder = PLACEHOLDERS[kind]
        found = 0

        def _sub(m: re.Match[str]) -> str:
            nonlocal found
            if validator is not None and not validator(m):
                return m.group(0)
            found += 1
            return placeholder

        text = pattern.sub(_sub, text)
        if found:
            counts[kind] = found
    return text, counts
