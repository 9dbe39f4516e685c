"""Text users give the registry: kept whole or refused up front, and shown safely in one line."""

from __future__ import annotations

import unicodedata

from lifecycle.errors import ConfigError

#: A reason is prose for people: longer text is refused up front (exit 2), not stored in part.
MAX_REASON_CHARS = 20_000
_PREVIEW = 500


def check_text(text: str, what: str = "--reason", limit: int = MAX_REASON_CHARS) -> str:
    """Refuse text the ledger cannot keep whole (:class:`ConfigError`, exit 2); return it unchanged.

    Any length up to ``limit`` and any character are kept exactly, quotes, newlines, control
    characters and non-ASCII included, except text that is not Unicode (lone surrogates, which is
    how Python hands over a command-line argument that was not valid UTF-8).
    """
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be text, got {type(text).__name__}")
    if len(text) > limit:
        raise ConfigError(f"{what} is {len(text)} characters; the ledger keeps at most {limit} "
                          f"(put longer text in a file and give its path or URL)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} is not valid UTF-8 text; nothing was written") from None
    return text


def preview(text: str, limit: int = _PREVIEW) -> str:
    """A one-line, printable preview of ``text`` for a short tag, a run name or a status line.

    Control characters (NUL, newlines ...) become escapes: PostgreSQL refuses NUL in text, and a
    run name is one line. The whole text stays in the event's JSON.
    """
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    flat = "".join(out)
    return flat if len(flat) <= limit else flat[:limit - 1] + "\u2026"
