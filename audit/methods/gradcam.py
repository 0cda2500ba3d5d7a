"""Grad-CAM (Selvaraju et al. 2017): gradient-weighted class activation maps.

Our own implementation rather than captum's ``LayerGradCam``: captum runs the forward
with a full autograd graph (the parameters require grad) and differentiates down to
the layer. Here nothing before the layer requires grad, so the forward up to the layer
builds no graph and saves no activations; a single forward hook swaps the layer's
output for a leaf that requires grad, and ``torch.autograd.grad(score, activation)``
runs the backward only through the layers after it. The maps equal captum's (tested);
measured on ResNet-18 (CPU, batch 8 at 224) the time is on par with captum's
(about 0.47x against 0.49x of one forward+backward), with less memory held.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from audit._model import AttributionError, default_layer, resolve_layer
from audit.methods._common import TargetLike, Targets, map_chunks, target_scores
from audit.methods.registry import register

__all__ = ["gradcam"]


# model -> {input shape without the batch: default layer name}. Finding the default
# layer costs a forward pass (~17 % of a Grad-CAM call on ResNet-18); weak keys keep
# no model alive.
_DEFAULT_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def _default_layer(model: nn.Module, inputs: torch.Tensor) -> tuple[str, nn.Module]:
    known = _DEFAULT_LAYERS.setdefault(model, {})
    key = tuple(inputs.shape[1:])
    if key not in known:
        known[key] = default_layer(model, inputs)[0]
    return resolve_layer(model, known[key])


class _Capture:
    """What the hook saw: the layer's activation as a leaf tensor that requires grad."""

    def __init__(self) -> None:
        self.activation: torch.Tensor | None = None
        self.calls = 0


@contextmanager
def _leaf_activation(module: nn.Module) -> Iterator[_Capture]:
    """Replace ``module``'s output by a grad-requiring leaf for one forward; remove the hook after."""
    cap = _Capture()

    def hook(_m: nn.Module, _inp: tuple, out: object) -> torch.Tensor:
        cap.calls += 1
        if not isinstance(out, torch.Tensor):
            raise AttributionError(
                f"Grad-CAM needs a layer that outputs one tensor; this layer returns {type(out).__name__}"
            )
        leaf = out.detach().requires_grad_(True)
        cap.activation = leaf
        # a clone, so that later in-place ops (e.g. `out += identity`) act on a
        # non-leaf and the captured activation keeps its values
        return leaf.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


@register("gradcam")
def gradcam(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    layer: str | nn.Module | None = None,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Grad-CAM maps, upsampled bilinearly to the input size.

    Channel weights are the spatial mean of d(target logit)/d(activation); the map is
    ReLU of the weighted channel sum, then bilinear upsampling (``align_corners=False``).

    Args:
        model: the classifier (eval mode, managed by ``explain``).
        inputs: ``[N, C, H, W]`` on the model's device.
        target: class indices or None (argmax).
        layer: module name (``"layer4"``) or module; default: the last module with a
            spatial output (``layer4`` on torchvision ResNets, ``features`` on SmallCNN),
            found once per model and input shape.
        max_batch: chunk the batch to bound memory.

    Returns:
        Non-negative maps ``[N, 1, H, W]``.
    """
    name, module = _default_layer(model, inputs) if layer is None else resolve_layer(model, layer)

    def one(x: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
        with _leaf_activation(module) as cap:
            logits = model(x)
        if cap.calls != 1 or cap.activation is None:
            raise AttributionError(
                f"layer '{name}' ran {cap.calls} times in one forward pass; Grad-CAM needs a layer "
                "that runs exactly once (pick its parent block or another layer)"
            )
        act = cap.activation
        if act.ndim != 4:
            raise AttributionError(
                f"Grad-CAM needs a spatial map [N, C, h, w] from the layer; '{name}' outputs "
                f"shape {tuple(act.shape)} (pick a convolutional layer or block)"
            )
        score, _ = target_scores(logits, targets, rows)
        (grad,) = torch.autograd.grad(score, act, allow_unused=True)
        if grad is None:
            raise AttributionError(
                f"the logits do not depend on layer '{name}'; pick a layer on the path to the output"
            )
        with torch.no_grad():
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * act).sum(dim=1, keepdim=True))
            return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return map_chunks(inputs, target, max_batch, one)
