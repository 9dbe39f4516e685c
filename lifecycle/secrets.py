"""Masking of credentials: the one place that decides what of a URI may be shown.

Params, tags, artifacts, reports, inference records and error lines outlive the command that wrote
them, and any of them may quote a URI a user gave (a tracking URI, ``tune --storage``, a source, a
presigned artifact URL). Everything that logs, tags, renders or records such text passes it
through :func:`mask_secrets`. Nothing here imports MLflow or another module of ours.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

#: ``scheme://userinfo@``: the userinfo runs to the last ``@`` before the host (a password may hold
#: an unescaped ``@``), never across whitespace, quotes or a ``/`` (the path).
_URI_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#'\"<>]*)@")
#: Query parameters that carry secrets in presigned or token URLs.
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|password|passwd|secret|sig|signature|"
                           r"x-amz-signature|x-amz-credential|x-amz-security-token|api[_-]?key)=)[^&\s'\"]+")
MASK = "***"


def mask_secrets(text: Any) -> str:
    """``text`` with the credentials of every URI replaced by ``***``.

    Both the userinfo of ``scheme://user:password@host`` (the user name goes too: with a token
    scheme it is the secret itself) and the values of secret query parameters (``?token=``,
    ``&X-Amz-Signature=`` ...) are masked.
    """
    masked = _URI_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", str(text))
    return _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, masked)


def mask_mapping(values: Mapping[str, Any]) -> dict[str, str]:
    """``values`` (params or tags) as strings with :func:`mask_secrets` applied to each value."""
    return {key: mask_secrets(value) for key, value in values.items()}
