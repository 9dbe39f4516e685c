"""lifecycle: the whole life of a causal language model on top of MLflow.

Stages (each an MLflow run, a ``lifecycle`` command and an MLproject entry point):
``lifecycle.data`` (prepare), ``lifecycle.train``, ``lifecycle.evaluate``, ``lifecycle.registry``
with ``lifecycle.policies``, ``lifecycle.serving`` and ``lifecycle.monitoring``.
Importing the package has no side effects.
"""

__version__ = "0.1.0"
