"""Evaluation: loss, perplexity, bits-per-byte, generation metrics, latency, behavioural checks,
and champion-against-challenger comparisons, recorded in one MLflow run and as tags on the
registered model version (the contract with the promotion policies).

Modules: :mod:`~lifecycle.evaluate.config` (``EvalConfig``), :mod:`~lifecycle.evaluate.dataset`,
:mod:`~lifecycle.evaluate.loss`, :mod:`~lifecycle.evaluate.generation` (prompt sets and the local
``evaluate`` metric modules under ``metrics/``), :mod:`~lifecycle.evaluate.latency`,
:mod:`~lifecycle.evaluate.checks`, :mod:`~lifecycle.evaluate.compare`,
:mod:`~lifecycle.evaluate.results` (version tags), :mod:`~lifecycle.evaluate.run` (orchestration).
Importing the package imports nothing heavy.
"""
