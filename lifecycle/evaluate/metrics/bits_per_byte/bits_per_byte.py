"""Bits per byte as a local `evaluate` module.

Inputs are, per document, the model's total negative log-likelihood in nats and the document's
UTF-8 byte count; the result is total bits over total bytes. Because it is normalised by bytes,
not tokens, models with different tokenizers can be compared on the same text.
"""

import math

import evaluate

from lifecycle.evaluate.metric_info import metric_info

_DESCRIPTION = "Total negative log-likelihood in bits divided by the UTF-8 byte count of the text."
_KWARGS = """
Args:
    nll: per-document total negative log-likelihood in nats (natural log).
    num_bytes: per-document UTF-8 byte counts.
Returns:
    bits_per_byte: sum(nll) / ln(2) / sum(num_bytes); total_bits; total_bytes.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class BitsPerByte(evaluate.Metric):
    """Tokenizer-independent language-modelling cost."""

    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS, {"nll": "float64", "num_bytes": "int64"},
                           citation="Gao et al. (2020). The Pile: An 800GB Dataset of Diverse Text "
                                    "for Language Modeling.")

    def _compute(self, nll, num_bytes):
        total_bytes = int(sum(num_bytes))
        if total_bytes <= 0:
            raise ValueError("bits_per_byte needs at least one byte of text")
        total_bits = float(sum(nll)) / math.log(2)
        return {"bits_per_byte": total_bits / total_bytes, "total_bits": total_bits, "total_bytes": total_bytes}
