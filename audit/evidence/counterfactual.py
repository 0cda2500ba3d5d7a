"""Synthesized counterfactuals for probe sets with object masks only (no groups, no pairs).

After Xiao et al. (2020), "Noise or Signal: The Role of Image Backgrounds in Object
Recognition": each object (the pixels of its mask) is pasted, at its own position, onto
the background of another probe

* of its own class (*Mixed-Same*: the control for paste artifacts), and
* of another class (*Mixed-Rand*),

where the background probe's own object has been removed and its hole filled from the
surroundings (:func:`fill_holes`). The decisive number is, per class, how often the
prediction differs between an object's Mixed-Same and Mixed-Rand images: the same object,
both pasted (paste artifacts cancel), only the background changed. It sees a model that
reads the context even where contexts are balanced across classes (wolves and huskies
each half on snow, half on grass), where Xiao's accuracy gap (Mixed-Same minus
Mixed-Rand) sees nothing, since both draw their backgrounds from the same mix.

What it cannot see: a cue inside the mask (a watermark on the object) travels with the
object into every synthesized image.

Backgrounds are drawn with a private ``torch.Generator`` seeded from ``engine.seed``
(never the global RNG), so the same probes and config give the same images.
:func:`measure` stores the chosen rows and every prediction as plain numbers (the
``synthesized`` block of the report's evidence), and :func:`synthesize` rebuilds any of
the images from the probe set and those rows (the report's examples).

On a streamed probe folder (:class:`audit.probes.ProbeFolder`) the plan needs only each
mask's object share (:meth:`~audit.probes.ProbeFolder.mask_shares`: read a batch at a time,
usually during the audit's prediction pass, 4 bytes a probe), and only the planned objects
and backgrounds are decoded, at most ``4 * limit`` rows: memory is bounded by
``engine.synthesized_probes``, not by the probe count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from audit.engine.model import chunks, model_device
from audit.engine.rows import pick_rows
from audit.evidence.behaviour import predict
from audit.probes import ProbeSet

__all__ = ["FILL_ITERATIONS", "Plan", "plan_swaps", "fill_holes", "synthesize", "measure"]

#: Iterations of the diffusion fill (fixed, so the images do not depend on the hardware).
FILL_ITERATIONS = 48


@dataclass(frozen=True)
class Plan:
    """Which objects are pasted onto which backgrounds (probe rows).

    Attributes:
        rows: the objects' probe rows, ascending.
        same: per object, the row whose background is used for Mixed-Same (same class, another probe).
        rand: per object, the row whose background is used for Mixed-Rand (another class).
        skipped: objects not used: ``empty`` (empty mask), ``too_large`` (mask over the
            allowed share of the image), ``no_background`` (no other probe of its class, or
            no probe of another class, to take a background from), ``over_cap`` (beyond
            ``engine.synthesized_probes``).
    """

    rows: list[int]
    same: list[int]
    rand: list[int]
    skipped: dict[str, int] = field(default_factory=dict)


def plan_swaps(
    labels: torch.Tensor, masks: torch.Tensor, max_share: float, limit: int, seed: int
) -> Plan:
    """Pick the objects and draw their two backgrounds (deterministic for a given ``seed``).

    ``masks`` is bool ``[N, 1, H, W]``, or each mask's object share ``[N]`` (what is used of
    it; a streamed probe folder gives those without holding every mask).

    A probe serves as a background when its mask covers at most ``max_share`` of the image
    (an empty mask is a pure background); as an object when its mask is also not empty.
    Over ``limit`` objects, ``limit`` are kept, spread round robin over the classes. The
    Mixed-Same background is drawn uniformly among the other background probes of the
    object's class; the Mixed-Rand one from a class drawn uniformly among the other classes
    with backgrounds, then uniformly among its probes. One private generator, one row of
    three uniform draws per object, so nothing else can shift the draws.
    """
    labels = labels.cpu()
    # a 1-D tensor is the shares already (ProbeFolder.mask_shares: a streamed folder's masks)
    share = (masks if masks.ndim == 1 else masks.flatten(1).float().mean(dim=1)).cpu()
    empty, too_large = share <= 0, share > max_share
    pools: dict[int, list[int]] = {}
    for r in torch.nonzero(~too_large).flatten().tolist():
        pools.setdefault(int(labels[r]), []).append(int(r))
    usable = torch.nonzero(~empty & ~too_large).flatten().tolist()
    ok = [r for r in usable if len(pools[int(labels[r])]) >= 2 and len(pools) >= 2]
    skipped = {
        "empty": int(empty.sum()),
        "too_large": int(too_large.sum()),
        "no_background": len(usable) - len(ok),
    }
    if len(ok) > limit:
        keep = pick_rows(len(ok), limit, labels[ok])
        skipped["over_cap"] = len(ok) - len(keep)
        ok = [ok[i] for i in keep]
    else:
        skipped["over_cap"] = 0
    u = torch.rand(
        len(ok), 3, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64
    ).tolist()
    same, rand = [], []
    for r, (u_same, u_class, u_rand) in zip(ok, u, strict=True):
        c = int(labels[r])
        own = [x for x in pools[c] if x != r]
        same.append(own[min(len(own) - 1, int(u_same * len(own)))])
        others = sorted(k for k in pools if k != c)
        pool = pools[others[min(len(others) - 1, int(u_class * len(others)))]]
        rand.append(pool[min(len(pool) - 1, int(u_rand * len(pool)))])
    return Plan(ok, same, rand, skipped)


def _gaussian(
    radius: int, channels: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / (radius / 2.0)) ** 2)
    k = k / k.sum()
    return k.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), k.view(1, 1, -1, 1).repeat(
        channels, 1, 1, 1
    )


def fill_holes(
    images: torch.Tensor, holes: torch.Tensor, iterations: int = FILL_ITERATIONS
) -> torch.Tensor:
    """Fill the ``holes`` of ``images`` from their surroundings (diffusion inpainting).

    Written here because torchvision has no inpainting, and a learned inpainter (or
    OpenCV) would be a heavy dependency whose output the gate could not reason about.
    Normalized convolution, repeated: each iteration blurs the known pixels and their
    weights with one small Gaussian and sets every hole pixel the blur reaches to the
    weighted mean; reached pixels then count as known, so the fill grows inward from the
    hole's edge and keeps smoothing (a diffusion with the pixels around the hole held
    fixed). The hole is first grown by a pixel or more, so the anti-aliased rim of the old
    object goes too and no outline of it stays. Images larger than :data:`_FILL_SIZE`
    pixels are filled at that size (area-averaged from known pixels only; a pixel touched
    by the hole is a hole there) and the fill is upsampled into the hole: a diffusion
    fill is smooth, so nothing is lost, and it costs the same at any resolution.
    Vectorised over the batch, on the images' device, a fixed number of iterations; a
    hole the blur never reaches (no known pixel at all) is mid grey. The smooth fill then
    gets the image's own grain (:func:`_grain`), so it does not stand out as a shape.

    Args:
        images: ``[N, 3, H, W]`` in ``[0, 1]``.
        holes: bool ``[N, 1, H, W]``, True where the image is to be filled.
        iterations: blur steps.

    Returns:
        ``[N, 3, H, W]``: ``images`` outside the grown holes, the fill inside.
    """
    images = images.float()
    h, w = images.shape[-2:]
    grow = max(1, round(max(h, w) / 64))
    hole = (
        F.max_pool2d(holes.to(images.device, torch.float32), 2 * grow + 1, stride=1, padding=grow)
        > 0
    )
    known = (~hole).float()
    if max(h, w) > _FILL_SIZE:
        size = (
            max(1, round(h * _FILL_SIZE / max(h, w))),
            max(1, round(w * _FILL_SIZE / max(h, w))),
        )
        weight = F.interpolate(known, size=size, mode="area")
        small = F.interpolate(images * known, size=size, mode="area") / weight.clamp_min(1e-6)
        small_hole = weight < 1.0 - 1e-4
        fill = F.interpolate(
            _diffuse(small, small_hole, iterations),
            size=(h, w),
            mode="bilinear",
            align_corners=False,
        )
    else:
        fill = _diffuse(images, hole, iterations)
    fill = fill + _grain(images, hole)
    return torch.where(hole, fill, images).clamp(0.0, 1.0)


def _grain(images: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Noise with each image's own fine texture, for the filled pixels (after ROAD's noisy imputation).

    A diffusion fill is smooth; where the backgrounds are grainy, a smooth patch is a shape
    of its own (a pasted ring around a smooth patch reads as a disc). Per image and channel,
    the standard deviation of the known pixels' high-pass residual (image minus a 3x3 mean),
    as Gaussian noise from a fixed private generator, so the fill stays deterministic.
    """
    known = ~hole
    residual = images - F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    k = known.float()
    count = k.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    mean = (residual * k).sum(dim=(2, 3), keepdim=True) / count
    std = (((residual - mean) ** 2 * k).sum(dim=(2, 3), keepdim=True) / count).sqrt()
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(images.shape, generator=g).to(images.device)
    return noise * std


#: Largest side at which :func:`fill_holes` diffuses (larger images are filled at this size).
_FILL_SIZE = 64


def _diffuse(images: torch.Tensor, hole: torch.Tensor, iterations: int) -> torch.Tensor:
    """The normalized-convolution diffusion of :func:`fill_holes` (values outside ``hole`` kept)."""
    c = images.shape[1]
    radius = 2
    kh, kv = _gaussian(radius, c + 1, images.device)
    weight = (~hole).float()
    x = images * weight
    for _ in range(iterations):
        both = torch.cat([x * weight, weight], dim=1)
        both = F.conv2d(
            F.conv2d(both, kh, padding=(0, radius), groups=c + 1),
            kv,
            padding=(radius, 0),
            groups=c + 1,
        )
        den = both[:, c:]
        reached = den > 1e-6
        x = torch.where(hole & reached, both[:, :c] / den.clamp_min(1e-6), x)
        weight = torch.where(hole, reached.float(), weight)
    return torch.where(hole & (weight <= 0), torch.full_like(x, 0.5), x)


def synthesize(
    probes: ProbeSet,
    rows: Sequence[int],
    backgrounds: Sequence[int],
    device: torch.device | str = "cpu",
    max_batch: int = 128,
) -> torch.Tensor:
    """The objects of ``rows`` pasted onto the hole-filled backgrounds of ``backgrounds``, on CPU.

    Object ``i`` keeps its mask's pixels and position; every other pixel is the filled
    background of probe ``backgrounds[i]`` (each background is filled once, in batches of
    ``max_batch`` on ``device``). Deterministic: the report rebuilds its examples with
    this from the rows stored in the evidence.
    """
    if probes.masks is None:
        raise ValueError("synthesized counterfactuals need object masks")
    if len(rows) != len(backgrounds):
        raise ValueError(
            f"one background per object; got {len(rows)} objects and {len(backgrounds)} backgrounds"
        )
    device = torch.device(device)
    unique = sorted({int(b) for b in backgrounds})
    filled = (
        torch.cat(
            [
                fill_holes(
                    probes.images[unique[sl]].to(device), probes.masks[unique[sl]].to(device)
                ).cpu()
                for sl in chunks(len(unique), max_batch)
            ]
        )
        if unique
        else probes.images[:0]
    )
    at = {b: i for i, b in enumerate(unique)}
    bg = filled[[at[int(b)] for b in backgrounds]]
    r = list(rows)
    return torch.where(probes.masks[r], probes.images[r], bg)


def measure(
    model: nn.Module,
    probes: ProbeSet,
    predictions: torch.Tensor,
    *,
    max_share: float,
    limit: int,
    seed: int,
    max_batch: int,
    workers: int = 0,
) -> dict[str, Any]:
    """The ``synthesized`` evidence block: the swaps made and the predictions on them.

    Args:
        model: the classifier (on its device; the fill runs there too).
        probes: a probe set with masks.
        predictions: the model's predictions on the original probes ``[N]``.
        max_share: largest share of the image an object's mask may cover.
        limit: most objects used (``engine.synthesized_probes``).
        seed: seed of the private generator that draws the backgrounds.
        max_batch: most images per forward pass (and per fill).
        workers: DataLoader workers that read a streamed probe folder's masks when their
            shares are not known yet (:meth:`audit.probes.ProbeFolder.mask_shares`).

    Returns:
        Plain numbers: ``classes`` and ``class_counts`` (probes per class), the settings,
        ``skipped`` counts, and per object its ``rows``, ``labels``, the background rows
        ``same_background`` and ``rand_background``, and the predictions ``original``,
        ``same`` and ``rand``. :func:`audit.rules.counterfactual.judge` needs nothing else.

    Raises:
        NonFiniteLogits: NaN or Inf logits on a synthesized image.
    """
    if probes.masks is None:
        raise ValueError("synthesized counterfactuals need object masks")
    # a streamed folder: the shares from its masks, read a batch at a time (usually already
    # known from the prediction pass); only the planned rows' pixels are decoded below
    shares = (
        probes.mask_shares(max_batch, workers) if hasattr(probes, "mask_shares") else probes.masks
    )
    plan = plan_swaps(probes.labels, shares, max_share, limit, seed)
    device = model_device(model)
    n = len(plan.rows)
    both: list[int] = []
    if n:
        images = synthesize(probes, plan.rows + plan.rows, plan.same + plan.rand, device, max_batch)
        both = predict(model, images, max_batch=max_batch, finite=True).tolist()
    preds = {"same": both[:n], "rand": both[n:]}
    k = len(probes.class_names)
    return {
        "classes": list(probes.class_names),
        "class_counts": torch.bincount(probes.labels.cpu(), minlength=k).tolist(),
        "max_object_share": float(max_share),
        "limit": int(limit),
        "seed": int(seed),
        "fill_iterations": FILL_ITERATIONS,
        "skipped": dict(plan.skipped),
        "rows": list(plan.rows),
        "labels": [int(probes.labels[r]) for r in plan.rows],
        "same_background": list(plan.same),
        "rand_background": list(plan.rand),
        "original": [int(predictions[r]) for r in plan.rows],
        "same": [int(p) for p in preds["same"]],
        "rand": [int(p) for p in preds["rand"]],
    }
