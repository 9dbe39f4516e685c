"""Quality filters in the spirit of Gopher (Rae et al. 2021) and C4, safe for CJK text.

Each filter is a named check; :func:`first_failure` returns the name of the first one a
document fails, so the data card can say which filter dropped how much. Words are runs of
non-space characters, except that every CJK/kana/hangul character counts as a word of its own:
Chinese and Japanese have no spaces, and counting a whole sentence as one 40-character "word"
would fail the word-length and word-count rules for reasons that have nothing to do with quality.

``quality.rules`` names the set of checks that run (:data:`RULE_SETS`): ``web`` is every check,
as Gopher and C4 apply them to whole web pages; ``clean`` keeps only the checks that catch real
garbage in curated text (books, dialogue, docs), where a short paragraph is not a sign of a bad
page; ``off`` runs none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from lifecycle.data.config import QualityConfig

_CJK_RANGES = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\uac00-\ud7af"  # hangul syllables
    "\U00020000-\U0002ffff"
)
_CJK_CHAR = re.compile(f"[{_CJK_RANGES}]")
# A word: one CJK character, or a run of characters that are neither space nor CJK.
WORD = re.compile(f"[{_CJK_RANGES}]|[^\\s{_CJK_RANGES}]+")

# A markdown heading marker ("## ") at the start of a line: structure, not a symbol of spam.
_HEADING_MARK = re.compile(r"^#{1,6}(?= )", re.MULTILINE)
# A whitespace-delimited run with no letter in it ([^\W\d_] is "a letter" in Python's re).
_NO_ALPHA_WORD = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)")
# Deletes ASCII letters and whitespace: what is left bounds the number of letterless words.
_LETTERS_AND_SPACE = str.maketrans(dict.fromkeys(
    [c for c in map(chr, range(128)) if c.isalpha() or c.isspace()]))

FILTER_NAMES = (
    "empty",
    "min_words",
    "max_words",
    "mean_word_length",
    "symbol_word_ratio",
    "ellipsis_lines",
    "duplicate_lines",
    "duplicate_paragraphs",
    "alpha_words",
)


@dataclass
class DocStats:
    """What the filters look at, computed once per document."""

    #: number of words, and their total length in characters (a CJK character is a word).
    n_words: int
    word_chars: int
    cjk_chars: int
    lines: list[str]
    paragraphs: list[str]


def words_of(text: str) -> list[str]:
    """Split ``text`` into words, one per CJK character (see module docstring)."""
    return WORD.findall(text)


# ASCII whitespace (Python's: \x1c-\x1f included) to " ", every other ASCII character to "x": the
# words of an ASCII text are then the runs of "x", countable without making a string per word.
_WORD_SHAPE = str.maketrans({c: " " if c.isspace() else "x" for c in map(chr, range(128))})


def doc_stats(text: str) -> DocStats:
    """Compute the statistics the filters need."""
    if text.isascii():
        shape = text.translate(_WORD_SHAPE)
        n_words = shape.count(" x") + shape.startswith("x")
        word_chars, cjk = shape.count("x"), 0
    elif _CJK_CHAR.search(text) is None:
        # Without CJK a word is a whitespace-delimited run, and str.split() uses the same
        # Unicode whitespace as the regex's \s: the same words at C speed.
        words = text.split()
        n_words, word_chars, cjk = len(words), sum(map(len, words)), 0
    else:
        words = words_of(text)
        n_words, word_chars, cjk = len(words), sum(map(len, words)), len(_CJK_CHAR.findall(text))
    lines = [ln for ln in map(str.strip, text.split("\n")) if ln]
    paragraphs = [p for p in map(str.strip, text.split("\n\n")) if p]
    return DocStats(n_words=n_words, word_chars=word_chars, cjk_chars=cjk, lines=lines, paragraphs=paragraphs)


def _dup_fraction(items: list[str]) -> float:
    if not items:
        return 0.0
    return 1.0 - len(set(items)) / len(items)


def _mean_word_length_ok(s: DocStats, c: QualityConfig) -> bool:
    # Only non-CJK words have a meaningful length; a mostly-CJK text skips the rule. Every CJK
    # character is a one-character word, so the non-CJK words are what is left after them.
    n_latin = s.n_words - s.cjk_chars
    if n_latin <= 0 or s.cjk_chars >= n_latin:
        return True
    mean = (s.word_chars - s.cjk_chars) / n_latin
    return c.min_mean_word_length <= mean <= c.max_mean_word_length


def _symbol_ratio_ok(s: DocStats, c: QualityConfig, text: str) -> bool:
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return symbols <= c.max_symbol_word_ratio * max(1, s.n_words)


def _clean_symbol_ratio_ok(s: DocStats, c: QualityConfig, text: str) -> bool:
    # Curated text: an ellipsis is punctuation (dialogue trails off), a heading marker is markup;
    # only the remaining '#' count. Short paragraphs get the allowance of a 10-word one, since one
    # stray '#' in a 3-word line is a ratio of 0.33 without being garbage.
    symbols = text.count("#")
    if symbols:
        symbols -= sum(len(m) for m in _HEADING_MARK.findall(text))
    return symbols <= c.max_symbol_word_ratio * max(10, s.n_words)


def _ellipsis_ok(s: DocStats, c: QualityConfig) -> bool:
    if not s.lines:
        return True
    ending = sum(1 for ln in s.lines if ln.endswith(("...", "\u2026")))
    return ending / len(s.lines) <= c.max_ellipsis_line_fraction


def _alpha_ok(s: DocStats, c: QualityConfig, text: str) -> bool:
    if not s.n_words:
        return False
    allowed = (1.0 - c.min_alpha_word_fraction) * s.n_words
    # Every letterless word holds at least one character that is neither a letter nor a space,
    # so in ASCII text their count is an upper bound: prose passes without counting words. The
    # bound must clear the limit by a whole word, so float rounding cannot decide differently.
    if text.isascii() and len(text.translate(_LETTERS_AND_SPACE)) + 1 <= allowed:
        return True
    # Words with no letter at all (numbers, symbol runs); CJK characters are letters.
    no_alpha = len(_NO_ALPHA_WORD.findall(text))
    return 1.0 - no_alpha / s.n_words >= c.min_alpha_word_fraction


_CHECKS: list[tuple[str, Callable[[DocStats, QualityConfig, str], bool]]] = [
    ("empty", lambda s, c, t: bool(t.strip())),
    ("min_words", lambda s, c, t: s.n_words >= c.min_words),
    ("max_words", lambda s, c, t: s.n_words <= c.max_words),
    ("mean_word_length", lambda s, c, t: _mean_word_length_ok(s, c)),
    ("symbol_word_ratio", lambda s, c, t: _symbol_ratio_ok(s, c, t)),
    ("ellipsis_lines", lambda s, c, t: _ellipsis_ok(s, c)),
    ("duplicate_lines", lambda s, c, t: _dup_fraction(s.lines) <= c.max_duplicate_line_fraction),
    ("duplicate_paragraphs", lambda s, c, t: _dup_fraction(s.paragraphs) <= c.max_duplicate_paragraph_fraction),
    ("alpha_words", lambda s, c, t: _alpha_ok(s, c, t)),
]


_CLEAN_CHECKS: list[tuple[str, Callable[[DocStats, QualityConfig, str], bool]]] = [
    ("symbol_word_ratio", lambda s, c, t: _clean_symbol_ratio_ok(s, c, t)),
    *[(name, check) for name, check in _CHECKS if name in ("duplicate_lines", "duplicate_paragraphs", "alpha_words")],
]

#: the checks each ``quality.rules`` value runs after "empty" (which always runs).
RULE_SETS: dict[str, list[tuple[str, Callable[[DocStats, QualityConfig, str], bool]]]] = {
    "web": _CHECKS[1:],
    "clean": _CLEAN_CHECKS,
    "off": [],
}


def first_failure(text: str, cfg: QualityConfig) -> str | None:
    """Name of the first quality filter ``text`` fails, or ``None`` when it passes them all.

    An empty text fails "empty" under every rule set: there is nothing to keep.
    """
    if not text.strip():
        return "empty"
    checks = RULE_SETS[cfg.rules]
    if not checks:
        return None
    stats = doc_stats(text)
    for name, check in checks:
        if not check(stats, cfg, text):
            return name
    return None
