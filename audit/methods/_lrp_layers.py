"""Which layers LRP can explain, and how BatchNorm layers pair with the layer before them.

LRP is only meaningful when every layer with a learned effect has a rule. This module
walks the model once and refuses, with the layer's name and type, anything it cannot
account for (LayerNorm, attention, unknown modules with parameters, ...), instead of
returning silent garbage.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from zennit.layer import Sum

from audit.engine.model import AttributionError

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
        conv_blockers: convs whose padding the fast and general backends cannot
            transpose (both need backend="zennit").
        general_only: layers only the general backend has rules for (LayerNorm,
            attention, squeeze-excitation, stochastic depth, class tokens, ...), as
            ``(name, module, why)``.
    """

    linears: list[tuple[str, nn.Module]] = field(default_factory=list)
    merged: dict[nn.Module, nn.Module] = field(default_factory=dict)
    unmerged: list[str] = field(default_factory=list)
    avgpools: list[nn.Module] = field(default_factory=list)
    fast_blockers: list[str] = field(default_factory=list)
    zennit_blockers: list[str] = field(default_factory=list)
    general_only: list[tuple[str, nn.Module, str]] = field(default_factory=list)
    conv_blockers: list[str] = field(default_factory=list)

    def refuse_general_only(self, backend: str) -> None:
        """Raise, naming the first layer that only the general backend can explain."""
        if self.general_only:
            name, module, why = self.general_only[0]
            raise _unsupported(name, module, why, backend)


def _unsupported(name: str, module: nn.Module, why: str, backend: str) -> AttributionError:
    return AttributionError(
        f"the {backend} LRP backend cannot explain layer '{name}' ({type(module).__name__}): {why}. "
        "It supports Conv1d/2d/3d, Linear, BatchNorm right after a conv/linear, ReLU-like "
        "activations, pooling, Flatten/Identity/Dropout. Fix: use backend='general' (or 'auto'), "
        "which has rules for modern blocks, or, for a parameter-free layer that only moves values "
        "around, pass passthrough=(YourLayer,)"
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
            plan.general_only.append(
                (name, m, f"it has parameters ({', '.join(own)}) that no layer rule accounts for")
            )
        if any(True for _ in m.children()):
            continue
        if isinstance(m, LINEAR):
            plan.linears.append((name, m))
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and (
                m.padding_mode != "zeros" or m.padding == "same"
            ):
                plan.conv_blockers.append(
                    f"'{name}' uses padding={m.padding!r}, padding_mode={m.padding_mode!r}"
                )
        elif isinstance(m, BATCHNORM):
            if m.running_mean is None or m.running_var is None:
                raise AttributionError(
                    f"LRP cannot explain layer '{name}' ({type(m).__name__}): it keeps no running "
                    "statistics (track_running_stats=False), so in eval it normalizes by each "
                    "batch's own statistics; use another method for this model"
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
        elif isinstance(m, nn.Sequential):
            pass  # an empty Sequential is the identity (ShuffleNet's stride-1 branch)
        elif not isinstance(m, HOMOGENEOUS + MAXPOOL + ROUTING + passthrough):
            plan.general_only.append((name, m, "no layer rule is known for this layer type"))
        previous = m
    if not plan.linears:
        raise AttributionError("LRP needs at least one Conv or Linear layer; the model has none")
    return plan


#: model -> (module count, {BatchNorm: the linear layer whose output it normalizes})
_PAIRS: weakref.WeakKeyDictionary[nn.Module, tuple[int, dict[nn.Module, nn.Module]]] = (
    weakref.WeakKeyDictionary()
)


def pair_batchnorms(model: nn.Module, plan: LayerPlan, example: torch.Tensor) -> dict[nn.Module, nn.Module]:
    """BatchNorm -> the conv/linear layer whose output it receives, seen in one forward pass.

    The fast backend pairs a BatchNorm with the layer registered before it, which is
    wrong where a BatchNorm normalizes something else: DenseNet's ``norm1`` reads the
    concatenation of all earlier features, not the conv registered before it. Here
    forward hooks record which layer produced each BatchNorm's input (by tensor
    identity), on one image, without gradients; cached per model.

    Args:
        model: the network (inside any ``Normalized`` wrapper).
        plan: its layers.
        example: one input batch (only its first row is used).
    """
    count = sum(1 for _ in model.modules())
    hit = _PAIRS.get(model)
    if hit is not None and hit[0] == count:
        return hit[1]
    linears = {m for _, m in plan.linears}
    made: dict[int, nn.Module] = {}
    pairs: dict[nn.Module, nn.Module] = {}
    handles = []

    def after_linear(m: nn.Module, _inp: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            made[id(out)] = m

    def before_bn(m: nn.Module, inp: tuple) -> None:
        source = made.get(id(inp[0])) if inp and isinstance(inp[0], torch.Tensor) else None
        if source is not None and m not in pairs:
            pairs[m] = source

    keep: list[object] = []  # outputs stay alive during the pass, so ids are not reused
    try:
        for m in model.modules():
            if m in linears:
                handles.append(m.register_forward_hook(after_linear))
                handles.append(m.register_forward_hook(lambda _m, _i, o: keep.append(o)))
            elif isinstance(m, BATCHNORM):
                handles.append(m.register_forward_pre_hook(before_bn))
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    _PAIRS[model] = (count, pairs)
    return pairs
