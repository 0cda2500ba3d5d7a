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
            self.features[0].weight.copy_(torch.tensor([[0.0, 0.0, 4.0], [0.0, 4.0, -4.0]]).view(2, 3, 1, 1))
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
        images=torch.stack(images), labels=torch.tensor(labels), class_names=list(COLOUR_CLASSES),
        masks=torch.stack(masks), groups=torch.tensor(groups), group_names=names, pairs=torch.tensor(pairs),
    )  # fmt: skip


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
