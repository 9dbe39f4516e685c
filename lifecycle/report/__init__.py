"""``lifecycle report``: one self-contained HTML page with the whole life of a registered model.

Lineage (data runs -> training run -> version -> promotions and rollbacks), training curves,
evaluation of every version with champion vs challenger, each gate's result, the ledger as a
timeline, and the latest monitoring charts.

:mod:`~lifecycle.report.collect` reads the history from MLflow, :mod:`~lifecycle.report.render`
and :mod:`~lifecycle.report.charts` make the page, :mod:`~lifecycle.report.write` writes it
atomically and logs it as the artifact ``report/<name>.html`` of a ``report`` run.
"""
