"""Training the benchmark models: Lightning modules, the ``train`` entry point, the demo and validation.

``audit.training.Classifier`` is the default ``model.module`` of checkpoint audits.
"""

from audit.training.modules import Classifier, ProbeDataModule, SnowWolfDataModule, build_net

__all__ = ["Classifier", "SnowWolfDataModule", "ProbeDataModule", "build_net"]
