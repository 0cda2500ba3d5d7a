"""Explainers registered by name, and the one call shape that runs every one of them.

``explain(method, model, inputs, target, **options)`` is the only entry point the
callbacks, the audit job and users need: a config string picks the method, and the
same guarantees hold for all of them (see :func:`explain`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from audit.engine.model import AttributionError, prepare_inputs, preserved
from audit.methods._common import check_memory_budget, deferred_checks, memory_budget

__all__ = ["METHODS", "register", "explain", "Explainer"]

Explainer = Callable[..., torch.Tensor]
F = TypeVar("F", bound=Explainer)

METHODS: dict[str, Explainer] = {}
"""Registered explainers by name (``explain``'s ``method`` argument)."""

_FIXED = ("model", "inputs", "target")
_UNIVERSAL = ("memory_budget",)  # options of explain itself, valid for every method


def register(name: str) -> Callable[[F], F]:
    """Register an explainer under ``name`` so that ``explain(name, ...)`` and configs find it.

    The function is called as ``fn(model, inputs, target, **options)`` from inside
    :func:`explain`: the model is in eval mode with its state saved (restored
    afterwards), its parameters do not require grad, gradients are enabled, and
    ``inputs`` is a detached copy on the model's device. ``target`` is passed as the
    caller gave it (None, an int, a sequence or a tensor of class indices). The
    function returns maps ``[N, 1, H, W]``; keyword-only parameters of the function
    are its options.

    Args:
        name: the method name used in configs (e.g. ``"gradcam"``).

    Returns:
        A decorator that registers the function and returns it unchanged.
    """
    if not isinstance(name, str) or not name.strip():
        raise AttributionError(f"an explainer name must be a non-empty string; got {name!r}")

    def decorate(fn: F) -> F:
        params = list(inspect.signature(fn).parameters)
        if tuple(params[:3]) != _FIXED:
            raise AttributionError(
                f"explainer '{name}' must take (model, inputs, target, *, options...) as its "
                f"first parameters; {fn.__qualname__} takes ({', '.join(params)})"
            )
        old = METHODS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise AttributionError(
                f"an explainer named '{name}' is already registered "
                f"({old.__module__}.{old.__qualname__}); register yours under another name"
            )
        METHODS[name] = fn
        return fn

    return decorate


def _lookup(method: str) -> Explainer:
    if not isinstance(method, str) or method not in METHODS:
        raise AttributionError(
            f"unknown explanation method {method!r}; valid methods are: {', '.join(sorted(METHODS))}"
        )
    return METHODS[method]


@functools.cache
def _option_names(fn: Explainer) -> tuple[str, ...] | None:
    """The options ``fn`` accepts, or None if it takes any (``**kwargs``); read once per function."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return tuple(
        n
        for n, p in params.items()
        if n not in _FIXED and p.kind is not inspect.Parameter.VAR_POSITIONAL
    )


def check_options(method: str, fn: Explainer, options: dict[str, Any]) -> None:
    valid = _option_names(fn)
    if not options:
        return
    if "memory_budget" in options:
        check_memory_budget(options["memory_budget"])
    if valid is None:
        return
    valid = (*valid, *(u for u in _UNIVERSAL if u not in valid))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise AttributionError(
            f"method '{method}' got unknown option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(valid)}"
        )


def explain(
    method: str,
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | torch.Tensor | list[int] | None = None,
    **options: Any,
) -> torch.Tensor:
    """Attribution maps of ``model``'s target logits for ``inputs`` by the method named ``method``.

    Guarantees for every registered method: the caller's tensor is never modified;
    nothing is left on the model (hooks, ``.grad``, ``requires_grad``, training flags,
    BatchNorm statistics and the grad mode are restored); it works under
    ``torch.no_grad()`` and ``torch.inference_mode()``; scores are pre-softmax
    logits; ``target=None`` explains the predicted class.

    Memory is bounded by default: with no ``max_batch`` option, the images per
    forward+backward pass (the batch, integrated gradients' images x steps, SmoothGrad's
    noisy copies) are as many as ``memory_budget`` bytes of saved activations allow,
    from the measured cost of one image (one extra forward pass of one image the first
    time a model meets an input shape; cached). The maps do not depend on the
    chunking. An explicit ``max_batch`` wins over the budget.

    Args:
        method: a name in :data:`METHODS` (``"gradcam"``, ``"saliency"``, ``"lrp"``, ...).
        model: a classifier returning logits ``[N, classes]``.
        inputs: images ``[N, C, H, W]`` (display space ``[0, 1]`` for the project's models).
        target: class index for all rows, one index per row, or None for the argmax.
        **options: method options, e.g. ``layer=`` for Grad-CAM, ``composite=`` for LRP,
            ``max_batch=`` (most images per forward+backward pass; wins over the budget).
            Every method also takes ``memory_budget=``: bytes of activations autograd
            may hold in one pass when ``max_batch`` is not set (default
            ``audit.methods._common.DEFAULT_MEMORY_BUDGET``, 1 GiB).

    Returns:
        float32 maps ``[N, 1, H, W]`` on the inputs' device, detached.
    """
    fn = _lookup(method)
    check_options(method, fn, options)
    if not isinstance(model, nn.Module):
        raise AttributionError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    budget = check_memory_budget(options.pop("memory_budget", None))  # explain's own option
    with deferred_checks() as checks:
        with preserved(model, freeze=True):  # no graph for the weights; restored after
            x = prepare_inputs(model, inputs)
            # the cost of one image is measured here (before the explainer hooks the model)
            with memory_budget(model, x, budget, measure=options.get("max_batch") is None):
                maps = fn(model, x, target, **options)
    for targets in checks:  # NaN/Inf logits, targets out of range (on a GPU: one sync)
        targets.verify()
    expected = (x.shape[0], 1, *x.shape[2:])
    if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != expected:
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise AttributionError(
            f"explainer '{method}' returned {got}; maps must have shape {expected}"
        )
    return maps.detach().to(device=inputs.device, dtype=torch.float32)
