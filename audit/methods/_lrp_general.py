"""LRP for the blocks of modern networks: rules at the level of tensor operations.

The fast backend (``_lrp_fast``) gives every conv/linear *module* its rule and lets
the gradient do the rest, which is exact LRP for ReLU networks: with relevance
``R = a * g`` (activation times the quantity flowing backward), the gradient of an
addition, a concatenation, a reshape, a max pooling or a ReLU *is* an LRP rule
(Norm, pass-through, winner-take-all). ConvNeXts, EfficientNets, Swins, ViTs and
MaxViTs add operations whose gradient is not a relevance rule. This module puts the
literature's rule on each of them, at the level of the operation, so that a user's
model built from the same operations is covered without knowing its classes:

=====================================  ================================================
operation (any input-dependent use)    rule
=====================================  ================================================
element-wise nonlinearity (GELU,       identity (AttnLRP, Achtibat et al. 2024, Prop.
SiLU, Hardswish, sigmoid, tanh, exp,   3.1; zennit's Pass): ``R_x = R_y``, i.e. the
ReLU6, ... any unary map)              quantity flowing back is ``g * f(x) / x``
product of two input-dependent         uniform (AttnLRP Prop. 3.3): half of ``R_y`` to
tensors (``a * b``, ``a @ b``,         each factor: the gradient, halved
``einsum``, ``bmm``)
softmax                                the gradient times the input, which *is*
                                       AttnLRP's softmax rule ``R_x = x (R_y - s sum
                                       R_y)`` (Prop. 3.2; the rest is absorbed, as a
                                       bias absorbs relevance)
LayerNorm, GroupNorm, RMSNorm,         the divisor held constant (AttnLRP's rule for
``F.normalize``, ``a / b``             LayerNorm): the mean-centering is linear and
                                       gets the epsilon rule; ``a / b`` with ``b``
                                       input-dependent treats ``1 / b`` as a fixed
                                       multiplier
``F.scaled_dot_product_attention``,    decomposed into the above (``q @ k^T``, softmax,
``F.multi_head_attention_forward``     ``attn @ v``) so each part gets its rule
torchvision ``SqueezeExcitation``      the gate held fixed (computed without
                                       gradient): all relevance goes to the gated
                                       features, none through the gate branch
linear maps: ``F.linear`` used         the gradient: with ``R = a * g`` this is the
directly (attention projections),      epsilon rule without a stabilizer; biases and
BatchNorm not merged into a conv,      constants (class token, position embeddings,
layer scale, position embeddings,      relative position biases) absorb their share
reshape/permute/roll/pad/cat/chunk,
channel shuffle, stochastic depth and
dropout in eval (identities)
=====================================  ================================================

Conv and ``nn.Linear`` *modules* keep the composite's rules from the fast backend
(ZPlus, Flat, Gamma, box...), so on a plain ReLU network this backend computes
exactly what the fast one does (tested).

How: a :class:`~torch.overrides.TorchFunctionMode` active during the forward pass sees
every torch call and replaces the ones above with a version whose backward is the
rule (forward values unchanged). An operation whose input does not require grad
(weights, constant tables) is left alone, so the mode costs a dictionary lookup per
call.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from audit.engine.model import AttributionError
from audit.methods._lrp_fast import stabilize
from audit.methods._lrp_layers import flat_args, needs_grad

__all__ = [
    "RelevanceMode",
    "fixed_gates",
    "identity_rule",
    "uniform_rule",
    "layer_norm_rule",
    "group_norm_rule",
    "rms_norm_rule",
    "sdpa_rule",
    "UNARY_NAMES",
]


# ------------------------------------------------------------------ autograd pieces
class _IdentityRule(torch.autograd.Function):
    """Forward: ``y`` (already computed as ``f(x)``). Backward: ``g * y / x`` so that ``x * g_x = y * g``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        # x == 0 exactly gives 0 (then y * g_y is 0 for f(0) = 0; for f(0) != 0 the
        # relevance of an exactly-zero input is lost, as it is under zennit's Pass rule)
        ctx.save_for_backward(y / stabilize(x, eps))
        return y.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (ratio,) = ctx.saved_tensors
        return g * ratio, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.factor, None


def identity_rule(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``y = f(x)`` with the identity rule as its backward: ``x * g_x = y * g_y``."""
    return _IdentityRule.apply(x, y, eps)


def uniform_rule(y: torch.Tensor) -> torch.Tensor:
    """The uniform rule for a product of two input-dependent factors: each gets half."""
    return _ScaleGrad.apply(y, 0.5)


# ------------------------------------------------------------------ rules by operation
def _names(*names: str) -> list[object]:
    """Every object torch may hand the mode for these names (functions, methods, operators)."""
    found = []
    for name in names:
        for owner in (torch, torch.Tensor, torch._C.TensorBase, F, torch._C._nn, torch.special):
            obj = getattr(owner, name, None)
            if obj is not None and callable(obj):
                found.append(obj)
    return found


#: the element-wise maps that get the identity rule (also the graph backend's, by aten name)
UNARY_NAMES = (
    "gelu",
    "silu",
    "mish",
    "hardswish",
    "hardsigmoid",
    "elu",
    "celu",
    "selu",
    "softplus",
    "hardtanh",
    "relu6",
    "logsigmoid",
    "softsign",
    "tanhshrink",
    "sigmoid",
    "tanh",
    "exp",
    "exp2",
    "expm1",
    "log",
    "log1p",
    "log2",
    "sqrt",
    "rsqrt",
    "erf",
    "erfc",
    "sin",
    "cos",
    "abs",
    "reciprocal",
    "square",
    "pow",
    "__pow__",
    "__rpow__",
    "expit",
)
_UNARY = _names(*UNARY_NAMES)
_PRODUCT = _names("mul", "multiply", "__mul__", "__rmul__")
_MATMUL = _names("matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "einsum")
_DIVIDE = _names("div", "divide", "true_divide", "__truediv__", "__rtruediv__", "__rdiv__")


def _unary(func: Callable, args: tuple, kwargs: dict, eps: float) -> Any:
    tensors = [a for a in (*args, *kwargs.values()) if needs_grad(a)]
    if len(tensors) != 1:  # e.g. x ** y with both input-dependent: a product-like map
        return uniform_rule(func(*args, **kwargs)) if len(tensors) == 2 else func(*args, **kwargs)
    if kwargs.get("inplace"):
        kwargs = {**kwargs, "inplace": False}
    x = tensors[0]
    with torch.no_grad():
        y = func(*args, **kwargs)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return func(*args, **kwargs)  # not element-wise after all (e.g. a reduction)
    return identity_rule(x, y, eps)


def _product(func: Callable, args: tuple, kwargs: dict) -> Any:
    operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if func in _MATMUL and isinstance(args[0], str):  # einsum("...", a, b) or einsum("...", [a, b])
        rest = args[1:]
        operands = (
            list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        )
    n = sum(needs_grad(a) for a in operands)
    if n > 2:
        raise AttributionError(
            f"LRP has no rule for a product of {n} input-dependent factors ({_name(func)}); "
            "write it as products of two"
        )
    y = func(*args, **kwargs)
    return uniform_rule(y) if n == 2 else y


def _divide(func: Callable, args: tuple, kwargs: dict) -> Any:
    if func in _names("__rtruediv__", "__rdiv__"):  # args = (tensor divisor, numerator)
        divisor, numerator = args[0], args[1]
    else:
        numerator = args[0]
        divisor = args[1] if len(args) > 1 else kwargs.get("other")
    if not needs_grad(divisor):
        return func(*args, **kwargs)
    if not needs_grad(numerator):
        raise AttributionError(
            f"LRP has no rule for dividing a constant by an input-dependent tensor ({_name(func)}); "
            "use another method for this model"
        )
    mode = kwargs.get("rounding_mode")
    return (
        torch.div(numerator, divisor.detach(), rounding_mode=mode)
        if mode
        else numerator / divisor.detach()
    )


def layer_norm_rule(
    x: torch.Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    centered = x - x.mean(dims, keepdim=True)
    y = centered * torch.rsqrt(centered.detach().pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def group_norm_rule(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    centered = g - g.mean(-1, keepdim=True)
    y = (centered * torch.rsqrt(centered.detach().pow(2).mean(-1, keepdim=True) + eps)).reshape(
        x.shape
    )
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def rms_norm_rule(
    x: torch.Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.detach().pow(2).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight


def _normalize(
    x: torch.Tensor,
    p: float = 2.0,
    dim: int = 1,
    eps: float = 1e-12,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if out is not None:
        raise AttributionError(
            "LRP cannot explain F.normalize(..., out=...); drop the out argument"
        )
    return x / x.detach().norm(p, dim, keepdim=True).clamp_min(eps)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with the uniform rule on both products."""
    scores = q @ k.transpose(-2, -1)
    if needs_grad(q) and needs_grad(k):
        scores = uniform_rule(scores)
    scores = scores * scale
    if causal:
        lq, lk = scores.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        )
    attn = scores.softmax(-1)
    out = attn @ v
    return uniform_rule(out) if needs_grad(attn) and needs_grad(v) else out


def sdpa_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    if enable_gqa:
        raise AttributionError("LRP does not support grouped-query attention (enable_gqa=True)")
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return _attention(query, key, value, attn_mask, s, is_causal)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _mha(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.multi_head_attention_forward`` for inference, with each part under its rule."""
    a = _MHA_SIGNATURE.bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    if p["bias_k"] is not None or p["bias_v"] is not None or p["add_zero_attn"]:
        raise AttributionError(
            "LRP does not support MultiheadAttention with add_bias_kv or add_zero_attn"
        )
    if p["static_k"] is not None or p["static_v"] is not None:
        raise AttributionError("LRP does not support MultiheadAttention with static keys or values")
    query, key, value = p["query"], p["key"], p["value"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    L, N, E = query.shape
    S = key.shape[0]
    h = p["num_heads"]
    hd = E // h
    if p["use_separate_proj_weight"]:
        wq, wk, wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    else:
        wq, wk, wv = p["in_proj_weight"].chunk(3)
    bq = bk = bv = None
    if p["in_proj_bias"] is not None:
        bq, bk, bv = p["in_proj_bias"].chunk(3)
    q = F.linear(query, wq, bq).reshape(L, N * h, hd).transpose(0, 1)
    k = F.linear(key, wk, bk).reshape(S, N * h, hd).transpose(0, 1)
    v = F.linear(value, wv, bv).reshape(S, N * h, hd).transpose(0, 1)
    mask = _mha_mask(p["attn_mask"], p["key_padding_mask"], N, h, L, S, query)
    attn_out, attn = _mha_attention(
        q, k, v, mask, 1.0 / math.sqrt(hd), p["is_causal"] and mask is None
    )
    out = attn_out.transpose(0, 1).reshape(L, N, E)
    out = F.linear(out, p["out_proj_weight"], p["out_proj_bias"])
    weights = None
    if p["need_weights"]:
        weights = attn.reshape(N, h, L, S)
        if p["average_attn_weights"]:
            weights = weights.mean(1)
        if unbatched:
            weights = weights.squeeze(0)
    return (out.squeeze(1) if unbatched else out), weights


def _mha_attention(q, k, v, mask, scale, causal) -> tuple[torch.Tensor, torch.Tensor]:
    scores = q @ k.transpose(-2, -1)
    if needs_grad(q) and needs_grad(k):
        scores = uniform_rule(scores)
    scores = scores * scale
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores + mask
    attn = scores.softmax(-1)
    out = attn @ v
    return (uniform_rule(out) if needs_grad(attn) and needs_grad(v) else out), attn


def _as_additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:  # True: not allowed to attend (MultiheadAttention's convention)
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(like.dtype)


def _mha_mask(attn_mask, key_padding_mask, N, h, L, S, like) -> torch.Tensor | None:
    mask = None
    if attn_mask is not None:
        m = _as_additive(attn_mask, like)
        mask = m.unsqueeze(0) if m.dim() == 2 else m  # [1 or N*h, L, S]
    if key_padding_mask is not None:
        kp = (
            _as_additive(key_padding_mask, like)
            .reshape(N, 1, 1, S)
            .expand(N, h, 1, S)
            .reshape(N * h, 1, S)
        )
        mask = kp if mask is None else mask + kp
    return mask


_REPLACED: dict[object, Callable[..., Any]] = {}
for _f in _names("layer_norm"):
    _REPLACED[_f] = layer_norm_rule
for _f in _names("group_norm"):
    _REPLACED[_f] = group_norm_rule
for _f in _names("rms_norm"):
    _REPLACED[_f] = rms_norm_rule
_REPLACED[F.normalize] = _normalize
for _f in _names("scaled_dot_product_attention"):
    _REPLACED[_f] = sdpa_rule
_REPLACED[F.multi_head_attention_forward] = _mha

_RULE_NAMES = {
    layer_norm_rule: "constant std: layer_norm",
    group_norm_rule: "constant std: group_norm",
    rms_norm_rule: "constant std: rms_norm",
    _normalize: "constant norm: normalize",
    sdpa_rule: "attention: scaled_dot_product_attention",
    _mha: "attention: multi_head_attention_forward",
}
_SOFTMAX = frozenset(_names("softmax"))
_UNARY_SET = frozenset(_UNARY)
_PRODUCT_SET = frozenset(_PRODUCT + _MATMUL)
_DIVIDE_SET = frozenset(_DIVIDE)


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _short(func: Callable) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    return {
        "__mul__": "mul",
        "__rmul__": "mul",
        "__matmul__": "matmul",
        "__rmatmul__": "matmul",
        "__pow__": "pow",
        "__rpow__": "pow",
    }.get(name, name)


class RelevanceMode(TorchFunctionMode):
    """Puts the rule of each operation in the table above on it, for the forward passes inside.

    Args:
        eps: the identity rule's stabilizer (``f(x) / x`` near ``x = 0``).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        #: the rules applied so far, e.g. ``"identity: gelu"`` (for :func:`audit.methods.lrp.lrp_rules`)
        self.used: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        grads = [a for a in flat_args(args, kwargs) if needs_grad(a)]
        if not grads:
            return func(*args, **kwargs)
        replaced = _REPLACED.get(func)
        if replaced is not None:
            self.used.add(_RULE_NAMES[replaced])
            return replaced(*args, **kwargs)
        if func in _UNARY_SET:
            self.used.add(f"identity: {_short(func)}")
            return _unary(func, args, kwargs, self.eps)
        if func in _PRODUCT_SET:
            if len(grads) == 2:
                self.used.add(f"uniform: {_short(func)}")
            return _product(func, args, kwargs)
        if func in _DIVIDE_SET:
            self.used.add("constant divisor: a / b")
            return _divide(func, args, kwargs)
        if func in _SOFTMAX:
            self.used.add("softmax: AttnLRP")
        return func(*args, **kwargs)


def _gate_fixed_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the gate as a fixed multiplier: no relevance into its branch
            scale = module._scale(x)
        return scale * x

    return forward


@contextmanager
def fixed_gates(model: nn.Module) -> Iterator[int]:
    """torchvision's squeeze-excitation gates held fixed (instance ``forward``, removed on exit)."""
    from torchvision.ops.misc import SqueezeExcitation

    touched = []
    try:
        for m in model.modules():
            if isinstance(m, SqueezeExcitation):
                touched.append((m, m.__dict__.get("forward")))
                m.forward = _gate_fixed_forward(m)
        yield len(touched)
    finally:
        for m, previous in reversed(touched):
            del m.forward
            if previous is not None:
                m.forward = previous
