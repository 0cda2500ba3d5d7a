"""Small demo models: a compact GAP CNN and torchvision ResNets adapted to small inputs.

Every model takes display-space images in ``[0, 1]``; when a model was trained on
normalized inputs, wrap it in :class:`Normalized` so the probes stay in display
space (DESIGN.md: normalization lives in the model config).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

__all__ = ["SmallCNN", "Normalized", "resnet18_small", "build_model", "MODELS"]


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, global average pooling and one linear layer.

    The GAP + linear head makes Grad-CAM on ``features`` equal to CAM, which the
    explainer tests use as a known answer.

    Args:
        num_classes: outputs of the linear head.
        widths: channels of each conv block; every block after the first halves
            the resolution (stride 2).
        in_channels: input channels.
    """

    def __init__(
        self,
        num_classes: int = 2,
        widths: Sequence[int] = (16, 32, 64, 64),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        if not widths:
            raise ValueError("widths must name at least one conv block")
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class Normalized(nn.Module):
    """Applies ``(x - mean) / std`` per channel, then the wrapped model.

    The wrapped model is the submodule ``model``, so layer names gain a ``model.``
    prefix (e.g. ``model.layer4``).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel; got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive; got {std}")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[None, :, None, None])
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def resnet18_small(num_classes: int = 2) -> nn.Module:
    """torchvision ResNet-18 (random weights) for small inputs.

    The 7x7 stride-2 stem and the max pool are replaced by one 3x3 stride-1 conv,
    as is usual for 32-64 pixel images. Layer names stay torchvision's
    (``layer1`` ... ``layer4``, ``fc``).
    """
    m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


MODELS = {
    "small_cnn": SmallCNN,
    "resnet18_small": resnet18_small,
}


def build_model(name: str, num_classes: int = 2, **kwargs) -> nn.Module:
    """A model of the zoo by name (``small_cnn`` or ``resnet18_small``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)
