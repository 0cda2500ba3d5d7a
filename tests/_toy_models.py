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
