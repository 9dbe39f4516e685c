"""Monitoring: service, drift and quality metrics from inference records, and a verdict.

* :mod:`~lifecycle.monitoring.records` reads the inference-record JSONL of the serving stage and
  selects a time window of one model version;
* :mod:`~lifecycle.monitoring.drift` holds the pure statistics (PSI, KS, Jensen-Shannon, total
  variation); :mod:`~lifecycle.monitoring.service` the request/latency/token figures;
* :mod:`~lifecycle.monitoring.reference` builds the reference distributions from prepared data;
* :mod:`~lifecycle.monitoring.verdict` turns metrics and the policy's thresholds into
  ``ok`` / ``warn`` / ``retrain``;
* :mod:`~lifecycle.monitoring.run` orchestrates one ``lifecycle monitor`` MLflow run.

Nothing is imported here so that the pure modules stay cheap to import.
"""
