"""A lean implementation of zennit's LRP rules: modified weights computed once per call.

Why our own code: zennit recomputes every layer inside a backward hook (ZPlus: two
extra forwards and two extra backwards per conv, with fresh ``nn.Parameter`` copies of
the weights on every call) on top of the model's own backward, whose result it
throws away. That measured ~3x one forward+backward on ResNet-18. Here each
conv/linear layer runs as one custom autograd ``Function``: its forward computes the
BatchNorm-merged output and the rule's denominators, its backward applies the
transposed modified weights once. The result equals zennit's to ~1e-5 (tested on
ResNet-18 and SmallCNN for every composite).

Convention ("gradient x input" trick): above the first layer, the quantity flowing
backward is a gradient ``g`` with relevance ``R = activation * g``. ReLU, max pooling
and flatten then need no rule: their gradient is exactly zennit's Pass and
winner-take-all rules, and any addition's gradient is zennit's Norm rule without its
1e-6 stabilizer (so residual networks other than torchvision's are handled too).
Average pooling and torchvision's residual sums get zennit's stabilized Norm rule
explicitly, so the maps match. The first layer
(zennit's: the first conv/linear in registration order) returns relevance itself, so
what lies below it receives relevance exactly as in zennit.

Signed inputs: ZPlus-like rules split the input into its positive and negative part.
Where a layer's input holds no negative value the negative part is zero and its
convolutions are skipped. When the autograd graph shows the input is a ReLU's output
(or a max pooling of one), unchanged since, nothing is checked: that covers every
conv of a torchvision ResNet after the first. Elsewhere, on the CPU, each layer checks
its input as it runs. On a GPU that check would synchronize with the device once per
layer, leaving the GPU idle while the host launches the next layer; there the layer
assumes a non-negative input unless it has seen a negative one before, and
:meth:`FastLRP.recheck` verifies all assumptions of a call with one synchronization at
its end. A wrong assumption marks the layer (for the model's later calls too) and the
call runs again: correct maps, one wasted pass per layer learned.

Nothing here changes the model: patched ``forward`` attributes are instance
attributes removed in ``finally``, and merged weights are new tensors.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from audit.engine.model import AttributionError
from audit.methods._lrp_layers import LayerPlan

__all__ = [
    "Term",
    "Group",
    "LayerRule",
    "FastLRP",
    "merged_parameters",
    "stabilize",
    "stabilizer",
    "UNIT_SCALE",
    "RESIDUAL_BLOCKS",
]

#: the blocks whose residual sum gets zennit's stabilized Norm rule (zennit's ResNet
#: canonizers); every other addition gets its gradient (the Norm rule unstabilized)
RESIDUAL_BLOCKS = (BasicBlock, Bottleneck)

_Forward = Callable[[torch.Tensor], torch.Tensor]
_Add = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: the activation scale zennit's absolute stabilizer is meant for, from below: a row whose
#: largest ``|z|`` at a rule is at least this gets the stabilizer as given (see :func:`stabilizer`)
UNIT_SCALE = 2.0**-10


def stabilizer(z: torch.Tensor, eps: float) -> torch.Tensor:
    """The stabilizer for ``z``, per row (dim 0): ``eps * min(1, max|z_row| / UNIT_SCALE)``.

    zennit's stabilizer is an absolute number (1e-6), chosen for activations of order
    one. A row whose largest ``|z|`` at a rule is at least :data:`UNIT_SCALE` (~1e-3)
    gets exactly ``eps``, as in zennit: every model whose activations are of a usual
    size keeps zennit's maps (tests/methods/test_lrp.py checks them to 1e-9 in float64).
    Below, the absolute stabilizer stops being small against the activations and takes
    every unit's relevance: torchvision's EfficientNet-B0 with random weights shrinks its
    activations block by block to logits of ~1e-14, and every map was the constant 0.
    There the stabilizer shrinks with the row's scale, as if the row were rescaled to
    ``UNIT_SCALE`` first (LRP's rules are homogeneous of degree 0 in ``(z, eps)``): it
    then guards against near-zero units, at most ``eps / UNIT_SCALE`` (~1e-3) of the
    largest, instead of absorbing all of them. One scale for the whole batch would
    not do: the activations shrink from layer to layer, so the scale is per rule, and
    per row so that a map never depends on the other images of its batch. The factor is
    continuous (no jump at the threshold), and a tensor (no host sync on a GPU).
    """
    dims = tuple(range(1, z.ndim)) or None  # a 1-d tensor is one row
    top = torch.linalg.vector_norm(z.detach(), ord=float("inf"), dim=dims, keepdim=True)
    # tiny: an all-zero row keeps a non-zero stabilizer (0 / 0 would be NaN)
    return (top * (eps / UNIT_SCALE)).clamp_(min=torch.finfo(z.dtype).tiny, max=eps)


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + e * sign(z)``, with sign(0) = +1 (zennit's stabilizer; ``e`` from :func:`stabilizer`)."""
    e = stabilizer(z, eps)
    return torch.where(z >= 0, z + e, z - e)


@dataclass(frozen=True)
class Term:
    """One contribution ``sign * layer(source(x); weight, bias)`` to a rule's denominator.

    ``source`` is ``"all"`` (x), ``"pos"`` (x clamped at 0 from below), ``"neg"``
    (from above), ``"ones"``, ``"low"`` or ``"high"`` (box bounds). ``reduce_out``
    marks an all-ones weight stored with a single output row.
    """

    source: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    sign: float = 1.0
    reduce_out: bool = False


@dataclass(frozen=True)
class Group:
    """Terms sharing one denominator ``z``; ``R_in += coef * sum(sign * source * W^T (R / stab(z)))``.

    ``mask`` keeps only outputs with ``y > 0`` (``"pos"``) or ``y < 0`` (``"neg"``), as
    zennit's generalized Gamma rule does; ``is_output`` means ``z`` is the layer's
    output itself (the epsilon rule). ``nonnegative`` declares ``z >= 0`` for any input
    (ZPlus, the alpha group, Flat: positive parts times non-negative weights plus
    negative parts times non-positive ones), so that the stabilizer is ``z + eps``.
    """

    terms: tuple[Term, ...]
    stabilizer: float
    coef: float = 1.0
    mask: str | None = None
    is_output: bool = False
    nonnegative: bool = False


@dataclass
class LayerRule:
    """A conv/linear layer with its (BatchNorm-merged) parameters and its LRP rule."""

    name: str
    module: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: tuple[Group, ...]
    first: bool = False
    batchnorm: nn.Module | None = None

    def __post_init__(self) -> None:
        #: a rule that treats the input's positive and negative parts apart
        self.signed = any(t.source in ("pos", "neg") for g in self.groups for t in g.terms)

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if isinstance(self.module, nn.Linear):
            return F.linear(x, weight, bias)
        return self.module._conv_forward(x, weight, bias)

    def input_grad(self, weight: torch.Tensor, s: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``W^T s``: the input gradient of the layer with ``weight`` for output gradient ``s``."""
        if isinstance(self.module, nn.Linear):
            return s @ weight
        m = self.module
        d = weight.ndim - 2
        padding = (0,) * d if m.padding == "valid" else m.padding
        dummy = s.new_empty(1).expand(shape)
        return torch.ops.aten.convolution_backward(
            s,
            dummy,
            weight,
            None,
            m.stride,
            padding,
            m.dilation,
            False,
            [0] * d,
            m.groups,
            [True, False, False],
        )[0]


def merged_parameters(
    module: nn.Module,
    bn: nn.Module | None,
    used: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight and bias with a following BatchNorm folded in (new tensors).

    ``used``: the weight and bias the layer's own forward really convolves with (a
    standardized weight, see :class:`audit.methods._lrp_layers.ConvCall`) instead of its parameters.
    """
    if used is not None:
        w, b = used[0].detach(), None if used[1] is None else used[1].detach()
    else:
        w = module.weight.detach()
        b = None if module.bias is None else module.bias.detach()
    if bn is None:
        return w, b
    # torch's own folding; it reshapes the scale to the weight's rank, so it serves
    # Linear weights [out, in] as well as Conv weights [out, in, k...]
    w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(
        w,
        b,
        bn.running_mean.detach(),
        bn.running_var.detach(),
        bn.eps,
        None if bn.weight is None else bn.weight.detach(),
        None if bn.bias is None else bn.bias.detach(),
    )
    return w.detach(), b.detach()


@dataclass
class _Run:
    """State of one forward pass through the patched model."""

    network_input: torch.Tensor
    bounds: dict[str, torch.Tensor]
    #: layers known to receive negative inputs (names; the model's, kept across calls)
    signed_inputs: set[str]
    #: (layer, its input's minimum) for assumptions checked at the end
    assumed: list[tuple[str, torch.Tensor]]
    started: bool = False
    pending: dict[nn.Module, torch.Tensor] = field(default_factory=dict)


#: devices on which a layer's input sign is assumed and checked once per call (see
#: the module docstring); on others each layer checks its input as it runs
DEFERRED_SIGN_CHECK = {"cuda"}

#: model -> names of its layers seen receiving negative inputs (weak: keeps no model alive)
_SIGNED_INPUTS: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _nonnegative(layer: LayerRule, x: torch.Tensor, run: _Run) -> bool:
    """Whether ``layer`` may treat ``x`` as non-negative (skipping the negative part)."""
    if not layer.signed:
        return True  # no rule term depends on the sign
    if layer.name in run.signed_inputs:
        return False  # the general form, right for any input
    if _relu_output(x):
        return True
    if x.device.type in DEFERRED_SIGN_CHECK:
        run.assumed.append((layer.name, x.amin()))  # verified by FastLRP.recheck
        return True
    return bool(x.amin() >= 0)


#: autograd nodes that pass a non-negative input on as a non-negative output
_MAX_POOLS = frozenset(
    f"{kind}Backward0"
    for kind in (
        "MaxPool1DWithIndices",
        "MaxPool2DWithIndices",
        "MaxPool3DWithIndices",
        "AdaptiveMaxPool1D",
        "AdaptiveMaxPool2D",
        "AdaptiveMaxPool3D",
    )
)


def _relu_output(x: torch.Tensor) -> bool:
    """Whether ``x`` is, as the autograd graph proves, a ReLU's output (or its max pooling).

    Reading the node's saved tensor raises if it was modified in place since (e.g. under
    ``no_grad``; autograd's own backward would refuse such a graph too), so a changed
    tensor is never taken for a ReLU's output. Costs a microsecond, where checking the
    values costs a kernel (and on a GPU a sync or a deferred check).
    """
    fn = x.grad_fn
    name = type(fn).__name__
    try:
        if name in _MAX_POOLS and x._version == 0:
            fn = fn._saved_self.grad_fn  # the pooled tensor, unchanged since (or it raises)
            name = type(fn).__name__
        if name == "ReluBackward0":
            fn._saved_result  # noqa: B018 (raises if the output was modified in place since)
            return True
    except (RuntimeError, AttributeError):
        pass
    return False


def _source(term: Term, x: torch.Tensor, nonneg: bool, run: _Run) -> torch.Tensor:
    if term.source == "all" or (term.source == "pos" and nonneg):
        return x
    if term.source == "pos":
        return x.clamp(min=0)
    if term.source == "neg":
        return x.clamp(max=0)
    one = (1, *x.shape[1:])
    if term.source == "ones":
        return x.new_ones(one)
    return run.bounds[term.source].to(x).expand(one)


class _RuleFunction(torch.autograd.Function):
    """Forward: the layer's output. Backward: the LRP rule instead of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: LayerRule, run: _Run) -> torch.Tensor:
        y = layer.linear(x, layer.weight, layer.bias)
        nonneg = _nonnegative(layer, x, run)
        ks = []
        for group in layer.groups:
            if group.is_output:
                den = stabilize(y, group.stabilizer)
            else:
                z = None
                for t in group.terms:
                    if nonneg and t.source == "neg":
                        continue  # clamp(x, max=0) == 0 and no bias: nothing to add
                    c = layer.linear(_source(t, x, nonneg, run), t.weight, t.bias)
                    z = (c if t.sign == 1.0 else -c) if z is None else z.add_(c, alpha=t.sign)
                if group.nonnegative:
                    den = z.add_(stabilizer(z, group.stabilizer))  # z >= 0: the sign is +
                else:
                    den = stabilize(z, group.stabilizer)
            k = y / den
            if group.mask == "pos":
                k = k * (y > 0)
            elif group.mask == "neg":
                k = k * (y < 0)
            ks.append(k if group.coef == 1.0 else k * group.coef)
        ctx.layer, ctx.run, ctx.ks, ctx.nonneg, ctx.shape = layer, run, ks, nonneg, x.shape
        ctx.save_for_backward(x if (layer.first or not nonneg) else None)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        layer: LayerRule = ctx.layer
        (x,) = ctx.saved_tensors
        out_dim = -1 if isinstance(layer.module, nn.Linear) else 1
        total = None
        for group, k in zip(layer.groups, ctx.ks, strict=True):
            s = g * k
            for t in group.terms:
                if ctx.nonneg and t.source == "neg":
                    continue
                c = layer.input_grad(
                    t.weight, s.sum(out_dim, keepdim=True) if t.reduce_out else s, ctx.shape
                )
                if t.sign != 1.0:
                    c = c * t.sign
                if layer.first:  # relevance itself
                    if t.source != "ones":
                        c = c * _source(t, x, ctx.nonneg, ctx.run)
                elif t.source == "pos" and not ctx.nonneg:  # gradient form: R = x * c
                    c = c * (x > 0)
                elif t.source == "neg":
                    c = c * (x < 0)
                total = c if total is None else total + c
        return total, None, None


class _NormFunction(torch.autograd.Function):
    """zennit's Norm rule for average pooling: ``R_in = x * J^T(R / stab(y))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: _Forward, stabilizer: float) -> torch.Tensor:
        y = fn(x)
        ctx.fn, ctx.k = fn, y / stabilize(y, stabilizer)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ctx.fn(xd), xd, g * ctx.k)
        return grad, None, None


class _SumNormFunction(torch.autograd.Function):
    """zennit's Norm rule for a residual addition ``a + b``: ``R_a = a * R / stab(a + b)``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, stabilizer: float) -> torch.Tensor:
        y = a + b
        ctx.k = y / stabilize(y, stabilizer)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        gk = g * ctx.k
        return gk, gk, None


def _basic_block_forward(block: BasicBlock, add: _Add) -> _Forward:
    """torchvision's BasicBlock.forward with the residual addition made explicit."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        identity = x if block.downsample is None else block.downsample(x)
        return block.relu(add(out, identity))

    return forward


def _bottleneck_forward(block: Bottleneck, add: _Add) -> _Forward:
    """torchvision's Bottleneck.forward with the residual addition made explicit."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
        identity = x if block.downsample is None else block.downsample(x)
        return block.relu(add(out, identity))

    return forward


class FastLRP:
    """Patches a model's layers for one LRP call (see the module docstring).

    The residual additions of torchvision ResNet blocks get zennit's stabilized Norm
    rule through the blocks' own ``forward`` rewritten with an explicit addition (as
    zennit's ResNet canonizer does, without its stack-and-sum copies).

    Args:
        core: the network (inside any ``Normalized`` wrapper).
        plan: its layers (from ``inspect_layers``).
        rules: a :class:`LayerRule` per conv/linear layer.
        stabilizer: the Norm rule's stabilizer.
        bounds: ``{"low": ..., "high": ...}`` for a box rule (tensors broadcastable to one input).
    """

    def __init__(
        self,
        core: nn.Module,
        plan: LayerPlan,
        rules: list[LayerRule],
        stabilizer: float,
        bounds: dict[str, torch.Tensor],
        pads: dict[nn.Module, tuple[int, ...]] | None = None,
    ) -> None:
        self.core = core
        self.pads = pads or {}
        self.plan = plan
        self.rules = rules
        self.stabilizer = stabilizer
        self.bounds = bounds
        self.first_name = next(r.name for r in rules if r.first)
        self.signed_inputs = _SIGNED_INPUTS.setdefault(core, set())
        self.assumed: list[tuple[str, torch.Tensor]] = []
        self._run: _Run | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Patch the layers' and residual blocks' ``forward``; undo it on exit."""
        touched: list[tuple[nn.Module, object]] = []
        add = self.add
        try:
            for module in self.core.modules():
                if isinstance(module, BasicBlock):
                    touched.append(_set_forward(module, _basic_block_forward(module, add)))
                elif isinstance(module, Bottleneck):
                    touched.append(_set_forward(module, _bottleneck_forward(module, add)))
            for rule in self.rules:
                touched.append(_set_forward(rule.module, self._linear_forward(rule)))
                if rule.batchnorm is not None:
                    touched.append(_set_forward(rule.batchnorm, self._bn_forward(rule)))
            for module in self.plan.avgpools:
                touched.append(_set_forward(module, self._norm_forward(module)))
            yield
        finally:
            for module, previous in reversed(touched):
                del module.forward
                if previous is not None:
                    module.forward = previous

    @contextmanager
    def forward_pass(self, network_input: torch.Tensor) -> Iterator[None]:
        """One forward+backward whose input is ``network_input`` (inside :meth:`installed`)."""
        self._run = _Run(
            network_input=network_input,
            bounds=self.bounds,
            signed_inputs=self.signed_inputs,
            assumed=self.assumed,
        )
        try:
            yield
            if not self._run.started:
                raise AttributionError(
                    "no conv/linear layer ran in the forward pass; LRP has nothing to explain"
                )
        finally:
            self._run = None

    def recheck(self) -> bool:
        """Verify the sign assumptions of the passes so far (one device sync); True if one failed.

        A layer whose input had a negative value is remembered for this model, so a
        pass run again (and any later call) uses the general form there.
        """
        if not self.assumed:
            return False
        assumed, self.assumed[:] = list(self.assumed), []
        held = (torch.stack([low for _, low in assumed]) >= 0).cpu().tolist()
        wrong = {name for (name, _), ok in zip(assumed, held, strict=True) if not ok}
        self.signed_inputs |= wrong
        return bool(wrong)

    def _current(self) -> _Run:
        if self._run is None:
            raise AttributionError(
                "internal error: a patched layer ran outside an LRP forward pass"
            )
        return self._run

    def layer(self, rule: LayerRule, x: torch.Tensor) -> torch.Tensor:
        """``rule``'s layer applied to ``x`` with the LRP rule as its backward (inside :meth:`forward_pass`)."""
        run = self._current()
        if not run.started and not rule.first:
            raise AttributionError(
                f"layer '{rule.name}' runs before '{self.first_name}', the first conv/linear layer (the "
                "one that reads the network input, else the first registered), so LRP's first-layer rule "
                "would land on the wrong layer; register the model's modules in the order of the forward pass"
            )
        run.started = True
        if not rule.first and x is run.network_input:
            raise AttributionError(
                f"layer '{rule.name}' reads the network input as well as '{self.first_name}'; the fast "
                "LRP backend supports one first layer only: use backend='zennit'"
            )
        pads = self.pads.get(rule.module)
        if (
            pads
        ):  # the layer's own forward pads its input first (timm's Conv2dSame): so does the rule
            x = F.pad(x, pads)
        y = _RuleFunction.apply(x, rule, run)
        if rule.batchnorm is not None:
            run.pending[rule.batchnorm] = y
        return y

    def merged_batchnorm(self, rule: LayerRule, x: torch.Tensor) -> torch.Tensor:
        """The BatchNorm merged into ``rule``'s layer: ``x`` must be that layer's output, returned as is."""
        if self._current().pending.pop(rule.batchnorm, None) is not x:
            raise AttributionError(
                f"the BatchNorm registered after '{rule.name}' was merged into it, but it does not "
                f"receive '{rule.name}''s output in the forward pass; register the model's modules "
                "in the order of the forward pass"
            )
        return x  # already applied by the merged weights

    def norm(self, fn: _Forward, x: torch.Tensor) -> torch.Tensor:
        """``fn(x)`` (a pooling) with zennit's stabilized Norm rule as its backward."""
        return _NormFunction.apply(x, fn, self.stabilizer)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a + b`` with zennit's stabilized Norm rule for sums as its backward."""
        return _SumNormFunction.apply(a, b, self.stabilizer)

    def _linear_forward(self, rule: LayerRule) -> _Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.layer(rule, x)

        return forward

    def _bn_forward(self, rule: LayerRule) -> _Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.merged_batchnorm(rule, x)

        return forward

    def _norm_forward(self, module: nn.Module) -> _Forward:
        original = module.__dict__.get("forward") or type(module).forward.__get__(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.norm(original, x)

        return forward


def _set_forward(module: nn.Module, forward: _Forward) -> tuple[nn.Module, object]:
    """Set an instance ``forward`` and return what to restore (a previous instance attribute or None)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    return module, previous
