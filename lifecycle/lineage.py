"""MLflow 3 lineage: the data a run used as a dataset input, and metrics linked to the logged model they measure.

The prepared data is logged as an input of the training and evaluation runs
(``mlflow.log_input(dataset, context="training"|"evaluation")``). The dataset is a ``MetaDataset``:
a name, a source URI and a digest, no copy of the rows. Its digest is the data card's content digest,
cut to the 36 characters MLflow's stores hold; the full sha256 rides along as an input tag, so the
MLflow UI and ``lifecycle``'s own lineage tags name the same data.

Evaluation metrics are logged with the evaluated model's logged-model id and this dataset
(``mlflow.log_metrics(..., model_id=..., dataset=...)``), so they show on the model's own page.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: MLflow keeps at most this many characters of a dataset digest (sqlalchemy store: String(36)).
DIGEST_CHARS = 36
#: Input tag carrying the whole data card digest.
TAG_FULL_DIGEST = "lifecycle.data_digest"
CONTEXT_TRAINING = "training"
CONTEXT_EVALUATION = "evaluation"


def _source(uri: str) -> Any:
    """A dataset source for a local path or an artifact URI (``runs:/`` resolved to where it is stored)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from lifecycle.tracking import mask_secrets

    text = os.fspath(uri)
    if text.startswith("runs:/"):
        from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

        text = RunsArtifactRepository.get_underlying_uri(text)
    elif "://" not in text and not text.startswith("models:/"):
        text = str(Path(text).expanduser().resolve())
    # A URI may carry user:password@ (a database or object store): the source shows only the masked form.
    text = mask_secrets(text)
    try:
        return resolve_dataset_source(text)
    except Exception:  # noqa: BLE001 - a scheme MLflow has no dataset source for: name it in a tag instead
        return CodeDatasetSource(tags={"uri": text})


def data_dataset(uri: str, digest: str, *, name: str | None = None) -> Any:
    """The data at ``uri`` (content digest ``digest``) as an MLflow dataset, without reading it."""
    from mlflow.data.meta_dataset import MetaDataset

    label = name or Path(os.fspath(uri).rstrip("/")).name or "data"
    return MetaDataset(source=_source(uri), name=label, digest=digest[:DIGEST_CHARS])


def log_data_input(uri: str, digest: str, *, context: str, name: str | None = None,
                   split: str | None = None) -> Any:
    """Log the data as an input of the active run in ``context``; returns the dataset (for metrics)."""
    import mlflow

    dataset = data_dataset(uri, digest, name=name)
    tags = {TAG_FULL_DIGEST: digest, **({"lifecycle.split": split} if split else {})}
    mlflow.log_input(dataset, context=context, tags=tags)
    return dataset
