"""ROUGE as a local `evaluate` module, wrapping Google's ``rouge_score`` (no hub download).

Scores are F-measures in [0, 1], averaged over the pairs (the same aggregation as the hub's
``rouge`` module without bootstrap aggregation).
"""

import evaluate
from rouge_score import rouge_scorer

from lifecycle.evaluate.metric_info import STRING_PAIRS, metric_info

_DESCRIPTION = "ROUGE-1/2/L/Lsum F-measures between predictions and references (rouge_score)."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings (one per prediction).
    rouge_types: which ROUGE types to compute (default rouge1, rouge2, rougeL, rougeLsum).
    use_stemmer: Porter-stem words before matching (default False).
    use_aggregator: average over pairs (default True); False returns one score per pair.
Returns:
    a dict with one float per ROUGE type (a list of floats when use_aggregator=False).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Rouge(evaluate.Metric):
    """ROUGE F-measures."""

    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS, STRING_PAIRS,
                           citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
                           codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"])

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True):
        rouge_types = list(rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"])
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        per_pair = {t: [] for t in rouge_types}
        for pred, ref in zip(predictions, references):
            scores = scorer.score(ref, pred)
            for t in rouge_types:
                per_pair[t].append(float(scores[t].fmeasure))
        if not use_aggregator:
            return per_pair
        return {t: (sum(v) / len(v) if v else 0.0) for t, v in per_pair.items()}
