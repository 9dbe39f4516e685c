"""The one ``MetricInfo`` builder for the local `evaluate` modules under ``metrics/``.

Those scripts are copied and imported by ``evaluate.load(<path>)``, so they cannot import a
sibling file; they import this module from the installed ``lifecycle`` package instead, which
keeps the four ``_info()`` methods from drifting apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import datasets
import evaluate

# Most generation metrics compare one generated string with one reference string.
STRING_PAIRS: Mapping[str, str] = {"predictions": "string", "references": "string"}


def metric_info(description: str, inputs: str, features: Mapping[str, str], citation: str = "",
                codebase_urls: Sequence[str] = ()) -> evaluate.MetricInfo:
    """An ``evaluate.MetricInfo`` whose features map each input column to a ``datasets.Value`` dtype."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs,
        features=datasets.Features({name: datasets.Value(dtype) for name, dtype in features.items()}),
        codebase_urls=list(codebase_urls),
    )
