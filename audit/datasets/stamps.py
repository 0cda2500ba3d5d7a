"""A procedural "stamps" benchmark: the spurious cue is a watermark, not a background.

Two classes of flat shapes, ``disc`` and ``ring`` (a disc with a concentric hole
that shows the backdrop), drawn with a random size, elongation, rotation,
position and colour on a neutral textured backdrop whose distribution is the
same for both classes. The true difference lies in the shape: a ring has a hole
(40-60 % of its outline), a disc has none. Both classes have the same
distribution of painted area, so a ring is the wider of the two at equal paint
and neither pixel counts nor mean colour tell them apart.

The spurious cue is a small high-contrast stamp at a random spot clear of the
shape, the kind of watermark, burnt-in annotation or scanner tag a real data set
picks up from one of its sources:

=========  ==========================================================
context    stamp (a square of ``size / 8`` pixels, 8 at 64x64)
=========  ==========================================================
checker    black and white checkerboard, 4 x 4 cells
stripes    black and white stripes, 4 of them, horizontal or vertical
=========  ==========================================================

Both stamps use the same two grey levels, cover the same area and have the same
mean brightness: only the pattern differs. ``P(checker | disc) = P(stripes |
ring) = correlation``. The stamp is learned within the first steps; the hole
takes a few epochs. A small CNN trained at a high correlation therefore reaches a
low training loss from the stamp alone and never needs the shape, while one
trained at ``correlation = 0.5`` has only the shape to go on.

Every image has a pixel-exact object mask (the painted shape; a ring's hole is
not part of it, and the stamp always lies more than two pixels outside the
shape's circumscribed circle), its group ``"<class>|<stamp>"`` (group id ``2 *
label + context``) and, in :func:`probe_set`, a ``pair`` id shared by the same
scene (shape, colours, backdrop, stamp position) carrying each of the two
stamps: the images of a pair differ only inside the stamp's square.

Rendering is vectorised over the batch (implicit shapes tested on a pixel grid),
chunked to bound memory, and driven by a private ``torch.Generator``: the output
depends only on the arguments, never on the global RNG. Pixels are quantized to
8 bits, so a probe set round-trips through PNG exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from audit.datasets._common import (
    MIN_SIZE,
    check_pixels,
    correlated_context,
    grouped_probe_set,
    paired_probe_set,
)
from audit.probes import ProbeSet

__all__ = ["CLASSES", "CONTEXTS", "GROUPS", "generate", "probe_set", "render", "stamp_boxes"]

CLASSES = ["disc", "ring"]
CONTEXTS = ["checker", "stripes"]
GROUPS = [f"{c}|{s}" for c in CLASSES for s in CONTEXTS]  # group id = 2 * label + context
_CHUNK = 1024
_AREA = (0.22, 0.32)  # shape area is (f * size)^2 with f ~ U(_AREA), for both classes
_ASPECT = (0.75, 1.0)  # minor / major axis
_HOLE = (0.4, 0.6)  # a ring's hole / outline, per axis


def generate(n: int, correlation: float = 0.95, size: int = 64, seed: int = 0) -> ProbeSet:
    """``n`` labelled images whose stamp agrees with the class with probability ``correlation``.

    Classes are balanced (``n // 2`` discs); the checker stamp goes with disc and
    stripes with ring with probability ``correlation``. Groups are
    ``"<class>|<stamp>"``.
    """
    _check(n=n, size=size)
    check_pixels(n, size)
    g = torch.Generator().manual_seed(int(seed))
    labels, context = correlated_context(n, correlation, g)  # context c is class c's usual one
    images, masks = render(labels, context, size=size, generator=g)
    return grouped_probe_set(images, masks, labels, context, CLASSES, GROUPS)


def probe_set(n_per_group: int = 16, size: int = 64, seed: int = 0) -> ProbeSet:
    """A balanced probe set: ``n_per_group`` scenes per class, each with either stamp.

    Rows ``2k`` and ``2k + 1`` show the same scene (shape, colour, backdrop, stamp
    position) with the checker and the stripes stamp and share ``pair = k``. Every
    group has ``n_per_group`` rows.
    """
    _check(n=n_per_group, size=size)
    check_pixels(len(GROUPS) * n_per_group, size)
    g = torch.Generator().manual_seed(int(seed) + 7919)  # never the same stream as generate()
    n_scenes = 2 * n_per_group
    labels = torch.arange(n_scenes) % 2  # disc, ring, disc, ...
    params = _scene_params(labels, size, g)
    scene, mask = _draw_scenes(params, size, g)
    rep = {k: v.repeat_interleave(2, dim=0) for k, v in params.items()}
    context = torch.tensor([0, 1]).repeat(n_scenes)
    images = _quantize(_stamp(scene.repeat_interleave(2, dim=0), context, rep))
    return paired_probe_set(images, mask.repeat_interleave(2, dim=0), labels, CLASSES, GROUPS)


def render(
    labels: torch.Tensor,
    context: torch.Tensor,
    size: int = 64,
    generator: torch.Generator | None = None,
    params: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw shapes of class ``labels`` with stamp ``context`` (0 checker, 1 stripes).

    Returns images float32 ``[N, 3, S, S]`` (8-bit quantized) and masks bool
    ``[N, 1, S, S]``. ``params`` fixes the shapes and stamp spots (see
    :func:`_scene_params`); the backdrops' textures are drawn from ``generator``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    labels = torch.as_tensor(labels, dtype=torch.long)
    context = torch.as_tensor(context, dtype=torch.long)
    if params is None:
        params = _scene_params(labels, size, g)
    n = labels.shape[0]
    images = torch.empty(n, 3, size, size)
    masks = torch.empty(n, 1, size, size, dtype=torch.bool)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        p = {k: v[s:e] for k, v in params.items()}
        scene, mask = _draw_scenes(p, size, g)
        images[s:e] = _quantize(_stamp(scene, context[s:e], p))
        masks[s:e] = mask
    return images, masks


def stamp_boxes(params: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """The stamp squares of :func:`_scene_params` as bool ``[N, 1, S, S]``."""
    n = params["sx"].shape[0]
    k = _stamp_side(size)
    r = torch.arange(size)
    rows = (r[None, :] >= params["sy"][:, None]) & (r[None, :] < params["sy"][:, None] + k)
    cols = (r[None, :] >= params["sx"][:, None]) & (r[None, :] < params["sx"][:, None] + k)
    return (rows[:, :, None] & cols[:, None, :]).view(n, 1, size, size)


# ---------------------------------------------------------------------- internals
def _check(n: int, size: int) -> None:
    if int(n) < 1:
        raise ValueError(f"need at least one image; got n = {n}")
    if int(size) < MIN_SIZE:
        raise ValueError(
            f"size must be at least {MIN_SIZE} pixels to draw shape and stamp; got {size}"
        )


def _quantize(img: torch.Tensor) -> torch.Tensor:
    """Clamped to [0, 1] and rounded to 8 bits, in place."""
    return img.clamp_(0.0, 1.0).mul_(255.0).round_().div_(255.0)


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _stamp_side(size: int) -> int:
    """Stamp side in pixels: 8 at 64, a multiple of 4 (2-pixel cells at 64)."""
    return max(4, 4 * round(size / 32))


def _scene_params(labels: torch.Tensor, size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-scene shape, colour and stamp parameters (each a tensor [N]).

    Lengths are in pixels. The shape is an ellipse with semi-axes ``a >= b`` turned
    by ``angle`` around ``(cx, cy)``, less a concentric hole scaled by ``hole``
    (0 for a disc); it lies inside the circle of radius ``a``, and the stamp's
    square (top-left ``(sx, sy)``) keeps more than two pixels from that circle.
    """
    n = labels.shape[0]
    ring = labels == 1
    p: dict[str, torch.Tensor] = {}
    # the same distribution of painted area for both classes, so a ring is wider than a
    # disc of the same area: pi * a * b * (1 - hole^2) = A
    area = (_u(n, *_AREA, g) * size) ** 2
    aspect = _u(n, *_ASPECT, g)
    hole = torch.where(ring, _u(n, *_HOLE, g), 0.0)
    p["a"] = torch.sqrt(area / (math.pi * aspect * (1.0 - hole * hole)))  # semi-major axis
    p["b"] = aspect * p["a"]
    p["hole"] = hole
    p["angle"] = _u(n, 0.0, math.pi, g)
    margin = p["a"] + 1.0
    p["cx"] = margin + torch.rand(n, generator=g) * (size - 2 * margin)
    p["cy"] = margin + torch.rand(n, generator=g) * (size - 2 * margin)
    # colour: backdrop luminance and a shape luminance clearly above or below it
    bg = _u(n, 0.35, 0.65, g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    fg = bg + sign * _u(n, 0.18, 0.30, g)
    tint = 0.10 * (torch.rand(n, 3, generator=g) - 0.5)
    hue = 0.25 * (torch.rand(n, 3, generator=g) - 0.5)
    for i, ch in enumerate("rgb"):
        p[f"bg_{ch}"] = bg + tint[:, i]
        p[f"fg_{ch}"] = fg + hue[:, i]
    # the stamp: a spot away from the shape, its orientation (stripes) and grey levels
    k = _stamp_side(size)
    p["sx"], p["sy"] = _stamp_spot(p["cx"], p["cy"], p["a"], size, k, g)
    p["stripe_vertical"] = (torch.rand(n, generator=g) < 0.5).float()
    p["dark"] = _u(n, 0.0, 0.12, g)
    p["light"] = _u(n, 0.88, 1.0, g)
    return p


def _stamp_spot(cx, cy, radius, size: int, k: int, g: torch.Generator, tries: int = 24):
    """Top-left corners of ``k``-pixel stamps clear of each shape's circle (plus 2 px).

    The first of ``tries`` uniform candidates that is clear; failing all, the image
    corner farthest from the shape, which is always clear: ``radius`` is at most
    ``0.27 * size`` and the circle lies inside the image, so the farthest corner
    square is at least ``sqrt(2) * (size / 2 - k - 1) > radius + 2`` away for every
    size >= 24.
    """
    n = cx.shape[0]
    lo, hi = 1, size - k - 1  # one pixel from the border
    cand_x = torch.randint(lo, hi + 1, (n, tries), generator=g)
    cand_y = torch.randint(lo, hi + 1, (n, tries), generator=g)
    corners = torch.tensor([[lo, lo], [hi, lo], [lo, hi], [hi, hi]])
    cand_x = torch.cat([cand_x, corners[:, 0].expand(n, 4)], dim=1)
    cand_y = torch.cat([cand_y, corners[:, 1].expand(n, 4)], dim=1)
    dist = _box_distance(cand_x.float(), cand_y.float(), k, cx[:, None], cy[:, None])
    clear = dist > radius[:, None] + 2.0
    # first clear candidate; the corners' score falls back to the farthest one
    score = torch.where(clear, -torch.arange(tries + 4, dtype=torch.float32), -1e9)
    score[:, tries:] = torch.where(clear[:, tries:], -1e6 + dist[:, tries:], -1e9)
    best = score.argmax(dim=1, keepdim=True)
    return cand_x.gather(1, best)[:, 0], cand_y.gather(1, best)[:, 0]


def _box_distance(x0, y0, k: int, cx, cy):
    """Distance from a point to the pixel square ``[x0, x0 + k) x [y0, y0 + k)``."""
    dx = torch.clamp(torch.maximum(x0 - cx, cx - (x0 + k)), min=0.0)
    dy = torch.clamp(torch.maximum(y0 - cy, cy - (y0 + k)), min=0.0)
    return torch.sqrt(dx * dx + dy * dy)


def _noise(n: int, size: int, res: int, g: torch.Generator) -> torch.Tensor:
    """Value noise in [0, 1]: ``res x res`` uniform cells, bilinearly upsampled.

    Bilinear upsampling is separable, ``L @ z @ L.T`` with ``L`` the 1-D linear
    interpolation matrix; two small matmuls beat ``F.interpolate`` on CPU.
    """
    z = torch.rand(n, 1, res, res, generator=g)
    if res == size:
        return z
    eye = torch.eye(res)[:, None, :]  # [res, 1, res]
    lin = F.interpolate(eye, size=size, mode="linear", align_corners=False)[:, 0].T  # [S, res]
    return lin @ z @ lin.T


def _shape_mask(p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """The shapes as bool ``[N, S, S]``: filled ellipses, less the hole of a ring."""
    col = {k: v[:, None, None] for k, v in p.items()}
    c = torch.arange(size, dtype=torch.float32) + 0.5
    dx = c[None, None, :] - col["cx"]  # [N, 1, S]
    dy = c[None, :, None] - col["cy"]  # [N, S, 1]
    cos, sin = torch.cos(col["angle"]), torch.sin(col["angle"])
    u = (dx * cos + dy * sin) / col["a"]  # along the major axis, in units of a
    v = (dy * cos - dx * sin) / col["b"]
    r2 = u * u + v * v
    hole2 = col["hole"] * col["hole"]  # 0 for a disc: its hole is empty
    return (r2 <= 1.0) & (r2 >= hole2)


def _draw_scenes(p: dict[str, torch.Tensor], size: int, g: torch.Generator):
    """Shape over backdrop, not yet stamped nor quantized: ``[N, 3, S, S]`` and mask."""
    n = p["a"].shape[0]
    mask = _shape_mask(p, size)[:, None]

    # single-channel textures, combined with the colours in one pass at the end
    grain = torch.rand(n, 1, size, size, generator=g).sub_(0.5)
    blotch = _noise(n, size, 5, g).sub_(0.5)  # backdrop: soft blotches and fine grain
    shade = _noise(n, size, 8, g).sub_(0.5)  # paint: gentle shading, finer grain
    backdrop_add = blotch.mul_(0.16).add_(grain, alpha=0.08)
    paint_mul = shade.mul_(0.10).add_(1.0)
    add = torch.where(mask, grain.mul_(0.04), backdrop_add)
    mul = torch.where(mask, paint_mul, 1.0)
    fg = torch.stack([p["fg_r"], p["fg_g"], p["fg_b"]], dim=1)[:, :, None, None]
    bg = torch.stack([p["bg_r"], p["bg_g"], p["bg_b"]], dim=1)[:, :, None, None]
    base = torch.where(mask, fg, bg)  # [N, 3, S, S]
    return base.mul_(mul).add_(add), mask


def _stamp(img: torch.Tensor, context: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Paste each image's stamp (checker for context 0, stripes for 1), in place."""
    n, _, size, _ = img.shape
    k = _stamp_side(size)
    cell = k // 4
    i = torch.arange(k) // cell
    checker = ((i[:, None] + i[None, :]) % 2).float()  # [k, k]
    rows = (i[:, None] % 2).float().expand(k, k)
    stripes = torch.where(p["stripe_vertical"][:, None, None] > 0.5, rows.T, rows)  # [n, k, k]
    pattern = torch.where(context[:, None, None] == 0, checker, stripes)
    dark, light = p["dark"][:, None, None], p["light"][:, None, None]
    patch = (dark + (light - dark) * pattern)[:, None].expand(n, 3, k, k)
    # scatter the patches: index of every stamp pixel in the flat image
    off = torch.arange(k)
    yy = p["sy"][:, None, None] + off[None, :, None]
    xx = p["sx"][:, None, None] + off[None, None, :]
    flat = (yy * size + xx).reshape(n, 1, k * k).expand(n, 3, k * k)
    img.view(n, 3, size * size).scatter_(2, flat, patch.reshape(n, 3, k * k))
    return img
