"""Modified-ReLU gradients: DeconvNet, guided backpropagation and Guided Grad-CAM.

* ``deconvnet`` (Zeiler & Fergus 2014): the backward pass through every ReLU keeps
  only the positive part of the gradient arriving from above, ignoring where the
  forward ReLU was active: ``grad_in = relu(grad_out)``. Max-pooling routes the
  gradient to the forward maximum (the "switches"), as the plain gradient does.
* ``guided_backprop`` (Springenberg et al. 2015): both masks at every ReLU, the
  forward one and the positive gradient: ``grad_in = relu(grad_out) * (out > 0)``.
* ``guided_gradcam`` (Selvaraju et al. 2017): the guided-backprop map times the
  Grad-CAM map of :mod:`audit.methods.gradcam` (same ``layer`` option, bilinear
  upsampling), pixel by pixel.

Channel reduction: guided backprop and deconvnet take the **max over channels of
the absolute value**, like ``saliency`` (Simonyan et al. 2014): the three are the
same gradient but for the ReLU rule, so their maps compare like for like (the
randomization figure of ``python -m audit.bench.adebayo`` puts them side by side).
The sign of an input gradient says which colour channel pushes which way, not where
the evidence is. Guided Grad-CAM multiplies that map by the non-negative Grad-CAM
map; since ``cam >= 0``, this equals the max over channels of ``|gbp_c * cam|``
(captum's order: multiply per channel, then reduce).

The rule is applied to **ReLU calls, not ReLU modules**: while the model runs
forward, a :class:`torch.overrides.TorchFunctionMode` replaces every ``relu`` /
``relu_`` call (``nn.ReLU``, in place or not, ``F.relu``, ``torch.relu``,
``Tensor.relu``) by an autograd function with the modified backward. Our own few
lines rather than captum's ``GuidedBackprop``/``Deconvolution``/``GuidedGradCam``,
which hook ``nn.ReLU`` modules:

* a functional ReLU (``F.relu(x)`` in ``forward``) is not hooked by captum, so its
  backward stays the plain gradient, silently (tested: the maps differ from the rule);
* a model without any ReLU gets plain gradients from captum, silently (it hooks
  nothing else);
* captum's hooks sit on the ReLU's *input tensor*, so a pre-activation that is also
  used elsewhere (``relu(h) + h``) gets the rule applied to the sum of both paths'
  gradients (tested: ours follows the rule per call);
* captum clones the input of every ReLU (its pre-hook), one extra activation copy
  per ReLU call.

On plain ``nn.ReLU`` networks, the torchvision ResNets included (``ReLU(inplace=True)``
and one module called twice per block), the maps equal captum's (tested).

Models the rule applies to: networks whose nonlinearities are ReLUs (torchvision
ResNets, VGG, AlexNet, the project's ``SmallCNN``); max-pooling, average pooling,
BatchNorm, dropout and linear layers are fine. Refused with an
:class:`~audit.engine.model.AttributionError`: a model whose forward pass applies no ReLU
(vision transformers and ConvNeXt use GELU), or applies another elementwise
activation too (GELU, SiLU, Hardswish, LeakyReLU, ELU, ReLU6, ...): the paper's
rule is defined on ReLU, and passing the plain gradient through the other
activations would silently mix plain and guided gradients. Gates such as
sigmoid/tanh/softmax (attention, squeeze-excitation) are not counted as activations.
A ReLU written without a relu call (``x.clamp(min=0)``, ``x * (x > 0)``) is not
seen and keeps its plain gradient; so is one inside TorchScript, which Python's
function modes do not reach (a scripted model is refused as having no ReLU).

Cost: as a multiple of one plain forward+backward to the input (torchvision's
ResNet-18, random weights, batch 8, this project's 2-core CPU with one thread, the
process's CPU time because three other jobs shared the cores; medians of 9 rounds at
64 px, 5 at 224 px, measured once with a throwaway script): guided backprop 1.07x /
1.06x, deconvnet 1.07x / 1.01x, Guided Grad-CAM 1.45x / 1.69x (one guided pass plus
Grad-CAM's, 0.49x / 0.50x); saliency 1.00x / 1.07x in the same rounds. captum on the
same rounds: ``GuidedBackprop`` 1.09x / 1.13x, ``Deconvolution`` 0.97x / 1.10x,
``GuidedGradCam`` (bilinear, ``layer4``) 1.57x / 1.64x: the same work, on par. The
formal rows against captum are in ``python -m audit.bench methods``.

Memory: ``max_batch=None`` (the default) chunks the batch by the memory budget
(``explain``'s ``memory_budget``, see :func:`audit.methods._common.rows_per_pass`);
an explicit ``max_batch`` wins. The maps do not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from audit.engine.model import AttributionError
from audit.methods._common import TargetLike, Targets, map_chunks, rows_per_pass, target_scores
from audit.methods.gradcam import gradcam
from audit.methods.registry import register

__all__ = ["deconvnet", "guided_backprop", "guided_gradcam"]

#: names of the relu calls the rule replaces (F.relu, torch.relu, Tensor.relu and their _ forms)
_RELU = frozenset({"relu", "relu_"})
#: elementwise activations the rule is not defined on: a model calling one is refused
_OTHER = frozenset(
    {
        "gelu",
        "silu",
        "silu_",
        "mish",
        "hardswish",
        "hardswish_",
        "elu",
        "elu_",
        "selu",
        "selu_",
        "celu",
        "celu_",
        "leaky_relu",
        "leaky_relu_",
        "prelu",
        "rrelu",
        "rrelu_",
        "softplus",
        "relu6",
        "hardtanh",
        "hardtanh_",
        "glu",
        "logsigmoid",
        "softsign",
        "tanhshrink",
        "hardshrink",
        "softshrink",
        "threshold",
        "threshold_",
    }
)


def _backward_rule(rule: str, grad: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if rule == "deconvnet":
        return grad.clamp(min=0)
    assert out is not None
    return grad.clamp(min=0) * (out > 0)


class _ModifiedReLU(torch.autograd.Function):
    """``relu(x)`` forward; the guided or deconvnet rule backward (out of place)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str) -> torch.Tensor:
        out = torch.relu(x)
        ctx.rule = rule
        if rule == "guided":
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = ctx.saved_tensors[0] if ctx.rule == "guided" else None
        return _backward_rule(ctx.rule, grad, out), None


class _ModifiedReLUInplace(torch.autograd.Function):
    """``x.relu_()`` forward (``x`` is modified and returned, as the model expects); the rule backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str) -> torch.Tensor:
        x.relu_()
        ctx.mark_dirty(x)
        ctx.rule = rule
        if rule == "guided":
            ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = ctx.saved_tensors[0] if ctx.rule == "guided" else None
        return _backward_rule(ctx.rule, grad, out), None


class _ReLURule(TorchFunctionMode):
    """While active: every relu call runs :class:`_ModifiedReLU`; other activations are counted.

    A mode rather than hooks on ``nn.ReLU`` modules: it sees functional ReLUs too, leaves
    nothing on the model (no hook to remove), and applies the rule per call, so a module
    called twice (torchvision's BasicBlock) gets it twice.
    """

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.relus = 0
        self.others: dict[str, None] = {}

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _RELU and args and isinstance(args[0], torch.Tensor):
            self.relus += 1
            x = args[0]
            if x.requires_grad:  # else no gradient passes here: the plain call does
                inplace = name == "relu_" or bool(kwargs.get("inplace", args[1:2] == (True,)))
                fn = _ModifiedReLUInplace if inplace else _ModifiedReLU
                return fn.apply(x, self.rule)
        elif name in _OTHER:
            self.others.setdefault(name, None)
        return func(*args, **kwargs)


_APPLIES = (
    "it applies to networks whose nonlinearities are ReLUs (torchvision ResNets, VGG, AlexNet, "
    "the project's SmallCNN); for other models use saliency, integrated_gradients, gradcam or lrp"
)


def _modified_gradient(
    model: nn.Module, x: torch.Tensor, targets: Targets, rows: slice, rule: str, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input gradient under ``rule`` ``[n, C, H, W]``, target indices ``[n]``) for one chunk."""
    x = x.detach().requires_grad_(True)
    mode = _ReLURule(rule)
    with mode:
        logits = model(x)
    if mode.others:
        others = ", ".join(sorted(mode.others))
        what = (
            f"applies {others} and no ReLU (vision transformers and ConvNeXt use GELU)"
            if mode.relus == 0
            else f"also applies {others}"
        )
        raise AttributionError(
            f"{method} is defined on ReLU networks, and this model {what} in its forward pass "
            f"(the rule would silently leave plain gradients there); {_APPLIES}"
        )
    if mode.relus == 0:
        raise AttributionError(
            f"{method} is defined on ReLU networks, and this model applies no ReLU in its forward "
            f"pass (vision transformers and ConvNeXt use GELU; TorchScript hides its calls), so it "
            f"would return the plain gradient; {_APPLIES}"
        )
    score, t = target_scores(logits, targets, rows)
    (grad,) = torch.autograd.grad(score, x)
    return grad, t


def _max_abs(grad: torch.Tensor) -> torch.Tensor:
    return grad.abs().amax(dim=1, keepdim=True)


def _run(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike,
    max_batch: int | None,
    rule: str,
    method: str,
) -> torch.Tensor:
    def one(x: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
        grad, _ = _modified_gradient(model, x, targets, rows, rule, method)
        return _max_abs(grad)

    return map_chunks(inputs, target, rows_per_pass(model, inputs, max_batch), one)


@register("guided_backprop")
def guided_backprop(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015): max over channels of ``|guided gradient|``.

    At every ReLU call the backward pass keeps a gradient only where the forward
    output was positive *and* the gradient from above is positive. Refused (an
    :class:`AttributionError`) for a model that applies no ReLU or another
    elementwise activation (see the module docstring).

    Args:
        model: the classifier (a ReLU network).
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax).
        max_batch: at most this many images per forward+backward pass; None: as many
            as the memory budget allows (``explain``'s ``memory_budget``).

    Returns:
        Non-negative maps ``[N, 1, H, W]``.
    """
    return _run(model, inputs, target, max_batch, "guided", "guided_backprop")


@register("deconvnet")
def deconvnet(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    max_batch: int | None = None,
) -> torch.Tensor:
    """DeconvNet (Zeiler & Fergus 2014) as a modified gradient: max over channels of ``|signal|``.

    At every ReLU call the backward pass keeps the positive part of the gradient from
    above, whatever the forward ReLU did. Refused for a model that applies no ReLU or
    another elementwise activation (see the module docstring).

    Args:
        model: the classifier (a ReLU network).
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax).
        max_batch: at most this many images per forward+backward pass; None: as many
            as the memory budget allows (``explain``'s ``memory_budget``).

    Returns:
        Non-negative maps ``[N, 1, H, W]``.
    """
    return _run(model, inputs, target, max_batch, "deconvnet", "deconvnet")


@register("guided_gradcam")
def guided_gradcam(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    layer: str | nn.Module | None = None,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): the guided-backprop map times the Grad-CAM map.

    Both are computed for the same target (the argmax of the same forward pass when
    ``target`` is None): ``guided_backprop(x) * gradcam(x, layer=layer)`` pixel by
    pixel, Grad-CAM upsampled bilinearly as :func:`audit.methods.gradcam.gradcam`
    does. Two forward+backward passes per chunk (guided, then plain to the layer).

    Args:
        model: the classifier (a ReLU network).
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax).
        layer: Grad-CAM's layer (module name or module); default: Grad-CAM's default
            (``layer4`` on torchvision ResNets, ``features`` on SmallCNN).
        max_batch: at most this many images per pass; None: as many as the memory
            budget allows (``explain``'s ``memory_budget``).

    Returns:
        Non-negative maps ``[N, 1, H, W]``.
    """
    limit = rows_per_pass(model, inputs, max_batch)

    def one(x: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
        grad, t = _modified_gradient(model, x, targets, rows, "guided", "guided_gradcam")
        cam = gradcam(model, x, t, layer=layer, max_batch=x.shape[0])
        return _max_abs(grad) * cam

    return map_chunks(inputs, target, limit, one)
