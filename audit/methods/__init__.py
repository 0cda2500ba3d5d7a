"""Explainers by name, and activation maximization.

>>> from audit.methods import explain, activation_maximization, METHODS
>>> maps = explain("gradcam", model, images, target=None, layer="layer4")   # [N, 1, H, W]

Registered methods: ``gradcam``, ``saliency``, ``input_x_gradient``,
``integrated_gradients``, ``lrp`` (composites in :data:`COMPOSITES`) and
``attention_rollout`` (vision transformers built on ``nn.MultiheadAttention``);
``guided_backprop``, ``deconvnet`` and ``guided_gradcam`` (ReLU networks);
``occlusion``, ``rise`` and ``lime`` (perturbations, forward passes only). Add
your own with :func:`register`.
"""

from audit.engine.model import AttributionError
from audit.methods import gradcam, gradients, guided, lrp, perturbation, rollout  # noqa: F401  importing registers the methods
from audit.methods._common import rows_per_pass
from audit.methods.actmax import activation_maximization
from audit.methods.lrp import COMPOSITES
from audit.methods.registry import METHODS, explain, register

__all__ = [
    "explain",
    "activation_maximization",
    "METHODS",
    "register",
    "COMPOSITES",
    "AttributionError",
    # the rows per forward/backward pass under engine.max_memory_mb: the concept and
    # dissection evidence size their own passes with it
    "rows_per_pass",
]
