"""Exact match as a local `evaluate` module: the fraction of predictions equal to their reference.

Whitespace is normalised (runs collapse to one space, ends stripped) because a generation that
differs only in a trailing newline is the same answer; case and punctuation count unless asked.
"""

import re

import evaluate

from lifecycle.evaluate.metric_info import STRING_PAIRS, metric_info

_DESCRIPTION = "Fraction of predictions that equal their reference after whitespace normalisation."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings (one per prediction).
    ignore_case: compare case-insensitively (default False).
Returns:
    exact_match: float in [0, 1] (0.0 for empty inputs).
"""

_SPACE = re.compile(r"\s+")


def _norm(text, ignore_case):
    text = _SPACE.sub(" ", text).strip()
    return text.lower() if ignore_case else text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    """Exact string match rate."""

    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS, STRING_PAIRS)

    def _compute(self, predictions, references, ignore_case=False):
        pairs = list(zip(predictions, references))
        if not pairs:
            return {"exact_match": 0.0}
        hits = sum(_norm(p, ignore_case) == _norm(r, ignore_case) for p, r in pairs)
        return {"exact_match": hits / len(pairs)}
