"""LRP on ``torch.export`` graphs: the eager backends' rules placed on aten operations.

An exported program (``torch.export.export(model, (x,))``, MLflow 3's default format)
runs as a graph of aten calls: ``ep.module()`` is a flat ``GraphModule``,
``torch.export.unflatten(ep)`` keeps the module tree but its children hold aten calls,
not ``nn.Conv2d``. No module-based explainer sees a layer there. This backend works on
the calls themselves, so it explains every model that exports, whatever its Python code.

How: a :class:`~torch.overrides.TorchFunctionMode` sees each aten call of the forward
pass with its real tensors and gives it the rule the eager backends give the same
operation (the rule table of ``_lrp_fast`` and ``_lrp_general``, in aten names). Where
the eager rule depends on the module that runs an operation, the call's module comes
from its graph node (``nn_module_stack``, see :func:`node_metadata`):

=====================================  ================================================
aten operation                         rule (as in the eager backends)
=====================================  ================================================
``conv*``, ``convolution``, ``linear``  a conv/linear module's own call: the composite's
``addmm``/``mm`` with a constant        layer rule (``_lrp_fast``'s
weight                                  :class:`~audit.methods._lrp_fast.FastLRP`: Flat
                                        or ZBox on the first layer, ZPlus, Gamma,
                                        alpha-beta, epsilon), the first layer being the
                                        first one the graph runs; called with another
                                        module's weight (``F.linear`` in attention):
                                        the gradient
``batch_norm``,                         merged into the conv/linear call whose output it
``_native_batch_norm_legit_no_training`` reads (when it is that output's only reader);
                                        otherwise its gradient (epsilon on the affine map)
``avg_pool*``, ``adaptive_avg_pool*``   in a pooling module: zennit's Norm rule; called
                                        functionally (``F.adaptive_avg_pool2d`` in a
                                        forward): the gradient
``add`` of two input-dependent tensors  in torchvision's ResNet ``BasicBlock`` /
                                        ``Bottleneck``: zennit's stabilized Norm rule
                                        (its ResNet canonizer's); elsewhere the gradient
                                        (the Norm rule unstabilized)
GELU, SiLU, Hardswish, sigmoid, ...     identity rule (AttnLRP)
``mul``/``matmul``/``bmm`` of two       uniform rule (half to each); a ``mul`` by a
input-dependent tensors                 broadcast sigmoid/hardsigmoid gate holds the gate
                                        fixed (squeeze-excitation, as ``fixed_gates``)
``layer_norm``, ``group_norm``, ...     the divisor held constant
``linalg_vector_norm`` (``F.normalize``) held constant (computed without gradient)
``scaled_dot_product_attention``        decomposed, each product under the uniform rule
``a / b`` with ``b`` input-dependent    ``1 / b`` a fixed multiplier
``softmax``, reshapes, ``cat``, max     the gradient (these *are* the rules)
pooling, ReLU, dropout in eval
=====================================  ================================================

Any other aten operation on an input-dependent tensor is refused with its name.

Which call merges with which BatchNorm needs to see the whole pass: one recording pass
(one chunk, cached per model and input shape) lists the conv/linear/BatchNorm calls in
order, with the tensors they read; the LRP pass then meets the same calls in the same
order (a graph has no control flow) and checks that it does. Parameters and lifted
constants are read from the call's arguments, so constant folding, inlined BatchNorms
and parameters stored as graph attributes or passed as inputs all look the same.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import traceback as fx_traceback
from torch.overrides import TorchFunctionMode

from audit.engine.model import AttributionError
from audit.methods._lrp_fast import RESIDUAL_BLOCKS, FastLRP, LayerRule
from audit.methods._lrp_general import (
    UNARY_NAMES,
    group_norm_rule,
    identity_rule,
    layer_norm_rule,
    rms_norm_rule,
    sdpa_rule,
    uniform_rule,
)
from audit.methods._lrp_layers import AVGPOOL, LayerPlan, flat_args, needs_grad

__all__ = [
    "is_exported",
    "fixed_batch",
    "GraphPlan",
    "record",
    "GraphRelevanceMode",
    "node_metadata",
    "WORKING_METHODS",
]

#: what still explains a graph this backend refuses
WORKING_METHODS = "saliency, input_x_gradient, integrated_gradients, gradcam, occlusion, rise"

_CONV = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "_convolution"})
_LINEAR = frozenset({"linear", "addmm", "mm"})
_BATCHNORM = frozenset({"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"})
_IDENTITY = frozenset(
    {n for n in UNARY_NAMES if not n.startswith("__")} | {"hardtanh", "sigmoid", "hardsigmoid"}
)
_GATES = frozenset({"sigmoid", "hardsigmoid"})
_AVGPOOL = frozenset(
    {
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "_adaptive_avg_pool2d",
        "_adaptive_avg_pool3d",
    }
)
_PRODUCT = frozenset({"mul", "matmul", "bmm", "mm", "einsum"})
# linear maps, routing and homogeneous maps: their gradient is the LRP rule
_GRADIENT = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "permute",
        "transpose",
        "t",
        "flatten",
        "unflatten",
        "contiguous",
        "clone",
        "expand",
        "expand_as",
        "squeeze",
        "unsqueeze",
        "select",
        "slice",
        "cat",
        "stack",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "narrow",
        "roll",
        "constant_pad_nd",
        "pad",
        "index",
        "index_select",
        "dropout",
        "native_dropout",
        "feature_dropout",
        "alpha_dropout",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool2d_with_indices",
        "max_pool3d_with_indices",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "relu",
        "leaky_relu",
        "mean",
        "sum",
        "alias",
        "_to_copy",
        "to",
        "type_as",
        "channel_shuffle",
        "native_channel_shuffle",
        "pixel_shuffle",
        "pixel_unshuffle",
        "repeat",
        "masked_fill",
        "neg",
        "sub",
        "rsub",
        "view_as",
        "reshape_as",
        "movedim",
        "swapaxes",
        "detach",
        "softmax",
        "_softmax",
        "_safe_softmax",
        "lift_fresh_copy",
        "copy",
        "squeeze_copy",
        "unsqueeze_copy",
        "view_copy",
        "permute_copy",
        "_assert_tensor_metadata",
        "zeros_like",
        "ones_like",
        "empty_like",
        "new_zeros",
        "new_ones",
        "new_empty",
        "sym_size",
    }
)


# statistics that normalize (F.normalize's norm): held constant, as the eager backend holds them
_CONSTANT = frozenset({"linalg_vector_norm", "norm", "frobenius_norm"})


def _qualified(classes: tuple[type, ...]) -> frozenset[str]:
    """The names ``torch.export`` records for these classes in a node's ``nn_module_stack``."""
    return frozenset(f"{c.__module__}.{c.__qualname__}" for c in classes)


_RESIDUAL_BLOCKS = _qualified(RESIDUAL_BLOCKS)
_AVGPOOL_MODULES = _qualified(AVGPOOL)


def _base(func: torch._ops.OpOverload) -> str:
    """``aten.add_.Tensor`` -> ``add``: the operation's name without the in-place mark."""
    name = func.overloadpacket.__name__
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _out_of_place(func: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """The out-of-place overload of an in-place aten operation (``silu_`` -> ``silu``)."""
    name = func.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return func
    return getattr(getattr(torch.ops.aten, name[:-1]), func._overloadname)


# ------------------------------------------------------------------ which models
def is_exported(model: nn.Module) -> bool:
    """Whether ``model`` is an exported program's module (unflattened, or ``ep.module()``)."""
    from torch.export.unflatten import UnflattenedModule

    if isinstance(model, UnflattenedModule):
        return True
    if not isinstance(model, torch.fx.GraphModule):
        return False
    return any(isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes)


def fixed_batch(model: nn.Module) -> int | None:
    """The batch size an exported graph was specialized to (None: any batch size)."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return None
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is not None and len(shape) > 0:
                return shape[0] if isinstance(shape[0], int) else None
    return None


# ------------------------------------------------------------------ which module a call belongs to
def _interpreted(model: torch.fx.GraphModule) -> Callable[..., Any]:
    def forward(*args: Any) -> Any:
        return torch.fx.Interpreter(model).run(*args)

    return forward


@contextmanager
def node_metadata(model: nn.Module) -> Iterator[None]:
    """Inside, every aten call of ``model`` sees its graph node's metadata.

    The eager backends give a few rules by module class (zennit's stabilized Norm rule to
    the residual sum of torchvision's ResNet blocks and to average-pooling *modules*,
    the gradient to every other sum and to functional pooling). An exported program has
    no modules, but ``torch.export`` records on each node the module stack it was traced
    in (``nn_module_stack``: path and class name, kept by ``torch.export.save``/``load``
    and by ``unflatten``). ``torch.fx.Interpreter`` publishes the running node's metadata
    (``fx_traceback.get_current_meta()``) under ``preserve_node_meta``: the children of
    ``torch.export.unflatten`` run through it, and ``ep.module()`` (a ``GraphModule``)
    is run through it here instead of its generated code (same aten calls, same order;
    its pre-hooks still run). Restored on exit.
    """
    touched: list[tuple[nn.Module, str, object]] = []
    try:
        for m in model.modules():
            # torch's per-module switch between its Interpreter and generated code (unflatten)
            if getattr(m, "_run_with_interpreter", True) is False:
                touched.append((m, "_run_with_interpreter", False))
                m._run_with_interpreter = True
        if isinstance(model, torch.fx.GraphModule):
            touched.append((model, "forward", model.__dict__.get("forward")))
            model.forward = _interpreted(model)
        with fx_traceback.preserve_node_meta():
            yield
    finally:
        for m, attr, previous in reversed(touched):
            if attr == "forward" and previous is None:
                del m.forward
            else:
                setattr(m, attr, previous)


def _innermost() -> tuple[str, str] | None:
    """``(path, class name)`` of the innermost module the running aten call was traced in (None: unknown)."""
    stack = fx_traceback.get_current_meta().get("nn_module_stack")
    if not isinstance(stack, dict) or not stack:
        return None
    last = list(stack.values())[-1]
    ok = isinstance(last, tuple) and len(last) == 2 and all(isinstance(v, str) for v in last)
    return last if ok else None


def _traced_in() -> str | None:
    """The class name of the innermost module the running aten call was traced in (None: unknown)."""
    found = _innermost()
    return None if found is None else found[1]


# ------------------------------------------------------------------ the recording pass
@dataclass
class GraphPlan:
    """The conv/linear/BatchNorm calls of one forward pass, as layers the eager rules understand.

    Attributes:
        layers: a :class:`LayerPlan` of stand-in modules (``nn.Conv2d``/``nn.Linear``/
            ``nn.BatchNorm2d`` on the meta device holding the call's own tensors), so that
            the eager backends' rule table builds the rules.
        calls: per call, in order: ``(aten name, weight tensor, stand-in module)``.
        unmerged: names of the BatchNorm calls that stay (their gradient is their rule).
        functional: names of the conv/linear calls made with another module's weight (attention
            projections): their gradient is their rule, as in the eager backends.
    """

    layers: LayerPlan
    calls: list[tuple[str, torch.Tensor, nn.Module]] = field(default_factory=list)
    unmerged: list[str] = field(default_factory=list)
    functional: list[str] = field(default_factory=list)


def _tensor_names(model: nn.Module) -> dict[int, str]:
    names = {id(t): n for n, t in model.named_buffers(remove_duplicate=False)}
    names.update({id(t): n for n, t in model.named_parameters(remove_duplicate=False)})
    return names


def _owner(names: dict[int, str], t: torch.Tensor, suffix: str, fallback: str) -> str:
    name = names.get(id(t))
    if name is None:
        return fallback
    return name[: -len(suffix)] if name.endswith(suffix) else name


def _as_meta_parameter(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


def _conv_shell(name: str, args: tuple, kwargs: dict, op: str) -> nn.Module:
    a = list(args) + [None] * 9
    weight, bias = a[1], a[2]
    if op in ("convolution", "_convolution"):
        stride, padding, dilation, transposed, groups = a[3], a[4], a[5], a[6], a[8]
        if transposed:
            raise AttributionError(
                f"the graph LRP backend has no rule for the transposed convolution '{name}' "
                f"(aten.{op}); use one of {WORKING_METHODS}"
            )
    else:
        stride = a[3] if a[3] is not None else kwargs.get("stride", 1)
        padding = a[4] if a[4] is not None else kwargs.get("padding", 0)
        dilation = a[5] if a[5] is not None else kwargs.get("dilation", 1)
        groups = a[6] if a[6] is not None else kwargs.get("groups", 1)
    if isinstance(padding, str) and padding != "valid":
        raise AttributionError(
            f"the graph LRP backend cannot transpose conv '{name}' with padding={padding!r} "
            f"(aten.{op}); use one of {WORKING_METHODS}"
        )
    d = weight.ndim - 2
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
    shell = cls(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias is not None,
        device="meta",
    )
    shell.weight, shell.bias = _as_meta_parameter(weight), _as_meta_parameter(bias)
    return shell


_LinearParts = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]


def _linear_parts(op: str, args: tuple, kwargs: dict) -> _LinearParts | None:
    """``(input, weight [out, in], bias, the weight as the graph holds it)`` of a linear call
    with a constant weight, else None."""
    if op == "linear":
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return (
            (args[0], args[1], bias, args[1])
            if not needs_grad(args[1]) and not needs_grad(bias)
            else None
        )
    if op == "addmm":
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
            return None
        bias, x, wt = args[0], args[1], args[2]
        ok = not needs_grad(wt) and not needs_grad(bias) and bias.ndim == 1
        return (x, wt.t(), bias, wt) if ok else None
    x, wt = args[0], args[1]  # mm
    return (x, wt.t(), None, wt) if not needs_grad(wt) else None


def _linear_shell(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    shell = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    shell.weight, shell.bias = _as_meta_parameter(weight), _as_meta_parameter(bias)
    return shell


def _bn_parts(op: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    a = list(args) + [None] * 9
    if op == "_native_batch_norm_legit_no_training":
        training, eps = False, a[6] if a[6] is not None else kwargs.get("eps", 1e-5)
    else:
        training, eps = a[5], a[7] if a[7] is not None else kwargs.get("eps", 1e-5)
    parts = {"weight": a[1], "bias": a[2], "running_mean": a[3], "running_var": a[4], "eps": eps}
    if training or parts["running_mean"] is None:
        raise AttributionError(
            f"the graph normalizes by each batch's own statistics (aten.{op} in training mode); "
            f"export the model in eval mode (model.eval()) or use one of {WORKING_METHODS}"
        )
    return a[0], parts


def _bn_shell(x: torch.Tensor, parts: dict[str, Any]) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(
        x.ndim, nn.BatchNorm2d
    )
    shell = cls(parts["running_mean"].shape[0], eps=float(parts["eps"]), device="meta")
    shell.running_mean = parts["running_mean"].detach()
    shell.running_var = parts["running_var"].detach()
    shell.weight, shell.bias = (
        _as_meta_parameter(parts["weight"]),
        _as_meta_parameter(parts["bias"]),
    )
    return shell


class _Recorder(TorchFunctionMode):
    """Lists the conv/linear/BatchNorm calls on input-dependent tensors and who reads each output."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.calls: list[tuple[str, torch.Tensor, nn.Module]] = []
        self.reads: list[list[int]] = []  # per call: the tensor ids it reads
        self.made: dict[int, int] = {}  # output id -> index of the layer call that made it
        self.readers: dict[int, int] = {}  # layer call index -> how many calls read its output
        self.bn_input: dict[int, int] = {}  # BatchNorm call index -> layer call index of its input
        self.keep: list[object] = []  # outputs stay alive during the pass: ids are not reused
        self.used_names: set[str] = set()
        self.functional: set[int] = set()  # conv/linear calls made with another module's weight

    def _unique(self, name: str) -> str:
        base, k = name, 1
        while name in self.used_names:
            k += 1
            name = f"{base}#{k}"
        self.used_names.add(name)
        return name

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(func, torch._ops.OpOverload):
            return out
        for a in flat_args(args, kwargs):
            if isinstance(a, torch.Tensor) and id(a) in self.made:
                self.readers[self.made[id(a)]] = self.readers.get(self.made[id(a)], 0) + 1
        op = _base(func)
        if op in _CONV and needs_grad(args[0]):
            n = len(self.calls)
            name = self._unique(_owner(self.names, args[1], ".weight", f"{op}#{n}"))
            self._made(out, n, (op, args[1], _conv_shell(name, args, kwargs, op)), name)
        elif op in _LINEAR and needs_grad(args[0] if op != "addmm" else args[1]):
            parts = _linear_parts(op, args, kwargs)
            if parts is not None:
                n = len(self.calls)
                name = self._unique(_owner(self.names, parts[3], ".weight", f"{op}#{n}"))
                self._made(out, n, (op, parts[3], _linear_shell(parts[1], parts[2])), name)
        elif op in _BATCHNORM and needs_grad(args[0]):
            x, parts = _bn_parts(op, args, kwargs)
            n = len(self.calls)
            name = self._unique(
                _owner(self.names, parts["running_mean"], ".running_mean", f"{op}#{n}")
            )
            shell = _bn_shell(x, parts)
            shell._lrp_name = name  # noqa: SLF001 (a stand-in module of ours)
            self.calls.append((op, parts["running_mean"], shell))
            if id(x) in self.made:
                self.bn_input[n] = self.made[id(x)]
            self.keep.append(out)
        return out

    def _made(
        self, out: torch.Tensor, n: int, call: tuple[str, torch.Tensor, nn.Module], name: str
    ) -> None:
        call[2]._lrp_name = name  # noqa: SLF001 (a stand-in module of ours)
        self.calls.append(call)
        if self._functional(call[1]):
            self.functional.add(n)
        else:
            self.made[id(out)] = n  # a layer: a BatchNorm may merge into it
        self.keep.append(out)

    def _functional(self, weight: torch.Tensor) -> bool:
        """Whether the running conv/linear call applies a weight that is not its own module's.

        The eager backends give the composite's layer rule to a conv/linear *module*'s own
        call and the gradient to ``F.linear``/``F.conv2d`` called with some module's weight
        inside another module's forward (torchvision's attention in ViT, Swin, MaxViT: the
        projections; the epsilon rule without its stabilizer). The call's module stack and
        the weight's name tell the two apart here: a module's own call runs in that module
        with its ``weight``. Unknown (no metadata, or an unnamed weight): a layer.
        """
        where, name = _innermost(), self.names.get(id(weight))
        if where is None or name is None:
            return False
        return name != (f"{where[0]}.weight" if where[0] else "weight")


#: model -> (key, plan): the recording, per input shape and parameter set
_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, GraphPlan]] = weakref.WeakKeyDictionary()


def _plan_key(model: nn.Module, x: torch.Tensor) -> tuple:
    tensors = [*model.parameters(), *model.buffers()]
    return (tuple(x.shape[1:]), x.dtype, x.device, tuple(id(t) for t in tensors))


def record(model: nn.Module, x: torch.Tensor) -> GraphPlan:
    """The :class:`GraphPlan` of ``model`` on inputs shaped like ``x`` (one pass, cached).

    Args:
        model: the exported module (parameters frozen).
        x: one chunk of (normalized) inputs, as the model will receive them.
    """
    key = _plan_key(model, x)
    hit = _PLANS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    rec = _Recorder(_tensor_names(model))
    with torch.enable_grad(), node_metadata(model), rec:
        model(x.detach().requires_grad_(True))
    plan = GraphPlan(LayerPlan())
    plan.calls = rec.calls
    merged_layers = set()
    for n, (op, _w, shell) in enumerate(rec.calls):
        if op in _BATCHNORM:
            source = rec.bn_input.get(n)
            if source is not None and rec.readers.get(source) == 1 and source not in merged_layers:
                plan.layers.merged[shell] = rec.calls[source][2]
                merged_layers.add(source)
            else:
                plan.unmerged.append(shell._lrp_name)
        elif n in rec.functional:
            plan.functional.append(shell._lrp_name)
        else:
            plan.layers.linears.append((shell._lrp_name, shell))
    if not plan.layers.linears:
        raise AttributionError(
            "LRP needs at least one conv or linear operation on the input; the exported graph runs none"
        )
    _PLANS[model] = (key, plan)
    return plan


# ------------------------------------------------------------------ the LRP pass
class GraphRelevanceMode(TorchFunctionMode):
    """Puts the rule of each aten operation on it (the table in the module docstring).

    Args:
        plan: the recording of this model.
        engine: the layer rules (conv/linear/BatchNorm, Norm rules) of this call.
        rules: the engine's rules, one per conv/linear stand-in module.
        eps: the identity rule's stabilizer.
    """

    def __init__(
        self, plan: GraphPlan, engine: FastLRP, rules: list[LayerRule], eps: float
    ) -> None:
        super().__init__()
        self.plan, self.engine, self.eps = plan, engine, eps
        self.rule_of = {id(r.module): r for r in rules}
        self.merged_into = {id(bn): self.rule_of[id(lin)] for bn, lin in plan.layers.merged.items()}
        self.index = 0
        self.gates: dict[int, torch.Tensor] = {}
        #: the rules applied so far, e.g. ``"identity: gelu"`` (for ``lrp_rules``)
        self.used: set[str] = set()
        #: how many products held a sigmoid gate fixed
        self.fixed_gates = 0
        self._table: dict[str, Callable[[Any, str, tuple, dict], Any]] = {}
        for names, handler in (
            (_CONV, self._layer),
            (_BATCHNORM, self._batchnorm),
            (_IDENTITY, self._identity),
            (_AVGPOOL, self._avgpool),
            (_PRODUCT, self._product),
            (("div",), self._divide),
            (("add",), self._add),
            (_CONSTANT, self._constant),
            (("layer_norm", "native_layer_norm"), self._layer_norm),
            (("group_norm", "native_group_norm"), self._group_norm),
            (("rms_norm",), self._rms_norm),
            (("scaled_dot_product_attention",), self._attention),
        ):
            for name in names:
                self._table[name] = handler
        for name in ("linear", "addmm", "mm"):
            self._table[name] = self._layer

    def start(self) -> None:
        """Before each forward pass: the calls are met again from the first."""
        self.index = 0
        self.gates.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        kwargs = kwargs or {}
        if not isinstance(func, torch._ops.OpOverload) or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if not any(needs_grad(a) for a in flat_args(args, kwargs)):
            return func(*args, **kwargs)
        op = _base(func)
        handler = self._table.get(op)
        if handler is not None:
            return handler(func, op, args, kwargs)
        if op in _GRADIENT:
            if op in ("softmax", "_softmax", "_safe_softmax"):
                self.used.add("softmax: AttnLRP")
            return func(*args, **kwargs)
        raise AttributionError(
            f"the graph LRP backend has no rule for aten.{func.overloadpacket.__name__} "
            f"({func}) on an input-dependent tensor; use one of {WORKING_METHODS}"
        )

    # -------------------------------------------------------------- handlers
    def _next(self, func: Any, weight: torch.Tensor) -> nn.Module:
        if self.index >= len(self.plan.calls) or self.plan.calls[self.index][1] is not weight:
            raise AttributionError(
                f"the exported graph ran {func} at call {self.index}, which its recording pass did not "
                "see there; the graph must run the same operations for every input (no data-dependent "
                f"control flow); use one of {WORKING_METHODS}"
            )
        shell = self.plan.calls[self.index][2]
        self.index += 1
        return shell

    def _layer(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        if op in _CONV:
            x, weight = args[0], args[1]
            if not needs_grad(x):
                return func(*args, **kwargs)
        else:
            parts = _linear_parts(op, args, kwargs)
            if parts is None:  # an input-dependent weight: a product of two tensors
                return self._product(func, "mm", args, kwargs)
            x, weight = parts[0], parts[3]
            if not needs_grad(x):
                return func(*args, **kwargs)
        shell = self._next(func, weight)
        rule = self.rule_of.get(id(shell))
        if rule is None:  # a functional call with another module's weight (attention projections)
            self.used.add("gradient: functional conv/linear")
            return func(*args, **kwargs)
        return self.engine.layer(rule, x)

    def _batchnorm(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        x, parts = _bn_parts(op, args, kwargs)
        shell = self._next(func, parts["running_mean"])
        rule = self.merged_into.get(id(shell))
        if rule is None:
            return func(*args, **kwargs)
        y = self.engine.merged_batchnorm(rule, x)
        if op == "batch_norm":
            return y
        empty = y.new_empty(0)
        return (y, empty, empty)

    def _identity(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if needs_grad(a)]
        plain = _out_of_place(func)
        if len(tensors) != 1:
            return self._product(plain, op, args, kwargs)
        x = tensors[0]
        with torch.no_grad():
            y = plain(*args, **kwargs)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            return plain(*args, **kwargs)
        self.used.add(f"identity: {op}")
        out = identity_rule(x, y, self.eps)
        if op in _GATES:
            self.gates[id(out)] = out
        return out

    def _avgpool(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        owner = _traced_in()
        if owner is not None and owner not in _AVGPOOL_MODULES:
            return func(*args, **kwargs)  # functional pooling: the eager backends differentiate it
        rest = args[1:]
        self.used.add(f"norm: {op}")
        return self.engine.norm(lambda t: func(t, *rest, **kwargs), args[0])

    def _add(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        plain = _out_of_place(
            func
        )  # an in-place sum returns a new tensor: the graph reads the result
        a = args[0]
        b = args[1] if len(args) > 1 else kwargs.get("other")
        alpha = args[2] if len(args) > 2 else kwargs.get("alpha", 1)
        residual = needs_grad(a) and needs_grad(b) and alpha == 1 and a.shape == b.shape
        if residual and _traced_in() in _RESIDUAL_BLOCKS:
            self.used.add("norm: residual sum")
            return self.engine.add(a, b)
        return plain(*args, **kwargs)  # the gradient: the Norm rule for sums, unstabilized

    def _constant(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        self.used.add(f"constant: {op}")
        with torch.no_grad():
            return func(*args, **kwargs)

    def _product(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        operands = [a for a in flat_args(args, kwargs) if isinstance(a, torch.Tensor)]
        n = sum(needs_grad(a) for a in operands)
        plain = _out_of_place(func)
        if n > 2:
            raise AttributionError(
                f"the graph LRP backend has no rule for a product of {n} input-dependent factors "
                f"({func}); use one of {WORKING_METHODS}"
            )
        if n < 2:
            return plain(*args, **kwargs)
        if op == "mul":
            a, b = args[0], args[1]
            gate = self._gate(a, b)
            if gate is not None:
                self.fixed_gates += 1
                self.used.add("fixed gate: sigmoid x features")
                return plain(a.detach(), b) if gate is a else plain(a, b.detach())
        self.used.add(f"uniform: {op}")
        return uniform_rule(plain(*args, **kwargs))

    def _gate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """The factor that is a broadcast sigmoid gate (squeeze-excitation), if one is."""
        for gate, other in ((a, b), (b, a)):
            # squeeze-excitation's gate: one value per channel ([N, C, 1, ...]), broadcast over the
            # features (at a 1x1 feature map the shapes are equal: the size-1 dims still tell)
            per_channel = (
                gate.ndim > 2 and gate.ndim == other.ndim and all(d == 1 for d in gate.shape[2:])
            )
            if (
                self.gates.get(id(gate)) is gate
                and per_channel
                and gate.shape[:2] == other.shape[:2]
            ):
                return gate
        return None

    def _divide(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        numerator, divisor = args[0], args[1]
        if not needs_grad(divisor):
            return func(*args, **kwargs)
        if not needs_grad(numerator):
            raise AttributionError(
                f"the graph LRP backend has no rule for dividing a constant by an input-dependent "
                f"tensor ({func}); use one of {WORKING_METHODS}"
            )
        self.used.add("constant divisor: a / b")
        return _out_of_place(func)(numerator, divisor.detach(), *args[2:], **kwargs)

    def _layer_norm(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        a = list(args) + [None] * 5
        eps = a[4] if a[4] is not None else kwargs.get("eps", 1e-5)
        y = layer_norm_rule(a[0], a[1], a[2], a[3], eps)
        self.used.add("constant std: layer_norm")
        if op == "layer_norm":
            return y
        with torch.no_grad():
            _, mean, rstd = func(*args, **kwargs)
        return (y, mean, rstd)

    def _group_norm(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        self.used.add("constant std: group_norm")
        if op == "group_norm":
            a = list(args) + [None] * 5
            eps = a[4] if a[4] is not None else kwargs.get("eps", 1e-5)
            return group_norm_rule(a[0], a[1], a[2], a[3], eps)
        x, weight, bias, _n, _c, _hw, groups, eps = args[:8]
        y = group_norm_rule(x, groups, weight, bias, eps)
        with torch.no_grad():
            _, mean, rstd = func(*args, **kwargs)
        return (y, mean, rstd)

    def _rms_norm(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        self.used.add("constant std: rms_norm")
        return rms_norm_rule(*args, **kwargs)

    def _attention(self, func: Any, op: str, args: tuple, kwargs: dict) -> Any:
        self.used.add("attention: scaled_dot_product_attention")
        return sdpa_rule(*args, **kwargs)
