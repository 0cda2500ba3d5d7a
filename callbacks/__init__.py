"""Lightning callbacks that audit a model while it trains and log the evidence to MLflow.

>>> from audit.callbacks import AttributionCallback, ActivationMaximizationCallback, SpuriousFeatureCallback

They are thin: scheduling, rank handling and logging. The work is done by
:mod:`audit.evidence` (the engine the audit job uses too), the pictures by
:mod:`audit.report.pictures`, and the MLflow I/O by :mod:`audit.gate.tracking`. They never change
the training they watch, and their failures never stop it (they warn instead).

``MLflowSaveConfig`` (:mod:`audit.callbacks.cli`) is LightningCLI's
``save_config_callback`` for an ``MLFlowLogger``: the config lands in the logger's run.
"""

from audit.callbacks._base import AuditCallback, AuditWarning
from audit.callbacks.actmax import ActivationMaximizationCallback
from audit.callbacks.attribution import AttributionCallback
from audit.callbacks.dissection import DissectionCallback
from audit.callbacks.spurious import MONITORS, SpuriousFeatureCallback

__all__ = [
    "AttributionCallback",
    "ActivationMaximizationCallback",
    "DissectionCallback",
    "SpuriousFeatureCallback",
    "AuditCallback",
    "AuditWarning",
    "MONITORS",
    "MLflowSaveConfig",
]


def __getattr__(name: str):
    """``MLflowSaveConfig`` on first use: its module imports Lightning's CLI (and jsonargparse)."""
    if name == "MLflowSaveConfig":
        from audit.callbacks.cli import MLflowSaveConfig

        return MLflowSaveConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
