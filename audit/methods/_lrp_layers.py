"""Which layers LRP can explain, and how BatchNorm layers pair with the layer before them.

LRP is only meaningful when every layer with a learned effect has a rule. This module
walks the model once and refuses, with the layer's name and type, anything it cannot
account for (LayerNorm, attention, unknown modules with parameters, ...), instead of
returning silent garbage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from zennit.layer import Sum

from audit._model import AttributionError

__all__ = ["LayerPlan", "inspect_layers", "LINEAR", "BATCHNORM"]

LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# f(x) = f'(x) x: the gradient passes relevance unchanged, like zennit's Pass rule
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
# zennit passes relevance through these unchanged (its Pass rule); the fast backend
# would differentiate them instead, so they need backend="zennit"
SMOOTH_ACTIVATIONS = (
    nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.LogSigmoid,
)  # fmt: skip
AVGPOOL = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
MAXPOOL = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
# no parameters and linear without bias: the gradient routes relevance conservatively
ROUTING = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, Sum,
)  # fmt: skip
_WITH_PARAMS = LINEAR + BATCHNORM + (nn.PReLU,)


@dataclass
class LayerPlan:
    """The model's layers as LRP sees them.

    Attributes:
        linears: ``(name, module)`` of conv/linear layers in registration order.
        merged: BatchNorm -> the linear layer right before it (merged into it).
        unmerged: names of BatchNorm layers that follow no linear layer (zennit
            passes relevance through them unchanged).
        avgpools: average-pooling modules (zennit's Norm rule).
        fast_blockers: why the fast backend cannot run this model (empty if it can).
        zennit_blockers: why the zennit backend cannot run this model.
    """

    linears: list[tuple[str, nn.Module]] = field(default_factory=list)
    merged: dict[nn.Module, nn.Module] = field(default_factory=dict)
    unmerged: list[str] = field(default_factory=list)
    avgpools: list[nn.Module] = field(default_factory=list)
    fast_blockers: list[str] = field(default_factory=list)
    zennit_blockers: list[str] = field(default_factory=list)


def _unsupported(name: str, module: nn.Module, why: str) -> AttributionError:
    return AttributionError(
        f"LRP cannot explain layer '{name}' ({type(module).__name__}): {why}. Supported layers: "
        "Conv1d/2d/3d, Linear, BatchNorm right after a conv/linear, ReLU-like activations, "
        "pooling, Flatten/Identity/Dropout. Fix: use another method (gradcam, saliency, "
        "integrated_gradients) for this model, or, for a parameter-free layer that only moves "
        "values around, pass passthrough=(YourLayer,)"
    )


def inspect_layers(model: nn.Module, passthrough: tuple[type, ...] = ()) -> LayerPlan:
    """Check every module of ``model`` and pair BatchNorms with their linear layer.

    Args:
        model: the network (inside any ``Normalized`` wrapper).
        passthrough: extra parameter-free leaf types whose gradient routes relevance
            (declared by the user).

    Returns:
        The :class:`LayerPlan`.

    Raises:
        AttributionError: naming the first layer LRP cannot account for.
    """
    if not isinstance(passthrough, tuple) or not all(isinstance(t, type) for t in passthrough):
        raise AttributionError(
            f"passthrough must be a tuple of module classes; got {passthrough!r}"
        )
    plan = LayerPlan()
    previous: nn.Module | None = None
    for name, m in model.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if own and not isinstance(m, _WITH_PARAMS):
            raise _unsupported(
                name, m, f"it has parameters ({', '.join(own)}) that no LRP rule accounts for"
            )
        if any(True for _ in m.children()):
            continue
        if isinstance(m, LINEAR):
            plan.linears.append((name, m))
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and (
                m.padding_mode != "zeros" or m.padding == "same"
            ):
                plan.fast_blockers.append(
                    f"'{name}' uses padding={m.padding!r}, padding_mode={m.padding_mode!r}"
                )
        elif isinstance(m, BATCHNORM):
            if m.running_mean is None or m.running_var is None:
                raise _unsupported(
                    name, m, "it keeps no running statistics (track_running_stats=False)"
                )
            if not m.affine:
                plan.zennit_blockers.append(f"'{name}' has no affine parameters")
            if isinstance(previous, LINEAR):
                plan.merged[m] = previous
            else:
                plan.unmerged.append(name)
                plan.fast_blockers.append(f"BatchNorm '{name}' does not follow a conv/linear layer")
        elif isinstance(m, SMOOTH_ACTIVATIONS):
            plan.fast_blockers.append(
                f"'{name}' ({type(m).__name__}) is not positively homogeneous"
            )
        elif isinstance(m, AVGPOOL):
            plan.avgpools.append(m)
        elif not isinstance(m, HOMOGENEOUS + MAXPOOL + ROUTING + passthrough):
            raise _unsupported(name, m, "no LRP rule is known for this layer type")
        previous = m
    if not plan.linears:
        raise AttributionError("LRP needs at least one Conv or Linear layer; the model has none")
    return plan
