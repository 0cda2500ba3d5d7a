"""Readers of model files, one module per source, used by :mod:`audit.gate.loading`.

* :mod:`audit.loaders.pt2`: MLflow's default ``pt2`` format (``torch.export``), vetted so
  that nothing in the archive is unpickled, compiled or executed, then unflattened so that
  layer hooks work.
* :mod:`audit.loaders.weights`: ``*.safetensors`` weights (header checked before
  anything is allocated) and ``torch.save`` state_dicts read with ``weights_only=True``.
* :mod:`audit.loaders.timm`: ``model=timm``, a registered timm architecture built by
  ``timm.create_model`` with nothing downloaded, its weights from a file.
* :mod:`audit.loaders.huggingface`: Hugging Face ``transformers`` image classifiers (a
  ``save_pretrained`` folder or an MLflow ``transformers`` model), safetensors only,
  transformers' own classes only, wrapped to return logits.

:class:`ModelLoadError` lives here so that the readers and :mod:`audit.gate.loading` share it
without importing each other.
"""

from __future__ import annotations

from audit.errors import AuditError

__all__ = ["ModelLoadError"]


class ModelLoadError(AuditError, ValueError):
    """The model cannot be loaded; the message names the problem and the fix."""
