"""Input-gradient explainers: saliency (+ SmoothGrad), input x gradient, integrated gradients.

Saliency and input x gradient are one forward and one backward to the input; they
are our own few lines rather than captum's ``Saliency``/``NoiseTunnel`` because
captum's SmoothGrad draws its noise from the global RNG, and the project's rule is a
private seeded generator. Integrated gradients reuse captum's
``IntegratedGradients`` (correct, with its Gauss-Legendre path quadrature).

Channel reduction: saliency takes the max of ``|gradient|`` over channels (Simonyan
et al. 2014). Input x gradient and integrated gradients **sum** over channels: the
maps stay signed and keep completeness (the map of integrated gradients sums to
``logit(x) - logit(baseline)`` up to the quadrature error).

Memory: with ``max_batch=None`` (the default) the images per forward+backward pass
come from the memory budget (``explain``'s ``memory_budget``, else
``DEFAULT_MEMORY_BUDGET``, 1 GiB of saved activations) and the measured cost of one
image (:func:`audit.methods._common.rows_per_pass`): integrated gradients run their
``N x steps`` path points in chunks of that many, SmoothGrad its ``N`` noisy images
per sample. An explicit ``max_batch`` wins. The maps do not depend on the chunking
(up to float summation order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from captum.attr import IntegratedGradients
from torch import nn

from audit.engine.model import AttributionError
from audit.methods._common import (
    TargetLike,
    Targets,
    fixed_targets,
    map_chunks,
    rows_per_pass,
    target_scores,
)
from audit.methods.registry import register

__all__ = ["saliency", "input_x_gradient", "integrated_gradients"]

_IG_METHODS = (
    "gausslegendre",
    "riemann_trapezoid",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
)


def _gradient(model: nn.Module, x: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
    """d(target logit)/d(input) for one chunk, with the model's parameters frozen by ``explain``."""
    x = x.detach().requires_grad_(True)
    score, _ = target_scores(model(x), targets, rows)
    (grad,) = torch.autograd.grad(score, x)
    return grad


def _smoothed(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike,
    samples: int,
    noise: float,
    seed: int,
    max_batch: int | None,
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Mean of ``reduce(x_noisy, gradient)`` over ``samples`` Gaussian copies (SmoothGrad).

    The noise comes from a private generator seeded with ``seed`` and is drawn for the
    whole batch per sample, so the result does not depend on ``max_batch`` (nor on the
    chunk size the memory budget picks when ``max_batch`` is None).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise AttributionError(f"smooth_samples must be a non-negative integer; got {samples!r}")
    if samples == 0:
        return map_chunks(
            inputs,
            target,
            rows_per_pass(model, inputs, max_batch),
            lambda x, t, rows: reduce(x, _gradient(model, x, t, rows)),
        )
    if not float(noise) >= 0.0:
        raise AttributionError(
            f"noise must be a standard deviation >= 0 (input units); got {noise!r}"
        )
    max_batch = rows_per_pass(model, inputs, max_batch)  # per pass of one noise sample
    fixed = fixed_targets(model, inputs, target, max_batch)
    gen = torch.Generator(device=inputs.device).manual_seed(int(seed))
    total = torch.zeros(
        inputs.shape[0], 1, *inputs.shape[2:], device=inputs.device, dtype=inputs.dtype
    )
    for _ in range(samples):
        eps = torch.randn(inputs.shape, generator=gen, device=inputs.device, dtype=inputs.dtype)
        noisy = inputs + float(noise) * eps
        total += map_chunks(
            noisy, fixed, max_batch, lambda x, t, rows: reduce(x, _gradient(model, x, t, rows))
        )
    return total / samples


def _max_abs(_x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.abs().amax(dim=1, keepdim=True)


def _input_times(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return (x * grad).sum(dim=1, keepdim=True)


@register("saliency")
def saliency(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    smooth_samples: int = 0,
    noise: float = 0.15,
    seed: int = 0,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Gradient saliency: max over channels of ``|d logit / d input|``; SmoothGrad with ``smooth_samples > 0``.

    Args:
        model: the classifier.
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax of the clean inputs).
        smooth_samples: number of noisy copies to average (0 = plain saliency).
        noise: standard deviation of the Gaussian noise in input units (inputs in
            ``[0, 1]``: 0.15 is 15 % of the value range, as in Smilkov et al.).
        seed: seed of the private noise generator (the global RNG is never used).
        max_batch: at most this many images per forward+backward pass; None: as many
            as the memory budget allows (``explain``'s ``memory_budget``).

    Returns:
        Non-negative maps ``[N, 1, H, W]``.
    """
    return _smoothed(model, inputs, target, smooth_samples, noise, seed, max_batch, _max_abs)


@register("input_x_gradient")
def input_x_gradient(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    smooth_samples: int = 0,
    noise: float = 0.15,
    seed: int = 0,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Input x gradient, summed over channels (signed); SmoothGrad-averaged with ``smooth_samples > 0``.

    Args:
        model: the classifier.
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax).
        smooth_samples: number of noisy copies to average (0 = none).
        noise: noise standard deviation in input units.
        seed: seed of the private noise generator.
        max_batch: at most this many images per forward+backward pass; None: as many
            as the memory budget allows (``explain``'s ``memory_budget``).

    Returns:
        Signed maps ``[N, 1, H, W]``.
    """
    return _smoothed(model, inputs, target, smooth_samples, noise, seed, max_batch, _input_times)


@register("integrated_gradients")
def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    steps: int = 32,
    baseline: float | torch.Tensor = 0.0,
    quadrature: str = "gausslegendre",
    max_batch: int | None = None,
) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017) via captum, summed over channels.

    Args:
        model: the classifier.
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax of the inputs).
        steps: points of the path quadrature.
        baseline: a number, or a tensor broadcastable to one input ``[C, H, W]`` or to
            the batch; 0.0 is a black image in display space.
        quadrature: captum's quadrature (its ``method``): one of gausslegendre,
            riemann_trapezoid, riemann_left, riemann_right, riemann_middle. Named apart
            from captum because ``explain``'s first argument is ``method``.
        max_batch: at most this many images per forward+backward pass (the
            ``N x steps`` path points are chunked); None: as many as the memory budget
            allows (``explain``'s ``memory_budget``; by default 14 on ViT-B/16 at 224 px).

    Returns:
        Signed maps ``[N, 1, H, W]``; each sums to about ``logit(x) - logit(baseline)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AttributionError(f"steps must be a positive integer; got {steps!r}")
    if quadrature not in _IG_METHODS:
        raise AttributionError(
            f"unknown quadrature {quadrature!r}; choose one of {', '.join(_IG_METHODS)}"
        )
    if isinstance(baseline, torch.Tensor):
        try:
            base = torch.broadcast_to(baseline.to(inputs), inputs.shape)
        except RuntimeError:
            raise AttributionError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs "
                f"{tuple(inputs.shape)}; pass a number or a tensor of shape [C, H, W]"
            ) from None
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        base = torch.full_like(inputs, float(baseline))
    else:
        raise AttributionError(
            f"baseline must be a number or a tensor; got {type(baseline).__name__}"
        )
    # images per pass over all N x steps path points; captum splits the steps of a
    # chunk of at most `limit` images into passes of at most `limit` rows
    limit = rows_per_pass(model, inputs, max_batch, inputs.shape[0] * steps)
    fixed = fixed_targets(model, inputs, target, limit)
    ig = IntegratedGradients(model)

    def one(x: torch.Tensor, _t: Targets, rows: slice) -> torch.Tensor:
        attr = ig.attribute(
            x,
            baselines=base[rows],
            target=fixed[rows],
            n_steps=steps,
            method=quadrature,
            internal_batch_size=limit,
        )
        return attr.sum(dim=1, keepdim=True)

    return map_chunks(inputs, None, limit, one)
