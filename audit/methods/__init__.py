"""Explainers by name, and activation maximization.

>>> from audit.methods import explain, activation_maximization, METHODS
>>> maps = explain("gradcam", model, images, target=None, layer="layer4")   # [N, 1, H, W]

Registered methods: ``gradcam``, ``saliency``, ``input_x_gradient``,
``integrated_gradients``, ``lrp``. Add your own with :func:`register`.
"""

from audit._model import AttributionError
from audit.methods.registry import METHODS, explain, register

# importing the modules registers their methods
from audit.methods import gradcam as _gradcam  # noqa: E402,F401  isort: skip
from audit.methods import gradients as _gradients  # noqa: E402,F401  isort: skip
from audit.methods import lrp as _lrp  # noqa: E402,F401  isort: skip
from audit.methods.actmax import activation_maximization  # noqa: E402  isort: skip
from audit.methods.lrp import COMPOSITES  # noqa: E402  isort: skip

__all__ = ["explain", "activation_maximization", "METHODS", "register", "COMPOSITES", "AttributionError"]
