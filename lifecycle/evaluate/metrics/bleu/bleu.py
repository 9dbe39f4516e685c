"""Corpus BLEU as a local `evaluate` module, wrapping ``sacrebleu`` (no hub download).

The score is sacrebleu's, on its 0..100 scale, with one reference per prediction.
"""

import evaluate
import sacrebleu

from lifecycle.evaluate.metric_info import STRING_PAIRS, metric_info

_DESCRIPTION = "Corpus BLEU (sacrebleu, 0..100) between predictions and one reference each."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings (one per prediction).
    tokenize: sacrebleu tokenizer (default "13a").
    smooth_method: sacrebleu smoothing (default "exp").
    lowercase: lowercase before scoring (default False).
Returns:
    bleu (0..100), precisions (n-gram precisions, 0..100), brevity_penalty, sys_len, ref_len.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Bleu(evaluate.Metric):
    """sacrebleu corpus BLEU."""

    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS, STRING_PAIRS,
                           citation="Post, M. (2018). A Call for Clarity in Reporting BLEU Scores.",
                           codebase_urls=["https://github.com/mjpost/sacrebleu"])

    def _compute(self, predictions, references, tokenize="13a", smooth_method="exp", lowercase=False):
        result = sacrebleu.corpus_bleu(
            list(predictions), [list(references)], tokenize=tokenize, smooth_method=smooth_method,
            lowercase=lowercase,
        )
        return {
            "bleu": float(result.score),
            "precisions": [float(p) for p in result.precisions],
            "brevity_penalty": float(result.bp),
            "sys_len": int(result.sys_len),
            "ref_len": int(result.ref_len),
        }
