"""Which layers LRP can explain, and how BatchNorm layers pair with the layer before them.

LRP is only meaningful when every layer with a learned effect has a rule. This module
walks the model once and refuses, with the layer's name and type, anything it cannot
account for (LayerNorm, attention, unknown modules with parameters, ...), instead of
returning silent garbage.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from zennit.layer import Sum

from audit.engine.model import AttributionError

__all__ = [
    "LayerPlan",
    "inspect_layers",
    "pair_batchnorms",
    "flat_args",
    "needs_grad",
    "LINEAR",
    "BATCHNORM",
    "AVGPOOL",
    "ConvCall",
    "InputProbe",
    "conv_call",
    "own_forward",
    "probe_inputs",
]

LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# f(x) = f'(x) x: the gradient passes relevance unchanged, like zennit's Pass rule
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
# zennit passes relevance through these unchanged (its Pass rule); the fast backend
# would differentiate them instead, so they need backend="zennit"
SMOOTH_ACTIVATIONS = (
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Tanh,
    nn.LogSigmoid,
)
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
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    Sum,
)
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


def flat_args(args: tuple, kwargs: dict) -> Iterator[object]:
    """The arguments, with lists and tuples (``torch.cat``, ``einsum``'s operand list) opened one level."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def needs_grad(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


class _Readers(TorchFunctionMode):
    """Counts, per tracked tensor, the torch calls that read it to compute a tensor.

    Calls that return no tensor (``x.shape``, ``x.dim()``) read metadata only and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tracked: set[int] = set()
        self.count: Counter[int] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (list, tuple)) else (out,)
        if any(isinstance(o, torch.Tensor) for o in outs):
            for a in flat_args(args, kwargs):
                if isinstance(a, torch.Tensor) and id(a) in self.tracked:
                    self.count[id(a)] += 1
        return out


#: model -> (module count, {BatchNorm: the linear layer whose output it normalizes})
_PAIRS: weakref.WeakKeyDictionary[nn.Module, tuple[int, dict[nn.Module, nn.Module]]] = (
    weakref.WeakKeyDictionary()
)


def pair_batchnorms(
    model: nn.Module, plan: LayerPlan, example: torch.Tensor
) -> dict[nn.Module, nn.Module]:
    """BatchNorm -> the conv/linear layer whose output it alone reads, seen in one forward pass.

    The fast backend pairs a BatchNorm with the layer registered before it, which is
    wrong where a BatchNorm normalizes something else: DenseNet's ``norm1`` reads the
    concatenation of all earlier features, not the conv registered before it. Here
    forward hooks record which layer produced each BatchNorm's input (by tensor
    identity), on one image, without gradients; cached per model.

    A BatchNorm merges only into a layer whose output nothing else reads: merged, the
    layer's output *is* the normalized one, so any other reader would get it too.
    MaxViT's first MBConv normalizes the stem conv's output (``pre_norm``) while its
    shortcut (``proj``) pools the raw output; merging there changed the logits by a
    third. The graph backend's recording applies the same condition.

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
    read_by: dict[
        nn.Module, tuple[nn.Module, int]
    ] = {}  # BatchNorm -> (source layer, its output id)
    readers = _Readers()
    handles = []

    def after_linear(m: nn.Module, _inp: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            made[id(out)] = m
            readers.tracked.add(id(out))
            keep.append(out)  # outputs stay alive during the pass, so ids are not reused

    def before_bn(m: nn.Module, inp: tuple) -> None:
        source = made.get(id(inp[0])) if inp and isinstance(inp[0], torch.Tensor) else None
        if source is not None and m not in read_by:
            read_by[m] = (source, id(inp[0]))

    keep: list[object] = []
    try:
        for m in model.modules():
            if m in linears:
                handles.append(m.register_forward_hook(after_linear))
            elif isinstance(m, BATCHNORM):
                handles.append(m.register_forward_pre_hook(before_bn))
        with torch.no_grad(), readers:
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    pairs: dict[nn.Module, nn.Module] = {}
    for bn, (source, out_id) in read_by.items():
        if readers.count[out_id] == 1 and source not in pairs.values():
            pairs[bn] = source
    _PAIRS[model] = (count, pairs)
    return pairs


# ------------------------------------------------------------------ what the layers really compute
#: the forwards of the layer classes whose computation the LRP rules replay (``_conv_forward``, ``F.linear``)
_BASE_FORWARDS = frozenset(
    {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}
)
_CONV_CALLS = frozenset({"conv1d", "conv2d", "conv3d"})


def own_forward(module: nn.Module) -> bool:
    """Whether a conv layer's class replaces ``forward`` (timm's ``Conv2dSame`` pads the input by
    its size, ``StdConv2d`` and ``ScaledStdConv2d`` standardize the weight): the rules must replay
    what that forward computes, not ``module.weight`` with ``module.padding``."""
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and type(module).forward not in _BASE_FORWARDS
    )


@dataclass(frozen=True)
class ConvCall:
    """What a conv layer with its own ``forward`` computes: ``F.pad(x, pads)`` (zeros), then the
    convolution with ``weight`` and ``bias`` and the layer's stride, padding, dilation and groups."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    pads: tuple[int, ...]


class _CallRecorder(torch.overrides.TorchFunctionMode):
    """Records the zero pads and convolutions that one layer's ``forward`` runs (and runs them)."""

    def __init__(self) -> None:
        super().__init__()
        self.pads: dict[
            int, tuple[torch.Tensor, tuple[int, ...]]
        ] = {}  # id(output) -> (input, pads)
        self.convs: list[tuple[tuple, dict]] = []
        self.keep: list[torch.Tensor] = []  # outputs stay alive so their ids are not reused

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "pad" and isinstance(out, torch.Tensor):
            mode, value = (
                kwargs.get("mode", args[2] if len(args) > 2 else "constant"),
                kwargs.get("value", args[3] if len(args) > 3 else None),
            )
            if mode == "constant" and not value:
                self.pads[id(out)] = (args[0], tuple(int(p) for p in args[1]))
                self.keep.append(out)
        elif name in _CONV_CALLS:
            self.convs.append((args, kwargs))
        return out


def _as_tuple(value: object, d: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * d


def conv_call(name: str, module: nn.Module, x: torch.Tensor) -> ConvCall:
    """Replay ``module``'s own ``forward`` on ``x`` (no gradients) and read what it computes.

    Raises:
        AttributionError: the forward does not reduce to zero pads of its input followed by
            one convolution with the layer's own stride, padding, dilation and groups.
    """
    recorder = _CallRecorder()
    with torch.no_grad(), recorder:
        type(module).forward(module, x)
    why = _call_mismatch(module, x, recorder)
    if why:
        raise AttributionError(
            f"LRP cannot explain layer '{name}' ({type(module).__name__}): its forward {why}, so no "
            "conv rule can replay it; use another method (gradcam, input_x_gradient, saliency)"
        )
    args, kwargs = recorder.convs[0]
    named = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
    src, pads = named["input"], ()
    while src is not x and id(src) in recorder.pads:
        src, more = recorder.pads[id(src)]
        if pads and len(more) != len(pads):
            raise AttributionError(
                f"LRP cannot explain layer '{name}': it pads its input twice, over other dimensions"
            )
        pads = tuple(a + b for a, b in zip(pads, more, strict=True)) if pads else more
    bias = named.get("bias")
    return ConvCall(named["weight"].detach(), None if bias is None else bias.detach(), pads)


def _call_mismatch(module: nn.Module, x: torch.Tensor, recorder: _CallRecorder) -> str:
    """Why the recorded calls are not "pad, then one convolution of the layer's geometry" ('' if they are)."""
    if len(recorder.convs) != 1:
        return f"runs {len(recorder.convs)} convolutions"
    args, kwargs = recorder.convs[0]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    named = dict(zip(names, args, strict=False)) | kwargs
    src = named["input"]
    while src is not x and id(src) in recorder.pads:
        src = recorder.pads[id(src)][0]
    if src is not x:
        return "changes its input before the convolution (other than padding it with zeros)"
    d = module.weight.ndim - 2
    geometry = {
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
    }
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    for key, expected in geometry.items():
        got = named.get(key, defaults[key])
        if (
            key == "groups"
            and got != expected
            or key != "groups"
            and _as_tuple(got, d) != _as_tuple(expected, d)
        ):
            return f"convolves with {key}={got!r}, not the layer's {expected!r}"
    return ""


@dataclass(frozen=True)
class InputProbe:
    """Seen in one forward pass: the conv/linear layers that read the network input (each gets
    the first-layer rule) and what each conv layer with its own ``forward`` computes."""

    firsts: frozenset[nn.Module]
    calls: dict[nn.Module, ConvCall]


def probe_inputs(model: nn.Module, plan: LayerPlan, network_input: torch.Tensor) -> InputProbe:
    """The :class:`InputProbe` of ``model`` on ``network_input[:1]`` (no gradients, hooks removed).

    Parallel branches may read the input (FastViT's reparameterizable stem: a kxk conv and a
    1x1 "scale" conv side by side): every layer that reads it is a first layer, whatever its
    place in registration order. When none reads it directly, the first layer registered is.
    """
    x = network_input[:1]
    firsts: set[nn.Module] = set()
    calls: dict[nn.Module, ConvCall] = {}
    names = {m: n for n, m in plan.linears}
    handles = []

    def before(m: nn.Module, inp: tuple) -> None:
        if inp and inp[0] is x:
            firsts.add(m)
        if own_forward(m) and inp and isinstance(inp[0], torch.Tensor):
            calls[m] = conv_call(names[m], m, inp[0])

    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(before))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return InputProbe(frozenset(firsts or {plan.linears[0][1]}), calls)
