"""Gradient-weighted attention rollout (Chefer, Gur and Wolf 2021) for vision transformers.

After "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers" (ICCV 2021), the self-attention rule: for each
self-attention layer, in the order the layers run,

* ``A`` is the softmax attention ``[N, heads, T, T]`` and ``grad`` is
  d(target logit)/dA;
* ``A_bar = mean over heads of relu(grad * A)``;
* ``R = R + A_bar @ R``, with ``R`` starting as the identity ``[T, T]``.

The map is the class token's row ``R[0, extra:]`` (the relevance of every patch token
for the class token that the head reads), laid out on the patch grid
(:func:`audit.engine.model.token_grid`) and upsampled bilinearly to the input size. A model
without a class token (mean pooling over the tokens) gets the mean over all rows of
``R - I`` instead: how much each patch token matters to the tokens that the head
averages, without the identity's uniform share.

The attention weights are caught from ``torch.nn.MultiheadAttention``, the module
torchvision's ``VisionTransformer`` uses (which calls it with ``need_weights=False``):
for one forward pass each such module's ``forward`` is replaced by an instance
attribute that calls the original with ``need_weights=True, average_attn_weights=False``
and hands the caller what it asked for; the attribute is removed afterwards. The
weights returned by PyTorch are a view of the softmax output made after its use, so
the gradient is taken with respect to that softmax output itself (the view's base).
Models without global self-attention (CNNs; Swin's shifted windows and MaxViT's
block and grid attention are their own modules over windows) are refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from audit.engine.model import AttributionError, token_grid
from audit.methods._common import TargetLike, Targets, map_chunks, target_scores
from audit.methods.registry import register

__all__ = ["attention_rollout"]

_INSTEAD = (
    "use gradcam, input_x_gradient, integrated_gradients or saliency instead (or lrp on a CNN)"
)


class _Record:
    """One attention call: its weights ``[N, heads, T, S]`` and the softmax output they view."""

    def __init__(self, name: str, weights: torch.Tensor, softmax: torch.Tensor) -> None:
        self.name = name
        self.weights = weights
        self.softmax = softmax


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


def _refusal(model: nn.Module) -> str:
    others = [
        (n, type(m).__name__)
        for n, m in model.named_modules()
        if isinstance(m.__dict__.get("num_heads", m.__dict__.get("n_heads")), int)
    ]
    why = (
        "attention rollout needs global self-attention over all tokens (torch.nn.MultiheadAttention, "
        "as in torchvision's VisionTransformer), and this model has none"
    )
    if others:
        shown = ", ".join(f"{n} ({c})" for n, c in others[:3]) + (
            ", ..." if len(others) > 3 else ""
        )
        why += (
            f": its attention modules {shown} are its own implementation, e.g. attention within "
            "windows (Swin's shifted windows, MaxViT's block and grid attention), which no class "
            "token's row can be read from"
        )
    else:
        why += " (a CNN has no attention to roll out)"
    return f"{why}; {_INSTEAD}"


@contextmanager
def _weights_of(attentions: list[tuple[str, nn.MultiheadAttention]]) -> Iterator[list[_Record]]:
    """For one forward pass, record the attention weights of every ``attentions`` call, with their graph.

    Each module's ``forward`` is shadowed by an instance attribute that asks for the
    per-head weights; the caller gets the output it asked for. Afterwards the attribute
    is removed (or a ``forward`` attribute the module already had is put back).
    """
    records: list[_Record] = []
    saved: list[tuple[nn.Module, bool, object]] = []

    def wrap(name: str, module: nn.MultiheadAttention):
        original = module.forward  # the class's, or a forward the user set on the instance
        # the class's signature names the arguments however the caller passed them
        signature = inspect.signature(type(module).forward)
        this = next(iter(signature.parameters))

        def forward(*args, **kwargs):
            bound = signature.bind(module, *args, **kwargs)
            bound.apply_defaults()
            arguments = {k: v for k, v in bound.arguments.items() if k != this}
            wanted = arguments.get("need_weights", True)
            average = arguments.get("average_attn_weights", True)
            arguments["need_weights"] = True
            arguments["average_attn_weights"] = False
            out, weights = original(**arguments)
            records.append(_Record(name, weights, _softmax_of(name, weights)))
            if not wanted:
                return out, None
            return out, (weights.mean(dim=-3) if average else weights)

        return forward

    try:
        for name, module in attentions:
            had = "forward" in module.__dict__
            saved.append((module, had, module.__dict__.get("forward")))
            module.__dict__["forward"] = wrap(name, module)
        yield records
    finally:
        for module, had, old in saved:
            if had:
                module.__dict__["forward"] = old
            else:
                module.__dict__.pop("forward", None)


def _softmax_of(name: str, weights: torch.Tensor | None) -> torch.Tensor:
    """The softmax output that ``weights`` (a view made after the softmax was used) looks at."""
    if weights is None or weights.ndim != 4:
        shape = None if weights is None else tuple(weights.shape)
        raise AttributionError(
            f"attention rollout needs batched per-head attention weights [N, heads, T, S] from '{name}'; "
            f"got {shape} (call the model with a batch [N, C, H, W])"
        )
    base = weights._base
    if (
        base is None
        or base.grad_fn is None
        or base.numel() != weights.numel()
        or "softmax" not in type(base.grad_fn).__name__.lower()
    ):
        raise AttributionError(
            f"the attention weights of '{name}' carry no gradient graph back to their softmax (the "
            "module's output does not depend on the input, or this PyTorch's multi_head_attention_forward "
            f"works differently); {_INSTEAD}"
        )
    return base


@register("attention_rollout")
def attention_rollout(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    start_layer: int = 0,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Gradient-weighted attention rollout maps (Chefer et al. 2021), upsampled to the input size.

    Args:
        model: a vision transformer built on ``torch.nn.MultiheadAttention`` (eval mode,
            managed by ``explain``), e.g. torchvision's ``vit_b_16``.
        inputs: ``[N, C, H, W]`` on the model's device.
        target: class indices or None (argmax).
        start_layer: the first attention layer (in the order they run; negative counts
            from the last) whose ``A_bar`` enters the rollout; earlier layers are left
            out (``R`` stays the identity through them). 0: all layers.
        max_batch: chunk the batch to bound memory (the weights ``[N, heads, T, T]`` of
            every layer are held for the backward pass).

    Returns:
        Non-negative maps ``[N, 1, H, W]``.

    Raises:
        AttributionError: a model without ``nn.MultiheadAttention`` (CNNs, Swin, MaxViT),
            cross-attention, tokens that do not tile the input's patch grid, or a
            ``start_layer`` outside the layers.
    """
    if isinstance(start_layer, bool) or not isinstance(start_layer, int):
        raise AttributionError(f"start_layer must be an integer layer index; got {start_layer!r}")
    attentions = _attention_modules(model)
    if not attentions:
        raise AttributionError(_refusal(model))
    size = (int(inputs.shape[-2]), int(inputs.shape[-1]))

    def one(x: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
        # the parameters are frozen by explain: the input starts the graph that reaches every A
        x = x.detach().requires_grad_(True)
        with _weights_of(attentions) as records:
            logits = model(x)
        layers = _checked(records, start_layer)
        tokens = layers[0].weights.shape[-1]
        grid = token_grid(tokens, size)
        if grid is None:
            raise AttributionError(
                f"the attention of '{layers[0].name}' runs over {tokens} tokens, which do not tile the "
                f"{size[0]}x{size[1]} input's patch grid (after up to a few class tokens); attention "
                f"rollout needs a ViT's [class token +] patch tokens; {_INSTEAD}"
            )
        used = layers[start_layer % len(layers) :]
        score, _ = target_scores(logits, targets, rows)
        grads = torch.autograd.grad(score, [r.softmax for r in used], allow_unused=True)
        with torch.no_grad():
            n = x.shape[0]
            eye = torch.eye(tokens, device=x.device, dtype=layers[0].weights.dtype)
            rollout = eye.expand(n, tokens, tokens).clone()
            for rec, grad in zip(used, grads, strict=True):
                if grad is None:  # this layer does not reach the logits: it adds nothing
                    continue
                a = rec.weights.detach()
                a_bar = (grad.view_as(a) * a).clamp(min=0).mean(dim=1)  # [N, T, T]
                rollout = rollout + a_bar @ rollout
            extra, h, w = grid
            if extra:
                relevance = rollout[:, 0, extra:]  # the class token's row
            else:
                relevance = (rollout - eye).mean(dim=1)
            maps = relevance.reshape(n, 1, h, w)
            return F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return map_chunks(inputs, target, max_batch, one)


def _checked(records: list[_Record], start_layer: int) -> list[_Record]:
    """The recorded self-attention calls, checked: at least one, square, one token count, a valid start."""
    if not records:
        raise AttributionError(
            "the model's torch.nn.MultiheadAttention modules did not run in the forward pass; "
            f"attention rollout has nothing to roll out; {_INSTEAD}"
        )
    for r in records:
        t, s = r.weights.shape[-2:]
        if t != s:
            raise AttributionError(
                f"'{r.name}' attends from {t} query tokens to {s} key tokens (cross-attention); attention "
                f"rollout needs self-attention over one set of tokens; {_INSTEAD}"
            )
    counts = sorted({int(r.weights.shape[-1]) for r in records})
    if len(counts) > 1:
        raise AttributionError(
            f"the self-attention layers run over different numbers of tokens {counts}; attention rollout "
            f"needs one token set through all layers (a plain ViT); {_INSTEAD}"
        )
    if not -len(records) <= start_layer < len(records):
        raise AttributionError(
            f"start_layer {start_layer} is outside the model's {len(records)} attention layers "
            f"(0..{len(records) - 1}, or negative from the last)"
        )
    return records
