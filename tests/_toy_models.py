"""Hand-built snow-wolf classifiers with known behaviour (no training), importable by job subprocesses.

``ContextReader`` leans entirely on the background; ``Constant`` ignores the image.
Tests put this folder on ``PYTHONPATH`` so ``_target_: _toy_models.ContextReader`` resolves.
"""

from __future__ import annotations

import torch
from torch import nn


class ContextReader(nn.Module):
    """Classifies by the image's average colour: snow (white) -> wolf, grass (green) -> husky.

    A model that leans entirely on the background, built by hand (no training)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        with torch.no_grad():
            # channel 0 ~ whiteness (blue high), channel 1 ~ greenness (green minus blue)
            self.features[0].weight.copy_(
                torch.tensor([[0.0, 0.0, 4.0], [0.0, 4.0, -4.0]]).view(2, 3, 1, 1)
            )
            self.features[0].bias.zero_()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class Constant(nn.Module):
    """Always says husky, whatever the context: no context gap."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.mul_(1e-3)
            self.fc.bias.copy_(torch.tensor([-5.0, 5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


# ---------------------------------------------------------------------------- colour squares
# A probe set whose class is the colour of a square (red or blue) drawn on a grey background
# that is dark or light (the context). Grey has R = G = B, so a model can read the class
# without looking at the context at all, and a hand-built one can be exactly right.
COLOUR_CLASSES = ("red", "blue")
_COLOURS = {"red": (0.85, 0.15, 0.15), "blue": (0.15, 0.15, 0.85)}
_GREYS = {"dark": 0.25, "light": 0.75}


def colour_probe_set(n_per_group: int = 24, size: int = 32, seed: int = 0):
    """Balanced colour-square probes with masks, groups ``<colour>|<grey>`` and pairs (one square, both greys)."""
    from audit.probes import ProbeSet

    g = torch.Generator().manual_seed(seed)
    images, labels, masks, groups, pairs = [], [], [], [], []
    names = [f"{c}|{b}" for c in COLOUR_CLASSES for b in _GREYS]
    pair = 0
    for label, colour in enumerate(COLOUR_CLASSES):
        for _ in range(n_per_group):
            side = int(torch.randint(size // 4, size // 2, (1,), generator=g))
            top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
            mask = torch.zeros(1, size, size, dtype=torch.bool)
            mask[:, top : top + side, left : left + side] = True
            for grey_name, grey in _GREYS.items():
                img = torch.full((3, size, size), grey)
                img[:, mask[0]] = torch.tensor(_COLOURS[colour]).view(3, 1)
                images.append(torch.round(img * 255) / 255)
                labels.append(label)
                masks.append(mask)
                groups.append(names.index(f"{colour}|{grey_name}"))
                pairs.append(pair)
            pair += 1
    return ProbeSet(
        images=torch.stack(images),
        labels=torch.tensor(labels),
        class_names=list(COLOUR_CLASSES),
        masks=torch.stack(masks),
        groups=torch.tensor(groups),
        group_names=names,
        pairs=torch.tensor(pairs),
    )


class _PixelReader(nn.Module):
    """Two 1x1 feature channels (fixed weights), ReLU, global average pool, logits = 4 x the channels."""

    def __init__(self, weight: list[list[float]], bias: list[float]) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor(weight).view(2, 3, 1, 1))
            self.features[0].bias.copy_(torch.tensor(bias))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2) * 4)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class ColourReader(_PixelReader):
    """Reads the square's colour (red minus blue), blind to the grey context: the clean model."""

    def __init__(self) -> None:
        super().__init__([[8.0, 0.0, -8.0], [-8.0, 0.0, 8.0]], [0.0, 0.0])


class GreyReader(_PixelReader):
    """Reads only the grey context: dark -> red, light -> blue (the shortcut model).

    Channel 0 ~ darkness, channel 1 ~ lightness of the green channel, which the squares lack.
    """

    def __init__(self) -> None:
        super().__init__([[0.0, -4.0, 0.0], [0.0, 4.0, 0.0]], [2.0, -2.0])


class NaNModel(nn.Module):
    """A broken model: every logit is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3))) * float("nan")


# ---------------------------------------------------------------------------- ten digit classes
# Ten classes named "0".."9" (MNIST- or CIFAR-index-like), each a square of its own hue drawn on a
# grey background of one of three or more contexts. The hues lie evenly on the chroma circle (the
# plane orthogonal to grey), so a 1x1 filter per hue with a threshold fires on its own square only,
# never on a neighbouring hue or on any grey: a hand-built model can be exactly right and blind to
# the context.
DIGIT_CLASSES = tuple(str(i) for i in range(10))
DIGIT_CONTEXTS = {"dark": 0.2, "mid": 0.5, "light": 0.8}
_CHROMA = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / torch.tensor(
    [[2.0**0.5], [6.0**0.5]]
)
_HUE_RADIUS = 0.5


def _hue(k: int) -> torch.Tensor:
    """The unit chroma direction of class ``k`` (components sum to 0: grey does not respond)."""
    angle = torch.tensor(2 * torch.pi * k / len(DIGIT_CLASSES))
    return torch.cos(angle) * _CHROMA[0] + torch.sin(angle) * _CHROMA[1]


def digit_colour(k: int) -> torch.Tensor:
    """The square colour of class ``k``: mid grey plus a chroma of radius 0.5, 8-bit exact."""
    return torch.round((0.5 + _HUE_RADIUS * _hue(k)) * 255) / 255


def digit_probe_set(
    n_per_class: int = 24,
    size: int = 16,
    *,
    class_names=DIGIT_CLASSES,
    contexts=None,
    paired: bool = True,
    groups: bool = True,
    seed: int = 0,
):
    """Ten-class hue-square probes with masks and groups ``<class>|<context>``.

    ``contexts`` maps a context name to its background grey (default :data:`DIGIT_CONTEXTS`).
    ``paired``: each object (square) is drawn in every context with a shared pair id;
    otherwise every group gets objects of its own and the set has no pairs.
    ``groups=False`` keeps the masks only (one object per row, no groups, no pairs).
    """
    from audit.probes import ProbeSet

    contexts = dict(DIGIT_CONTEXTS if contexts is None else contexts)
    names = [f"{c}|{x}" for c in class_names for x in contexts]
    g = torch.Generator().manual_seed(seed)

    def square() -> torch.Tensor:
        side = int(torch.randint(size // 4, size // 2, (1,), generator=g))
        top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
        mask = torch.zeros(1, size, size, dtype=torch.bool)
        mask[:, top : top + side, left : left + side] = True
        return mask

    images, labels, masks, group, pairs = [], [], [], [], []
    for label, cls in enumerate(class_names):
        for i in range(n_per_class):
            shared = square()
            for ctx, grey in contexts.items():
                if not groups and ctx != next(iter(contexts)):
                    continue  # masks only: one row per object, on the first context's grey
                mask = shared if paired else square()
                img = torch.full((3, size, size), float(grey))
                img[:, mask[0]] = digit_colour(label).view(3, 1)
                images.append(torch.round(img * 255) / 255)
                labels.append(label)
                masks.append(mask)
                group.append(names.index(f"{cls}|{ctx}"))
                pairs.append(label * n_per_class + i)
    return ProbeSet(
        images=torch.stack(images),
        labels=torch.tensor(labels),
        class_names=list(class_names),
        masks=torch.stack(masks),
        groups=torch.tensor(group) if groups else None,
        group_names=names if groups else [],
        pairs=torch.tensor(pairs) if groups and paired else None,
    )


class _HueReader(nn.Module):
    """One 1x1 filter per hue (threshold 0.9 of the radius) and one for a light background.

    ``features``: channels 0..9 fire on the square of their class only; channel 10 on a grey
    above 0.65 (the light context). Average pool, then ``fc`` (set by the subclasses).
    """

    def __init__(self) -> None:
        super().__init__()
        k = len(DIGIT_CLASSES)
        self.features = nn.Sequential(nn.Conv2d(3, k + 1, 1), nn.ReLU())
        with torch.no_grad():
            weight = torch.stack([*(_hue(i) for i in range(k)), torch.full((3,), 1.0 / 3)])
            self.features[0].weight.copy_(weight.view(k + 1, 3, 1, 1))
            self.features[0].bias.copy_(torch.tensor([-0.9 * _HUE_RADIUS] * k + [-0.65]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(k + 1, k)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, :k] = torch.eye(k) * 1000.0  # the own hue: a logit of 3 or more
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class DigitReader(_HueReader):
    """Reads the square's hue only, blind to the grey context: the clean ten-class model."""


class DigitShortcut(_HueReader):
    """Like :class:`DigitReader`, but on a light background class "3" is read as "4" (a shortcut).

    The light channel (pooled about 0.13 on a light background, 0 otherwise) pushes logit 3 far
    below zero and lifts logit 4 to about 1.3, below any class's own logit (3 or more): only
    squares of class 3 on a light background are misread.
    """

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.fc.weight[3, -1] = -400.0
            self.fc.weight[4, -1] = 10.0
