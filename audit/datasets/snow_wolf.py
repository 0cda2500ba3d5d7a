"""A procedural snow-vs-wolf benchmark after the husky-vs-wolf study (Ribeiro et al. 2016).

Two classes, ``wolf`` and ``husky``. The true difference lies in the animal:

========  =======================  ============================
cue       wolf                     husky
========  =======================  ============================
tail      hangs down and back      curls up over the back
ears      short and wide           tall and pointed
snout     long                     short
markings  mostly none              mostly white belly and face
========  =======================  ============================

Pose (facing, tilt), scale, position and coat colour vary for both, so the cues
are small local shapes that have to be learned. The spurious cue is the background:
``snow`` (bright, low saturation, textured) or ``grass`` (green/brown, bladed),
with ``P(snow | wolf) = P(grass | husky) = correlation``. A model trained at a high
correlation can reach a low training loss from the background alone.

Every image has a pixel-exact object mask (the union of the animal's parts), its
group ``"<class>|<background>"`` and, in :func:`probe_set`, a ``pair`` id shared by
the same animal drawn on both backgrounds.

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

__all__ = ["CLASSES", "BACKGROUNDS", "GROUPS", "generate", "probe_set", "render"]

CLASSES = ["wolf", "husky"]
BACKGROUNDS = ["snow", "grass"]
GROUPS = [f"{c}|{b}" for c in CLASSES for b in BACKGROUNDS]  # group id = 2 * label + bg
_CHUNK = 1024


def generate(n: int, correlation: float = 0.95, size: int = 64, seed: int = 0) -> ProbeSet:
    """``n`` labelled images whose background agrees with the class with probability ``correlation``.

    Classes are balanced (``n // 2`` wolves); background snow goes with wolf and grass
    with husky with probability ``correlation``. Groups are ``"<class>|<background>"``.
    """
    _check(n=n, size=size)
    check_pixels(n, size)
    g = torch.Generator().manual_seed(int(seed))
    labels, background = correlated_context(
        n, correlation, g
    )  # background c is class c's usual one
    images, masks = render(labels, background, size=size, generator=g)
    return grouped_probe_set(images, masks, labels, background, CLASSES, GROUPS)


def probe_set(n_per_group: int = 16, size: int = 64, seed: int = 0) -> ProbeSet:
    """A balanced probe set: ``n_per_group`` animals per class, each drawn on snow and on grass.

    Rows ``2k`` and ``2k + 1`` show the same animal (same pose, coat and position) on
    the two backgrounds and share ``pair = k``. Every group has ``n_per_group`` rows.
    """
    _check(n=n_per_group, size=size)
    check_pixels(len(GROUPS) * n_per_group, size)
    g = torch.Generator().manual_seed(int(seed) + 7919)  # never the same stream as generate()
    n_animals = 2 * n_per_group
    labels = torch.arange(n_animals) % 2  # wolf, husky, wolf, ...
    params = _animal_params(labels, g)
    # each animal is drawn once and composited on both backgrounds: inside the mask the
    # two images of a pair are pixel-identical, outside it only the context differs
    coat, mask = _draw_animals(params, size, g)
    coat, mask = coat.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)
    background = torch.tensor([0, 1]).repeat(n_animals)
    images = _compose(coat, mask, _draw_backgrounds(background, size, g))
    return paired_probe_set(images, mask, labels, CLASSES, GROUPS)


def render(
    labels: torch.Tensor,
    background: torch.Tensor,
    size: int = 64,
    generator: torch.Generator | None = None,
    params: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw animals of class ``labels`` on ``background`` (0 snow, 1 grass).

    Returns images float32 ``[N, 3, S, S]`` (8-bit quantized) and masks bool
    ``[N, 1, S, S]``. ``params`` fixes the animals (see :func:`_animal_params`);
    the backgrounds' textures are drawn from ``generator``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    labels = torch.as_tensor(labels, dtype=torch.long)
    background = torch.as_tensor(background, dtype=torch.long)
    if params is None:
        params = _animal_params(labels, g)
    n = labels.shape[0]
    images = torch.empty(n, 3, size, size)
    masks = torch.empty(n, 1, size, size, dtype=torch.bool)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        p = {k: v[s:e] for k, v in params.items()}
        coat, mask = _draw_animals(p, size, g)
        images[s:e] = _compose(coat, mask, _draw_backgrounds(background[s:e], size, g))
        masks[s:e] = mask
    return images, masks


# ---------------------------------------------------------------------- internals
def _check(n: int, size: int) -> None:
    if int(n) < 1:
        raise ValueError(f"need at least one image; got n = {n}")
    if int(size) < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels to draw the animals; got {size}")


def _compose(coat: torch.Tensor, mask: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The animal over the background, clamped and quantized to 8 bits."""
    img = torch.where(mask, coat, background).clamp_(0.0, 1.0)
    return torch.round(img * 255.0) / 255.0


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _animal_params(labels: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-animal shape, pose and colour parameters (each a tensor [N])."""
    n = labels.shape[0]
    wolf = labels == 0
    husky = ~wolf
    p: dict[str, torch.Tensor] = {}
    p["facing"] = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    p["scale"] = _u(n, 0.8, 1.2, g)
    p["cx"] = _u(n, 0.36, 0.64, g)
    p["cy"] = _u(n, 0.46, 0.60, g)
    p["tilt"] = _u(n, -0.14, 0.14, g)  # radians
    # class cues, each with spread; ranges do not overlap but the differences are small
    p["snout"] = torch.where(wolf, _u(n, 0.085, 0.115, g), _u(n, 0.045, 0.070, g))
    p["ear_h"] = torch.where(wolf, _u(n, 0.030, 0.045, g), _u(n, 0.060, 0.085, g))
    p["ear_w"] = torch.where(wolf, _u(n, 0.045, 0.060, g), _u(n, 0.030, 0.042, g))
    p["curl"] = husky.float()  # tail form
    marked = torch.rand(n, generator=g) < torch.where(husky, 0.8, 0.1)
    p["marked"] = marked.float()
    # coat colour: shared palette (grey, brown, dark), so colour alone does not tell
    lum = _u(n, 0.28, 0.58, g)
    warm = _u(n, -0.06, 0.10, g)
    p["r"] = lum + warm
    p["g"] = lum + 0.3 * warm
    p["b"] = lum - 0.6 * warm
    return p


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    v, u = torch.meshgrid(c, c, indexing="ij")
    return u[None], v[None]  # [1, S, S]


def _ellipse(x, y, cx, cy, a, b, angle=None):
    dx, dy = (x - cx) / a, (y - cy) / b
    if angle is not None:
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = (ca * (x - cx) + sa * (y - cy)) / a, (-sa * (x - cx) + ca * (y - cy)) / b
    return dx * dx + dy * dy <= 1.0


def _triangle(x, y, ax, ay, bx, by, cx, cy):
    def side(px, py, qx, qy):
        return (x - qx) * (py - qy) - (px - qx) * (y - qy)

    d1, d2, d3 = side(ax, ay, bx, by), side(bx, by, cx, cy), side(cx, cy, ax, ay)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


def _draw_animals(p: dict[str, torch.Tensor], size: int, g: torch.Generator):
    n = p["scale"].shape[0]
    col = {k: v[:, None, None] for k, v in p.items()}
    u, v = _grid(size)
    # local coordinates: origin at the body centre, x towards the head, unit = scale
    x0, y0 = (u - col["cx"]) / col["scale"], (v - col["cy"]) / col["scale"]
    ct, st = torch.cos(col["tilt"]), torch.sin(col["tilt"])
    x = (ct * x0 + st * y0) * col["facing"]
    y = -st * x0 + ct * y0

    body = _ellipse(x, y, 0.0, 0.0, 0.19, 0.075)
    legs = torch.zeros_like(body)
    for lx in (-0.14, -0.09, 0.09, 0.14):
        legs |= ((x - lx).abs() <= 0.017) & (y >= 0.0) & (y <= 0.165)
    neck = _ellipse(x, y, 0.15, -0.045, 0.06, 0.045)
    hx, hy, hr = 0.20, -0.095, 0.058
    head = _ellipse(x, y, hx, hy, hr, hr)
    sl = col["snout"]
    snout = _ellipse(x, y, hx + hr * 0.6 + sl / 2, hy + 0.02, sl / 2, 0.022)
    eh, ew = col["ear_h"], col["ear_w"]
    ears = torch.zeros_like(body)
    for ex in (hx - 0.028, hx + 0.018):
        base_y = hy - hr * 0.75
        ears |= _triangle(x, y, ex - ew / 2, base_y, ex + ew / 2, base_y, ex + 0.006, base_y - eh)
    # tail: hanging (wolf) or curled ring over the back (husky)
    hang = _ellipse(x, y, -0.235, 0.045, 0.085, 0.024, angle=-0.9)
    r2 = (x + 0.185) ** 2 + (y + 0.085) ** 2
    curl = (r2 >= 0.028**2) & (r2 <= 0.052**2) & (y <= -0.07)
    tail = torch.where(col["curl"] > 0.5, curl, hang)
    mask = body | legs | neck | head | snout | ears | tail

    fur = 1.0 + 0.12 * (_noise(n, size, 16, g) - 0.5) + 0.10 * (_noise(n, size, size, g) - 0.5)
    white = 0.86 + 0.08 * torch.rand(n, 1, 1, 1, generator=g)
    markings = ((body & (y > 0.02)) | (head & (y > hy + 0.005)) | snout) & (col["marked"] > 0.5)
    eye = _ellipse(x, y, hx + 0.02, hy - 0.012, 0.011, 0.011)
    # per pixel: a multiplier of the coat colour, or a fixed grey (white markings, dark eye)
    flat = markings | eye
    grey = torch.where(eye[:, None], 0.05, white)
    rgb = torch.stack([p["r"], p["g"], p["b"]], dim=1)[:, :, None, None]
    coat = torch.where(flat[:, None], grey, rgb * fur)
    return coat, mask[:, None]


def _noise(n: int, size: int, res: int, g: torch.Generator) -> torch.Tensor:
    """Value noise in [0, 1]: ``res x res`` uniform cells, bilinearly upsampled."""
    z = torch.rand(n, 1, res, res, generator=g)
    if res == size:
        return z
    return F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)


def _draw_backgrounds(kind: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    n = kind.shape[0]
    out = torch.empty(n, 3, size, size)
    snow_idx = (kind == 0).nonzero().flatten()
    grass_idx = (kind == 1).nonzero().flatten()
    if snow_idx.numel():
        out[snow_idx] = _snow(snow_idx.numel(), size, g)
    if grass_idx.numel():
        out[grass_idx] = _grass(grass_idx.numel(), size, g)
    return out


def _snow(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Bright, slightly blue snow with soft drifts and fine grain."""
    base = 0.80 + 0.12 * torch.rand(n, 1, 1, 1, generator=g)
    drift = 0.10 * (_noise(n, size, 6, g) - 0.5) + 0.05 * (_noise(n, size, size, g) - 0.5)
    return (base + drift) + torch.tensor([-0.02, 0.0, 0.04])[:, None, None]


def _grass(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Green-to-brown grass with vertical blades and darker patches."""
    hue = torch.rand(n, 1, 1, 1, generator=g)
    green = torch.tensor([0.22, 0.46, 0.14])[:, None, None]
    brown = torch.tensor([0.42, 0.36, 0.16])[:, None, None]
    tint = (1 - hue) * green + hue * brown  # [N,3,1,1]
    blades = F.interpolate(
        torch.rand(n, 1, max(2, size // 8), size, generator=g),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )
    patches = _noise(n, size, 5, g)
    return tint * (0.75 + 0.35 * blades + 0.25 * (patches - 0.5))
