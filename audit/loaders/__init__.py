"""Readers of model files, one module per source, used by :mod:`audit.gate.loading`.

* :mod:`audit.loaders.pt2`: MLflow's default ``pt2`` format (``torch.export``), vetted so
  that nothing in the archive is unpickled, compiled or executed, then unflattened so that
  layer hooks work.
* :mod:`audit.loaders.safetensors`: ``*.safetensors`` weights, header checked before
  anything is allocated.

:class:`ModelLoadError` lives here so that the readers and :mod:`audit.gate.loading` share it
without importing each other.
"""

from __future__ import annotations

__all__ = ["ModelLoadError"]


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message names the problem and the fix."""
