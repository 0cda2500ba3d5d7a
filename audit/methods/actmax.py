"""Activation maximization: inputs synthesized by gradient ascent to excite one unit each.

Regularizers are those of the field (Yosinski et al. 2015, "Understanding neural
networks through deep visualization"; Olah et al. 2017, "Feature visualization"):
L2 decay towards grey, transformation robustness (a random shift and scale per image
and step), periodic Gaussian blur, and clipping of pixels with a small norm or a
small contribution. Images live in display space ``[0, 1]``; the optimized variable
is ``image - 0.5``, projected back into range after every step.

Cost: all units are optimized together (one batch, each image ascends its own
unit), the forward pass stops at the target layer (a hook raises a private
exception once the activation is captured, so later layers never run), the jitter
of the whole batch is one broadcast sampling grid and one ``grid_sample``, and the blur
one grouped convolution. Randomness comes from a private ``torch.Generator``: the result depends
on ``seed`` only, and the global RNG is untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from audit.engine.model import (
    AttributionError,
    check_finite,
    model_device,
    preserved,
    resolve_layer,
)

__all__ = ["activation_maximization"]


class _Reached(Exception):
    """Raised by the hook once the target layer's output is captured (ends the forward early)."""


@contextmanager
def _forward_to(
    model: nn.Module, module: nn.Module | None
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A function ``x -> activation of module`` that does not run the layers after it.

    ``module=None`` means the logits (the full forward). The hook lives only inside
    the ``with`` block.
    """
    if module is None:
        yield model
        return
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _inp: tuple, out: object) -> None:
        if not isinstance(out, torch.Tensor):
            raise AttributionError(
                f"the layer must output one tensor; it returns {type(out).__name__}"
            )
        captured.append(out)
        raise _Reached

    def run(x: torch.Tensor) -> torch.Tensor:
        captured.clear()
        try:
            model(x)
        except _Reached:
            return captured[0]
        raise AttributionError(
            "the layer did not run in the model's forward pass; pick a layer on the path to the output"
        )

    handle = module.register_forward_hook(hook)
    try:
        yield run
    finally:
        handle.remove()


def _objective(act: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Per image: the mean activation of its unit's channel (the logit for ``[N, classes]``)."""
    picked = act[torch.arange(act.shape[0], device=act.device), units]
    return picked.flatten(1).mean(dim=1) if picked.ndim > 1 else picked


def _base_grid(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel centres in grid_sample's coordinates (``align_corners=False``), ``[1, H, W, 2]`` as (x, y)."""
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) * 2 + 1) / w - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]


def _jitter(
    x: torch.Tensor, base: torch.Tensor, gen: torch.Generator, shift: float, scale: float
) -> torch.Tensor:
    """Random translation (up to ``shift`` pixels) and zoom (up to ``1 + scale``) per image, in one op.

    The sampling grid is ``s * base + t`` by broadcasting (cheaper than ``affine_grid``'s
    batched matrix product), then one bilinear ``grid_sample`` with reflection.
    """
    n, _, h, w = x.shape
    r = torch.rand((n, 3), generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
    s = torch.exp(r[:, :1] * math.log1p(scale))  # [n, 1]
    t = r[:, 1:] * torch.tensor(
        [2 * shift / w, 2 * shift / h], device=x.device, dtype=x.dtype
    )  # [n, (x, y)]
    grid = torch.addcmul(t[:, None, None, :], base, s[:, :, None, None])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gaussian(sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    r = max(1, math.ceil(2 * sigma))
    t = torch.arange(-r, r + 1, device=like.device, dtype=like.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    return (k[:, None] * k[None, :]).expand(channels, 1, 2 * r + 1, 2 * r + 1).contiguous()


def _blur(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    r = kernel.shape[-1] // 2
    return F.conv2d(F.pad(u, (r, r, r, r), mode="reflect"), kernel, groups=u.shape[1])


def _clip_below(u: torch.Tensor, score: torch.Tensor, percentile: float) -> None:
    """Set to grey (0) the pixels whose ``score [U, H, W]`` lies below the image's percentile."""
    cut = torch.quantile(score.flatten(1), percentile / 100.0, dim=1)
    u.mul_((score >= cut[:, None, None]).unsqueeze(1))


def _units(units: int | Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(units, device=device)
    if t.is_floating_point() or t.dtype == torch.bool or t.ndim > 1 or t.numel() == 0:
        raise AttributionError(
            f"units must be an int or a non-empty list of channel indices; got {units!r}"
        )
    return t.long().reshape(-1)


def _check(
    steps: int, lr: float, size: int | tuple[int, int], opts: dict[str, float]
) -> tuple[int, int]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise AttributionError(f"steps must be an integer >= 0; got {steps!r}")
    if not float(lr) > 0:
        raise AttributionError(f"lr must be > 0; got {lr!r}")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if min(h, w) < 8:
        raise AttributionError(f"size must be at least 8 pixels; got {size!r}")
    for key, value in opts.items():
        if not float(value) >= 0:
            raise AttributionError(f"{key} must be >= 0; got {value!r}")
    for key in ("clip_norm", "clip_contribution"):
        if opts[key] >= 100:
            raise AttributionError(f"{key} is a percentile in [0, 100); got {opts[key]!r}")
    return int(h), int(w)


def activation_maximization(
    model: nn.Module,
    layer: str | nn.Module | None,
    units: int | Sequence[int] | torch.Tensor,
    steps: int = 128,
    lr: float = 0.05,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    *,
    channels: int = 3,
    l2_decay: float = 1e-3,
    jitter: float = 2.0,
    scale: float = 0.05,
    blur_every: int = 4,
    blur_sigma: float = 0.5,
    clip_norm: float = 0.0,
    clip_contribution: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthesize one image per unit that maximizes the unit, by gradient ascent from noise.

    Args:
        model: the classifier (restored afterwards: mode, hooks, grads, requires_grad).
        layer: module name or module whose channel ``u`` is maximized (its mean
            activation), or None / ``"logits"`` for class logits.
        units: channel (or class) indices; all are optimized in one batch.
        steps: ascent steps (Adam).
        lr: Adam's learning rate (pixel units).
        size: image size, an int or ``(H, W)``.
        seed: seed of the private generator (initial noise and jitter).
        channels: input channels of the model.
        l2_decay: per step, pixels shrink towards grey by this fraction.
        jitter: maximal random shift per step, in pixels (0 = none).
        scale: maximal random zoom per step, ``1 + scale`` (0 = none).
        blur_every: Gaussian blur every this many steps (0 = never).
        blur_sigma: the blur's standard deviation in pixels.
        clip_norm: percentile below which pixels with a small norm are reset to grey.
        clip_contribution: percentile below which pixels with a small
            ``|pixel * gradient|`` are reset to grey.

    Returns:
        ``(images [U, channels, H, W] in [0, 1], activations [U])``, the activations
        measured on the final images without jitter.
    """
    opts = {
        "l2_decay": l2_decay,
        "jitter": jitter,
        "scale": scale,
        "blur_every": blur_every,
        "blur_sigma": blur_sigma,
        "clip_norm": clip_norm,
        "clip_contribution": clip_contribution,
    }
    h, w = _check(steps, lr, size, opts)
    if blur_every and not blur_sigma > 0:
        raise AttributionError(f"blur_sigma must be > 0 when blur_every is set; got {blur_sigma!r}")
    module = None if layer is None or layer == "logits" else resolve_layer(model, layer)[1]
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    with preserved(model):  # also leaves inference mode: every tensor below is a normal one
        idx = _units(units, device)
        for p in model.parameters():
            p.requires_grad_(False)
        with _forward_to(model, module) as forward:
            u = (
                torch.randn((idx.numel(), channels, h, w), generator=gen, device=device) * 0.1
            ).clamp_(-0.5, 0.5)
            _check_units(forward(u + 0.5), idx, layer)
            u.requires_grad_(True)
            opt = torch.optim.Adam([u], lr=float(lr), maximize=True)
            kernel = _gaussian(float(blur_sigma), channels, u) if blur_every else None
            base = _base_grid(h, w, u)
            for step in range(steps):
                x = u + 0.5
                if jitter or scale:
                    x = _jitter(x, base, gen, float(jitter), float(scale))
                (u.grad,) = torch.autograd.grad(_objective(forward(x), idx).sum(), u)
                opt.step()
                with torch.no_grad():
                    if clip_contribution:
                        _clip_below(u, (u * u.grad).abs().sum(dim=1), float(clip_contribution))
                    if l2_decay:
                        u.mul_(1.0 - float(l2_decay))
                    if kernel is not None and (step + 1) % int(blur_every) == 0:
                        u.copy_(_blur(u, kernel))
                    if clip_norm:
                        _clip_below(u, u.norm(dim=1), float(clip_norm))
                    u.clamp_(-0.5, 0.5)
            images = (u.detach() + 0.5).clamp_(0.0, 1.0)
            with torch.no_grad():
                act = forward(images)
                check_finite(act, "the layer's activation")
                reached = _objective(act, idx)
    return images, reached


def _check_units(act: torch.Tensor, idx: torch.Tensor, layer: object) -> None:
    check_finite(act, "the layer's activation")
    if act.ndim < 2:
        raise AttributionError(
            f"layer {layer!r} outputs shape {tuple(act.shape)}; need [N, channels, ...]"
        )
    n = act.shape[1]
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.numel():
        raise AttributionError(
            f"unit {int(bad[0])} is not a channel of layer {layer!r}, which has {n} channels (0..{n - 1})"
        )
