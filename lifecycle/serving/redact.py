"""Keep what a client sent and what an operator configured out of recorded messages.

Inference records and monitor runs outlive the request: anything quoted into them (a prompt, a
stop string, the password in ``https://user:pass@host/...``) would be kept and shipped with
them. These helpers cut such text out of a message before it is written anywhere.
"""

from __future__ import annotations

import re
from typing import Iterable

#: ``scheme://user:password@`` (or ``scheme://token@``): the userinfo part of a URI.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@'\"]+@")
#: Query parameters that carry secrets in presigned or token URLs.
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|password|passwd|secret|sig|signature|"
                           r"x-amz-signature|x-amz-credential|x-amz-security-token|api[_-]?key)=)[^&\s'\"]+")
REDACTED = "<redacted>"


def strip_credentials(text: str) -> str:
    """``text`` with the userinfo of every URI and secret query values replaced by ``***``."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


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
    line = strip_credentials(line)
    return line if len(line) <= limit else line[:limit - 3] + "..."
