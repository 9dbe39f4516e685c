"""The model registry on top of MLflow: promotion under policies, rollback, ledger, lock, UI guard.

Aliases ``staging`` and ``production`` are the truth; legacy stages are mirrored. Every change
(and every refusal) is an append-only ledger event stored in the same MLflow backend, written
under a per-model lock that works through the REST API alone.
"""

TARGETS = ("staging", "production")
