"""Cleaning: Unicode normalisation, control characters out, whitespace normalised.

Newlines and paragraph breaks are kept (quality filters and the raw text need them); runs of
spaces and tabs inside a line collapse to one space and trailing spaces go.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except \t and \n, plus DEL and zero-width/BOM characters; \r is folded first.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACE_CLASS = "[ \\t\u00a0\u2000-\u200a\u3000]"
# Inside a line (after a non-space): two or more spaces, or any tab / Unicode space, become one.
_INNER_SPACES = re.compile(rf"(?<=\S)(?: {{2,}}| *[\t\u00a0\u2000-\u200a\u3000]{_SPACE_CLASS}*)(?=\S)")
_TRAILING = re.compile(rf"{_SPACE_CLASS}+$", re.MULTILINE)
_LEADING_TABS = re.compile(r"^[ \t]*\t[ \t]*", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")
# Cheap gates (plain scans, no lookarounds): a pattern above runs only when it could match.
_NEEDS_INNER = re.compile(r"  |[\t\u00a0\u2000-\u200a\u3000]")


def clean_text(text: str, *, unicode_form: str = "NFC", strip_control: bool = True,
               normalize_whitespace: bool = True) -> str:
    """Return ``text`` normalised to ``unicode_form`` with controls removed and whitespace tidied.

    Inside a line, runs of spaces, tabs and Unicode spaces (the ideographic space U+3000
    included) become one ASCII space; leading indentation is kept (tabs become four spaces)
    because it carries meaning in code samples; trailing spaces and runs of blank lines go.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # ASCII text is already NFC/NFKC and holds none of the Unicode spaces, so it takes the fast
    # gates below; anything else takes the full patterns.
    ascii_ = text.isascii()
    if not ascii_ and not unicodedata.is_normalized(unicode_form, text):
        text = unicodedata.normalize(unicode_form, text)
    if strip_control and _CONTROL.search(text) is not None:
        text = _CONTROL.sub("", text)
    if normalize_whitespace:
        if "\t" in text:
            text = _LEADING_TABS.sub(lambda m: m.group(0).replace("\t", "    "), text)
        if ("  " in text or "\t" in text) if ascii_ else _NEEDS_INNER.search(text) is not None:
            text = _INNER_SPACES.sub(" ", text)
        # Trailing space: a space or tab right before a newline or at the very end.
        if not ascii_ or " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
            text = _TRAILING.sub("", text)
        if "\n\n\n" in text:
            text = _BLANK_LINES.sub("\n\n", text)
        text = text.strip("\n")
    return text
