"""Data preparation: sources, cleaning, quality filters, dedup, PII scrubbing, split, tokenizer, packing.

Modules are small and pure (no MLflow) except :mod:`lifecycle.data.prepare`, which records the
MLflow run. Importing this package imports nothing heavy.
"""
