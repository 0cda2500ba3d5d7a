"""The gate: the ``model-audit`` command, the audit job and its MLflow run, registry writes,
model loading, ``serve`` and ``verify``."""
