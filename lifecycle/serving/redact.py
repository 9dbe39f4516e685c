"""Keep what a client sent and what an operator configured out of recorded messages.

Inference records and monitor runs outlive the request: anything quoted into them (a prompt, a
stop string, the password in ``https://user:pass@host/...``) would be kept and shipped with
them. These helpers cut such text out of a message before it is written anywhere.
"""

from __future__ import annotations

from typing import Iterable

from lifecycle.secrets import mask_secrets

REDACTED = "<redacted>"


def without(text: str, secrets: Iterable[str], *, min_chars: int = 1) -> str:
    """``text`` with every occurrence of each secret (as is, and as Python would quote it) removed."""
    for secret in sorted({s for s in secrets if isinstance(s, str) and len(s) >= min_chars}, key=len, reverse=True):
        for form in (repr(secret), secret):
            if form in text:
                text = text.replace(form, REDACTED)
    return text


def record_safe(message: str, secrets: Iterable[str] = (), *, limit: int = 300) -> str:
    """One line, no client text, no URI credentials, at most ``limit`` characters."""
    line = " ".join(without(message, secrets).split())
    line = mask_secrets(line)
    return line if len(line) <= limit else line[:limit - 3] + "..."
