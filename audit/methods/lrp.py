"""Layer-wise relevance propagation (Bach et al. 2015) with zennit's composites.

``explain("lrp", model, x, target, composite="epsilon_plus_flat")``. Composites:

==========================  ==========================================================
``epsilon``                 the epsilon rule on every conv/linear layer (ours; zennit
                            has no composite of that name)
``epsilon_plus``            zennit: ZPlus on convs, epsilon on linear layers
``epsilon_plus_flat``       zennit: as epsilon_plus, Flat on the first layer
``epsilon_gamma_box``       zennit: ZBox on the first conv (bounds ``low``/``high`` in
                            display space), Gamma on the other convs, epsilon on linear
``epsilon_alpha2_beta1``    zennit: alpha=2, beta=1 on convs, epsilon on linear layers
==========================  ==========================================================

Relevance starts as the target logit; the map is the relevance summed over channels.
BatchNorm layers are merged into the conv/linear layer before them (exactly; see
:class:`ExactMergeBatchNorm`), residual additions are handled (zennit's ResNet block
canonizers for torchvision ResNets; the fast backend handles any addition), and an
``audit.models.Normalized`` wrapper is looked through: relevance of a normalized
pixel is the relevance of the display-space pixel, and the box bounds are mapped
through the normalization. Layers LRP cannot account for raise an error naming them.

Backends:

* ``"fast"`` (our lean implementation, see ``_lrp_fast``): conv/linear layers, BatchNorm,
  ReLU-like activations, pooling and residual additions: ResNets, VGG, GoogLeNet,
  Inception, SqueezeNet. Equals zennit's maps to ~1e-5.
* ``"general"`` (``_lrp_general``): the fast backend's layer rules plus rules at the
  level of operations for modern blocks (AttnLRP's LayerNorm, softmax and attention
  rules, the identity rule for GELU/SiLU/Hardswish, squeeze-excitation gates held
  fixed, BatchNorms merged only into the layer whose output they alone read): ViT, Swin, MaxViT,
  ConvNeXt, EfficientNet, MobileNet, RegNet, DenseNet, ShuffleNet, MNASNet. On a plain
  ReLU network it computes exactly what the fast one does.
* ``"graph"`` (``_lrp_graph``): the same rules placed on the aten operations of a
  ``torch.export`` program (``torch.export.unflatten(ep)`` or ``ep.module()``, MLflow 3's
  default format), whose children hold aten calls instead of layers. An exported
  network's maps equal the eager network's. A program exported with a fixed batch size
  is run that many rows at a time.
* ``"zennit"`` (hooks and canonizers, the reference for what both cover).

``"auto"`` takes the graph backend for an exported program, else the fast backend when
the model allows it (its BatchNorms each alone read the layer registered before them),
else the general one (zennit for convs whose padding mode neither transposes).
:func:`lrp_rules` says which backend and rules a model gets.

Stabilizers are zennit's absolute numbers wherever activations are of a usual size and
shrink with them where a network's activations are tiny (random-weight EfficientNet-B0,
logits ~1e-14), instead of absorbing all relevance: see ``_lrp_fast.stabilizer``.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.canonizers import CompositeCanonizer, SequentialMergeBatchNorm
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite
from zennit.rules import Epsilon
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import Convolution

from audit.engine.model import AttributionError, prepare_inputs, preserved
from audit.methods._common import TargetLike, Targets, map_chunks, target_indices
from audit.methods._lrp_fast import FastLRP, Group, LayerRule, Term, merged_parameters
from audit.methods._lrp_general import RelevanceMode, fixed_gates
from audit.methods._lrp_graph import (
    GraphRelevanceMode,
    fixed_batch,
    is_exported,
    node_metadata,
    record,
)
from audit.methods._lrp_layers import (
    BATCHNORM,
    InputProbe,
    LayerPlan,
    inspect_layers,
    own_forward,
    pair_batchnorms,
    probe_inputs,
)
from audit.methods.registry import register
from audit.models import Normalized

__all__ = ["lrp", "lrp_rules", "COMPOSITES", "BACKENDS", "EpsilonComposite", "ExactMergeBatchNorm"]

COMPOSITES = (
    "epsilon",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
)
BACKENDS = ("auto", "fast", "general", "graph", "zennit")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class EpsilonComposite(LayerMapComposite):
    """The epsilon rule on every conv and linear layer (zennit's Pass/Norm rules elsewhere).

    Args:
        epsilon: the epsilon rule's stabilizer.
        stabilizer: the Norm rule's stabilizer (sums, average pooling).
        canonizers: zennit canonizers to apply (BatchNorm merging, ResNet sums).
    """

    def __init__(
        self, epsilon: float = 1e-6, stabilizer: float = 1e-6, canonizers: list | None = None
    ) -> None:
        layer_map = layer_map_base(stabilizer) + [
            (Convolution, Epsilon(epsilon=epsilon)),
            (nn.Linear, Epsilon(epsilon=epsilon)),
        ]
        super().__init__(layer_map=layer_map, canonizers=canonizers)


class ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """zennit's BatchNorm merge, made exact: the emptied BatchNorm is the identity.

    zennit folds ``1 / sqrt(var + eps)`` into the layer and sets the BatchNorm's
    statistics to mean 0, variance 1, but leaves its ``eps``: the merged model then
    computes ``x / sqrt(1 + eps)`` at every BatchNorm (about 1e-4 relative on the
    logits of ResNet-18). Here the emptied BatchNorm's ``forward`` is the identity while
    merged (an instance attribute, deleted on removal). Setting ``eps = 0`` instead would
    also be exact, but some torch releases refuse ``batch_norm`` with ``eps <= 0``.
    """

    def register(self, linears: list[nn.Module], batch_norm: nn.Module) -> None:
        super().register(linears, batch_norm)
        batch_norm.forward = _identity

    def remove(self) -> None:
        super().remove()
        self.batch_norm.__dict__.pop("forward", None)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ------------------------------------------------------------------ model plumbing
def _unwrap(model: nn.Module) -> tuple[nn.Module, list[Normalized]]:
    wrappers = []
    while isinstance(model, Normalized):
        wrappers.append(model)
        model = model.model
    return model, wrappers


def _normalize(x: torch.Tensor, wrappers: list[Normalized]) -> torch.Tensor:
    for w in wrappers:
        x = (x - w.mean) / w.std
    return x


def _bound(
    value: float | torch.Tensor, name: str, inputs: torch.Tensor, wrappers: list[Normalized]
) -> torch.Tensor:
    """A box bound in display space, broadcastable to one input and mapped through the wrappers."""
    t = torch.as_tensor(value, dtype=inputs.dtype, device=inputs.device)
    if t.ndim == 1:
        t = t.reshape(1, -1, *([1] * (inputs.ndim - 2)))
    elif t.ndim == inputs.ndim - 1:
        t = t[None]
    one = (1, *inputs.shape[1:])
    try:
        torch.broadcast_to(t, one)
    except RuntimeError:
        raise AttributionError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to one input {one}; pass a number, "
            "one value per channel, or a tensor shaped like one input"
        ) from None
    return _normalize(t, wrappers)


# ------------------------------------------------------------------ fast backend rules
def _clamp(t: torch.Tensor | None, **kw: float) -> torch.Tensor | None:
    return None if t is None else t.clamp(**kw)


def _epsilon(w, b, eps: float) -> tuple[Group, ...]:
    return (Group((Term("all", w, b),), stabilizer=eps, is_output=True),)


def _zplus(w, b, stab: float) -> tuple[Group, ...]:
    return (
        Group(
            (Term("pos", w.clamp(min=0), _clamp(b, min=0)), Term("neg", w.clamp(max=0))),
            stabilizer=stab,
            nonnegative=True,
        ),
    )


def _alpha_beta(w, b, alpha: float, beta: float, stab: float) -> tuple[Group, ...]:
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    return (
        Group(
            (Term("pos", wp, _clamp(b, min=0)), Term("neg", wn)),
            stabilizer=stab,
            coef=alpha,
            nonnegative=True,
        ),
        Group((Term("pos", wn, _clamp(b, max=0)), Term("neg", wp)), stabilizer=stab, coef=-beta),
    )


def _gamma(w, b, gamma: float, stab: float) -> tuple[Group, ...]:
    wp, wn = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
    bp = None if b is None else b + gamma * b.clamp(min=0)
    bn = None if b is None else b + gamma * b.clamp(max=0)
    return (
        Group((Term("pos", wp, bp), Term("neg", wn)), stabilizer=stab, mask="pos"),
        Group((Term("pos", wn, bn), Term("neg", wp)), stabilizer=stab, mask="neg"),
    )


def _flat(module: nn.Module, w, stab: float) -> tuple[Group, ...]:
    # all output units share the all-ones weights: keep one row and sum over outputs
    reduce = isinstance(module, nn.Linear) or module.groups == 1
    ones = torch.ones_like(w[:1] if reduce else w)
    return (Group((Term("ones", ones, reduce_out=reduce),), stabilizer=stab, nonnegative=True),)


def _zbox(w, b, stab: float) -> tuple[Group, ...]:
    terms = (
        Term("all", w, b),
        Term("low", w.clamp(min=0), _clamp(b, min=0), sign=-1.0),
        Term("high", w.clamp(max=0), _clamp(b, max=0), sign=-1.0),
    )
    return (Group(terms, stabilizer=stab),)


def _fast_rules(
    plan: LayerPlan, probe: InputProbe, composite: str, eps: float, stab: float, gamma: float
) -> list[LayerRule]:
    """One :class:`LayerRule` per conv/linear layer, placed as zennit's composite places its rules.

    Every layer that reads the network input (``probe.firsts``: parallel branches may) gets
    the first-layer rule; a conv with its own ``forward`` gets the weight it really uses.
    """
    bn_of = {lin: bn for bn, lin in plan.merged.items()}
    firsts = probe.firsts
    first_conv = next((m for _, m in plan.linears if isinstance(m, _CONV)), None)
    rules = []
    for name, m in plan.linears:
        call = probe.calls.get(m)
        w, b = merged_parameters(
            m, bn_of.get(m), None if call is None else (call.weight, call.bias)
        )
        conv = isinstance(m, _CONV)
        if composite == "epsilon_plus_flat" and m in firsts:
            groups = _flat(m, w, stab)
        elif composite == "epsilon" or not conv:
            groups = _epsilon(w, b, eps)
        elif composite in ("epsilon_plus", "epsilon_plus_flat"):
            groups = _zplus(w, b, stab)
        elif composite == "epsilon_alpha2_beta1":
            groups = _alpha_beta(w, b, 2.0, 1.0, stab)
        elif m is first_conv or m in firsts:
            groups = _zbox(w, b, stab)
        else:
            groups = _gamma(w, b, gamma, stab)
        rules.append(LayerRule(name, m, w, b, groups, first=m in firsts, batchnorm=bn_of.get(m)))
    return rules


#: model -> (key, rules) of its last fast-backend call. Building the rules copies every
#: weight two or three times (BatchNorm merged, then clamped per rule): 59 ms for a
#: ResNet-18 and 105 ms for a ResNet-50 on this project's 2-core CPU, about a fifth of
#: one forward+backward there, and ~10 small kernels per layer on a GPU. The key holds
#: each parameter's identity and in-place version counter, so an optimizer step, a
#: ``load_state_dict`` or new BatchNorm statistics rebuild them; the entry lives as long
#: as the model (a weak reference) and holds those copies meanwhile.
_RULES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list, list[LayerRule]]] = (
    weakref.WeakKeyDictionary()
)


def _rules_key(
    plan: LayerPlan, probe: InputProbe, composite: str, eps: float, stab: float, gamma: float
) -> tuple[tuple, list[torch.Tensor | None]] | None:
    """What the rules depend on: settings, layers and parameter versions, and the parameters.

    The parameters are compared by identity and kept alive by the cache entry, so
    a freed tensor's id can never be mistaken for a new one's. None when one of them
    is an inference tensor, which has no version counter.
    """
    bn_of = {lin: bn for bn, lin in plan.merged.items()}
    meta: list = [composite, eps, stab, gamma]
    sources: list[torch.Tensor | None] = []
    for name, m in plan.linears:
        bn = bn_of.get(m)
        tensors = [m.weight, m.bias]
        if own_forward(
            m
        ):  # its weight is computed from all its parameters (timm's ScaledStdConv2d: gain)
            tensors += [
                p for n, p in m.named_parameters(recurse=False) if n not in ("weight", "bias")
            ]
        if bn is not None:
            tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        if any(t is not None and t.is_inference() for t in tensors):
            return None
        meta.append((name, id(m), id(bn), None if bn is None else bn.eps, m in probe.firsts))
        meta.extend(
            None if t is None else (t._version, t.device, t.dtype, tuple(t.shape)) for t in tensors
        )
        sources.extend(tensors)
    return tuple(meta), sources


def _cached_rules(
    core: nn.Module,
    plan: LayerPlan,
    probe: InputProbe,
    composite: str,
    eps: float,
    stab: float,
    gamma: float,
) -> list[LayerRule]:
    key = _rules_key(plan, probe, composite, eps, stab, gamma)
    if key is None:  # tensors made under torch.inference_mode(): no version counter to key on
        return _fast_rules(plan, probe, composite, eps, stab, gamma)
    meta, sources = key
    hit = _RULES.get(core)
    if (
        hit is not None
        and hit[0] == meta
        and len(hit[1]) == len(sources)
        and all(a is b for a, b in zip(hit[1], sources, strict=True))
    ):
        return hit[2]
    rules = _fast_rules(plan, probe, composite, eps, stab, gamma)
    _RULES[core] = (meta, sources, rules)
    return rules


def _zennit_composite(
    core: nn.Module,
    composite: str,
    eps: float,
    stab: float,
    gamma: float,
    bounds: dict[str, torch.Tensor],
) -> Composite:
    canonizers = [ExactMergeBatchNorm()]
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in core.modules()):
        # zennit's ResNetCanonizer, with the exact BatchNorm merge
        blocks = [ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()]
        canonizers = [CompositeCanonizer([ExactMergeBatchNorm(), *blocks])]
    kw = {"epsilon": eps, "stabilizer": stab, "canonizers": canonizers}
    if composite == "epsilon":
        return EpsilonComposite(**kw)
    if composite == "epsilon_plus":
        return EpsilonPlus(**kw)
    if composite == "epsilon_plus_flat":
        return EpsilonPlusFlat(**kw)
    if composite == "epsilon_alpha2_beta1":
        return EpsilonAlpha2Beta1(**kw)
    return EpsilonGammaBox(low=bounds["low"], high=bounds["high"], gamma=gamma, **kw)


def _choose_backend(backend: str, plan: LayerPlan, composite: str) -> str:
    conv = list(plan.conv_blockers)
    if composite == "epsilon_gamma_box":
        first_conv = next((n for n, m in plan.linears if isinstance(m, _CONV)), None)
        if first_conv is not None and first_conv != plan.linears[0][0]:
            conv.append(f"the box rule's first conv '{first_conv}' is not the first layer")
    if backend == "auto":
        if conv:
            backend = "zennit"
        elif plan.fast_blockers or plan.general_only:
            backend = "general"
        else:
            backend = "fast"
    if backend in ("fast", "general") and conv:
        raise AttributionError(
            f"the {backend} LRP backend cannot run this model: {'; '.join(conv)}; use backend='zennit'"
            + (
                " (which has no rules for this model's modern layers either: use another method)"
                if plan.general_only
                else ""
            )
        )
    if backend == "fast":
        plan.refuse_general_only("fast")
        if plan.fast_blockers:
            raise AttributionError(
                f"the fast LRP backend cannot run this model: {'; '.join(plan.fast_blockers)}; "
                "use backend='general' or 'auto'"
            )
    if backend == "zennit":
        plan.refuse_general_only("zennit")
        if plan.zennit_blockers:
            raise AttributionError(
                f"the zennit LRP backend cannot run this model: {'; '.join(plan.zennit_blockers)}; "
                "use backend='general' or 'auto'"
            )
    return backend


def _merge_batchnorms(
    core: nn.Module, plan: LayerPlan, xin: torch.Tensor, backend: str, chosen: str
) -> str:
    """Merge each BatchNorm into the layer whose output it alone reads; the backend that can run that.

    The fast backend pairs a BatchNorm with the layer registered before it. Where the
    forward pass shows otherwise (DenseNet's BatchNorms read concatenations; MaxViT's
    ``pre_norm`` reads a conv output that its shortcut reads too, and merging there
    would feed the shortcut normalized values), ``auto`` takes the general backend and
    an explicit ``fast`` is refused: zennit's registration-order merge, which the fast
    backend reproduces, would change the model's outputs there.
    """
    pairs = pair_batchnorms(core, plan, xin)
    wrong = (
        [bn for bn, lin in plan.merged.items() if pairs.get(bn) is not lin]
        if chosen == "fast"
        else []
    )
    if wrong:
        names = {m: n for n, m in core.named_modules()}
        if backend == "fast":
            raise AttributionError(
                f"the fast LRP backend cannot run this model: BatchNorm '{names[wrong[0]]}' does not alone read "
                "the output of the layer registered before it, so merging it there would change the "
                "model's outputs; use backend='general' or 'auto'"
            )
        chosen = "general"
    plan.merged = dict(pairs)
    return chosen


# ------------------------------------------------------------------ the explainer
@register("lrp")
def lrp(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    composite: str = "epsilon_plus_flat",
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
    gamma: float = 0.25,
    low: float | torch.Tensor = 0.0,
    high: float | torch.Tensor = 1.0,
    backend: str = "auto",
    passthrough: tuple[type, ...] = (),
    max_batch: int | None = None,
) -> torch.Tensor:
    """LRP relevance of the target logit, summed over channels.

    Args:
        model: the classifier (optionally wrapped in ``audit.models.Normalized``).
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax).
        composite: one of :data:`COMPOSITES`.
        epsilon: the epsilon rule's stabilizer (absolute, as zennit's, where a layer's largest
            activation in a row is at least ``2**-10``; below, it shrinks with the activations:
            see :func:`audit.methods._lrp_fast.stabilizer`).
        stabilizer: stabilizer of the other rules (the same way).
        gamma: the Gamma rule's parameter (``epsilon_gamma_box``).
        low: lowest input value in display space (number, per channel, or per pixel).
        high: highest input value in display space.
        backend: ``"auto"``, ``"fast"``, ``"general"``, ``"graph"`` or ``"zennit"`` (see the module
            docstring).
        passthrough: extra parameter-free layer types whose gradient routes relevance.
        max_batch: chunk the batch to bound memory.

    Returns:
        Signed maps ``[N, 1, H, W]``; with ``epsilon`` on a bias-free ReLU network they
        sum to the target logit.
    """
    if composite not in COMPOSITES:
        raise AttributionError(
            f"unknown LRP composite {composite!r}; choose one of {', '.join(COMPOSITES)}"
        )
    if backend not in BACKENDS:
        raise AttributionError(
            f"unknown LRP backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    for key, value in (("epsilon", epsilon), ("stabilizer", stabilizer), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise AttributionError(f"{key} must be a number >= 0; got {value!r}")
    core, wrappers = _unwrap(model)
    bounds: dict[str, torch.Tensor] = {}
    if composite == "epsilon_gamma_box":  # only the box rule reads them (making them syncs a GPU)
        lo, hi = _bound(low, "low", inputs, wrappers), _bound(high, "high", inputs, wrappers)
        if not bool((lo <= hi).all()):
            raise AttributionError(f"low must not exceed high; got low={low!r}, high={high!r}")
        bounds = {"low": lo, "high": hi}
    eps, stab = float(epsilon), float(stabilizer)
    if _graph_backend(backend, core):
        settings = _Settings(composite, eps, stab, float(gamma), bounds)
        return _graph_lrp(core, wrappers, inputs, target, settings, max_batch)
    plan = inspect_layers(core, passthrough)
    chosen = _choose_backend(backend, plan, composite)
    if chosen in ("fast", "general"):
        chosen = _merge_batchnorms(core, plan, _normalize(inputs, wrappers), backend, chosen)
    if chosen in ("fast", "general"):
        probe = _input_probe(core, plan, _normalize(inputs, wrappers))
        rules = _cached_rules(core, plan, probe, composite, eps, stab, float(gamma))
        pads = {m: call.pads for m, call in probe.calls.items() if call.pads}
        engine = FastLRP(core, plan, rules, stab, bounds, pads)
        mode = RelevanceMode(eps) if chosen == "general" else nullcontext()

        def one(x: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
            xin = _normalize(x, wrappers).detach().requires_grad_(True)
            with engine.forward_pass(xin):
                with mode:
                    logits = core(xin)
                seed = _one_hot(logits, targets, rows)  # times the output below: relevance = logit
                (rel,) = torch.autograd.grad(logits, xin, seed)
            return rel.sum(dim=1, keepdim=True)

        with engine.installed(), fixed_gates(core) if chosen == "general" else nullcontext():
            maps = map_chunks(inputs, target, max_batch, one)
            if engine.recheck():  # a layer assumed a non-negative input and got a negative one
                maps = map_chunks(inputs, target, max_batch, one)
            return maps

    comp = _zennit_composite(core, composite, eps, stab, float(gamma), bounds)

    def one_zennit(x: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
        xin = _normalize(x, wrappers).detach().requires_grad_(True)
        logits = core(xin)
        seed = _one_hot(logits, targets, rows) * logits.detach()
        (rel,) = torch.autograd.grad(logits, xin, seed)
        return rel.sum(dim=1, keepdim=True)

    with comp.context(core):
        return map_chunks(inputs, target, max_batch, one_zennit)


#: model -> (module count, input shape, probe) of a model whose layers all use the standard
#: forward: its probe holds only the layers that read the input, a matter of structure
_PROBES: weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[int, ...], InputProbe]] = (
    weakref.WeakKeyDictionary()
)


def _input_probe(core: nn.Module, plan: LayerPlan, xin: torch.Tensor) -> InputProbe:
    """:func:`probe_inputs`, cached per model and input shape unless a layer has its own forward
    (whose weight and padding are read again on every call: they follow the parameters and the size)."""
    count, shape = sum(1 for _ in core.modules()), tuple(xin.shape[1:])
    hit = _PROBES.get(core)
    if hit is not None and hit[:2] == (count, shape):
        return hit[2]
    probe = probe_inputs(core, plan, xin.detach())
    if not probe.calls and not any(own_forward(m) for _, m in plan.linears):
        _PROBES[core] = (count, shape, probe)
    return probe


def _graph_backend(backend: str, core: nn.Module) -> bool:
    """Whether ``core`` gets the graph backend; refuses a backend that cannot run it."""
    exported = is_exported(core)
    if backend == "graph" and not exported:
        raise AttributionError(
            f"backend='graph' explains torch.export programs; got a {type(core).__name__}, not an "
            "exported module: use backend='auto'"
        )
    if exported and backend not in ("auto", "graph"):
        raise AttributionError(
            f"the {backend} LRP backend cannot run an exported program ({type(core).__name__}: its "
            "children hold aten calls, not layers); use backend='graph' or 'auto'"
        )
    return exported


@dataclass(frozen=True)
class _Settings:
    composite: str
    eps: float
    stab: float
    gamma: float
    bounds: dict[str, torch.Tensor]


def _graph_engine(
    core: nn.Module, xin: torch.Tensor, s: _Settings
) -> tuple[FastLRP, GraphRelevanceMode]:
    """The recorded plan's rules (the eager table's) and the mode that places them on the graph."""
    gplan = record(core, xin)
    layers = gplan.layers
    if s.composite == "epsilon_gamma_box":
        first_conv = next((n for n, m in layers.linears if isinstance(m, _CONV)), None)
        if first_conv is not None and first_conv != layers.linears[0][0]:
            raise AttributionError(
                f"the box rule's first conv '{first_conv}' is not the graph's first layer "
                f"'{layers.linears[0][0]}'; use another composite"
            )
    # the graph's first layer is the one its recorded order starts with
    first = InputProbe(frozenset({layers.linears[0][1]}), {})
    rules = _fast_rules(layers, first, s.composite, s.eps, s.stab, s.gamma)
    engine = FastLRP(core, layers, rules, s.stab, s.bounds)
    return engine, GraphRelevanceMode(gplan, engine, rules, s.eps)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with its last row repeated up to ``rows`` rows (a fixed-batch program's chunk)."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])


def _graph_lrp(
    core: nn.Module,
    wrappers: list[Normalized],
    inputs: torch.Tensor,
    target: TargetLike,
    s: _Settings,
    max_batch: int | None,
) -> torch.Tensor:
    batch = fixed_batch(core)
    if batch is not None:
        max_batch = batch  # the program asserts its batch size: that many rows per pass
    first = _normalize(inputs[: batch or 1], wrappers)
    engine, mode = _graph_engine(core, _pad_rows(first, batch) if batch else first, s)

    def one(x: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
        n = x.shape[0]
        xin = _normalize(x, wrappers)
        xin = (_pad_rows(xin, batch) if batch else xin).detach().requires_grad_(True)
        with engine.forward_pass(xin):
            mode.start()
            with mode:
                logits = core(xin)
            seed = torch.zeros_like(logits)
            seed[:n] = _one_hot(logits[:n], targets, rows)
            (rel,) = torch.autograd.grad(logits, xin, seed)
        return rel[:n].sum(dim=1, keepdim=True)

    with node_metadata(core):  # rules that depend on the module a call was traced in
        maps = map_chunks(inputs, target, max_batch, one)
        if engine.recheck():  # a layer assumed a non-negative input and got a negative one
            maps = map_chunks(inputs, target, max_batch, one)
    return maps


def lrp_rules(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    composite: str = "epsilon_plus_flat",
    backend: str = "auto",
    passthrough: tuple[type, ...] = (),
) -> dict:
    """Which backend and rules :func:`lrp` applies to ``model`` (one forward pass, nothing kept).

    Returns:
        ``{"backend", "operation_rules", "batchnorm_merged", "batchnorm_unmerged",
        "fixed_gates"}``: the operation rules the general backend applied (e.g.
        ``"identity: gelu"``, ``"attention: multi_head_attention_forward"``), how many
        BatchNorms were folded into their conv/linear layer, the names of those that
        were not (they get the epsilon rule on their affine map) and how many
        squeeze-excitation gates were held fixed.
    """
    if backend not in BACKENDS:
        raise AttributionError(
            f"unknown LRP backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    with preserved(model, freeze=True):
        x = prepare_inputs(model, inputs)
        core, wrappers = _unwrap(model)
        if _graph_backend(backend, core):
            return _graph_rules(core, _normalize(x, wrappers), composite)
        plan = inspect_layers(core, passthrough)
        chosen = _choose_backend(backend, plan, composite)
        xin = _normalize(x, wrappers)
        if chosen in ("fast", "general"):
            chosen = _merge_batchnorms(core, plan, xin, backend, chosen)
        names = {m: n for n, m in core.named_modules()}
        info = {
            "backend": chosen,
            "operation_rules": [],
            "batchnorm_merged": len(plan.merged),
            "batchnorm_unmerged": sorted(
                names[m]
                for m in core.modules()
                if isinstance(m, BATCHNORM) and m not in plan.merged
            ),
            "fixed_gates": 0,
        }
        if chosen != "general":
            return info
        mode = RelevanceMode(1e-6)
        with fixed_gates(core) as gates, torch.enable_grad(), mode:
            core(xin.detach().requires_grad_(True))
        info["operation_rules"] = sorted(mode.used)
        info["fixed_gates"] = gates
        return info


def _graph_rules(core: nn.Module, xin: torch.Tensor, composite: str) -> dict:
    batch = fixed_batch(core)
    xin = _pad_rows(xin[: batch or 1], batch) if batch else xin[:1]
    bounds = {"low": xin.amin(), "high": xin.amax()}
    engine, mode = _graph_engine(core, xin, _Settings(composite, 1e-6, 1e-6, 0.25, bounds))
    xin = xin.detach().requires_grad_(True)
    with engine.forward_pass(xin), torch.enable_grad(), node_metadata(core):
        mode.start()
        with mode:
            core(xin)
    layers = mode.plan.layers
    return {
        "backend": "graph",
        "operation_rules": sorted(mode.used),
        "batchnorm_merged": len(layers.merged),
        "batchnorm_unmerged": sorted(mode.plan.unmerged),
        "fixed_gates": mode.fixed_gates,
        "fixed_batch": batch,
    }


def _one_hot(logits: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
    t = target_indices(logits, targets, rows)  # checks deferred on CUDA (no sync mid-pass)
    return torch.zeros_like(logits).scatter_(1, t[:, None], 1.0)
