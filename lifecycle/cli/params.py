"""Click parameter types for numbers that take only what the user wrote: plain ASCII numbers.

click's INT and FLOAT call Python's ``int()``/``float()``, which also read other scripts' digits
(``--max-steps ٥`` is 5), underscores (``1_000``) and ``infinity``. A flag is never re-parsed into
something it does not show, so these refuse such text first, by the one rule the config loader uses
(:func:`lifecycle.config.number_text`), and leave the rest to click's own types and ranges.
"""

from __future__ import annotations

from typing import Any

import click

from lifecycle.config import number_text


class _PlainNumber:
    """Mixin: refuse text that is not a plain ASCII number before click converts it."""

    name: str

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Refuse a non-plain number with click's usage error, else convert as click does."""
        if isinstance(value, str) and not number_text(value):
            kind = "an integer" if "integer" in self.name else "a number"
            odd = not value.isascii() or "_" in value
            self.fail(f"{value!r} is not {kind}" + (" (ASCII digits only)" if odd else ""), param, ctx)  # type: ignore[attr-defined]
        return super().convert(value, param, ctx)  # type: ignore[misc]


class PlainInt(_PlainNumber, click.types.IntParamType):
    """An integer flag (``type=INT``)."""


class PlainFloat(_PlainNumber, click.types.FloatParamType):
    """A number flag (``type=FLOAT``)."""


class IntRange(_PlainNumber, click.IntRange):
    """``click.IntRange`` over plain integers."""


class FloatRange(_PlainNumber, click.FloatRange):
    """``click.FloatRange`` over plain numbers."""


INT = PlainInt()
FLOAT = PlainFloat()
