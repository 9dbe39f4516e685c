"""Optimisation of registered models: hyperparameter search and compressed variants.

* :mod:`~lifecycle.optimize.space` reads and validates a search-space file;
* :mod:`~lifecycle.optimize.tune` runs the Optuna study (``lifecycle tune``): one nested MLflow
  run per trial, median pruning on the validation loss, the best trial registered;
* :mod:`~lifecycle.optimize.compress` makes an int8 or half-precision variant of a registered
  version, evaluates it beside its parent and registers it (``lifecycle compress``);
* :mod:`~lifecycle.optimize.plots` draws the study's and the trade-off's PNGs.

Nothing is imported here: importing the package stays cheap (no torch, no MLflow, no Optuna).
"""
