"""Small demo models: a compact GAP CNN, and torchvision ResNet, ViT and ConvNeXt adapted to small inputs.

Every model takes display-space images in ``[0, 1]``; when a model was trained on
normalized inputs, wrap it in :class:`Normalized` so the probes stay in display
space: normalization belongs to the model (its config's ``normalization``), never to the probes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

__all__ = [
    "SmallCNN",
    "Normalized",
    "resnet18_small",
    "small_vit",
    "small_convnext",
    "build_model",
    "MODELS",
]


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


def small_vit(
    num_classes: int = 2,
    image_size: int = 64,
    patch_size: int = 8,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 96,
    mlp_dim: int = 192,
) -> nn.Module:
    """A small torchvision Vision Transformer (random weights) for 64 pixel images.

    ``torchvision.models.vision_transformer.VisionTransformer`` itself, so its layer
    names stay torchvision's (``conv_proj``, ``encoder.layers.encoder_layer_<i>``,
    ``encoder.ln``, ``heads.head``): the explainers find their defaults as on a
    ViT-B/16 (Grad-CAM: the last block's ``ln_1``). The defaults give an 8x8 grid of
    8x8 patches plus a class token, 4 blocks of width 96 (about 0.3 M parameters).
    torchvision zero-initialises the head; training moves it off zero at the first step.
    The input size is fixed (``image_size``; a ViT's position embedding has one length).

    Args:
        num_classes: outputs of the head.
        image_size: side of the (square) input images; a multiple of ``patch_size``.
        patch_size: side of the square patches.
        num_layers: transformer blocks.
        num_heads: attention heads; divides ``hidden_dim``.
        hidden_dim: token width.
        mlp_dim: hidden width of each block's MLP.
    """
    from torchvision.models.vision_transformer import VisionTransformer

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(
            f"image_size must be a multiple of patch_size; got {image_size} and {patch_size}"
        )
    if num_heads < 1 or hidden_dim % num_heads:
        raise ValueError(f"num_heads must divide hidden_dim; got {num_heads} and {hidden_dim}")
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
    )


def small_convnext(
    num_classes: int = 2,
    widths: Sequence[int] = (32, 64, 128),
    depths: Sequence[int] = (2, 2, 2),
    norm: str = "batch",
    layer_scale: float = 1e-6,
    stochastic_depth_prob: float = 0.0,
) -> nn.Module:
    """A small torchvision ConvNeXt (random weights) for 32-64 pixel images.

    ``torchvision.models.convnext.ConvNeXt`` with one stage per entry of ``widths``:
    the 4x4 stride-4 patchify stem, then ``depths[i]`` ConvNeXt blocks of width
    ``widths[i]``, with a 2x2 stride-2 downsampling layer between stages. Layer names
    stay torchvision's: ``features.0`` the stem, ``features.1``, ``features.3``,
    ``features.5`` the stages (``features.2``, ``features.4`` the downsampling),
    ``classifier``. The defaults map a 64 pixel image to 16x16, 8x8 and 4x4 with about
    0.4 M parameters (Grad-CAM's default layer: ``features``, the last stage's output).

    ``norm`` is the normalization of the stem, the downsampling layers and the head
    (torchvision's ``norm_layer``; the blocks keep their LayerNorm). ``"layer"`` is
    torchvision's ConvNeXt exactly: a LayerNorm over the channels of each position,
    which, with the stem's zero-initialised bias, gives a flat patch the same features at
    any brightness (a flat grey patch ``g * 1`` gives ``g * W 1``: one direction for
    every ``g``), and normalizes the residual stream so at every downsampling. On
    snow-wolf, where the animals differ in small shapes and in shades of their coats,
    that model stayed at chance in our runs (rho 0.5: validation accuracy 0.50 after 6-8
    epochs at learning rates 3e-3 and 1e-3, also with ``layer_scale`` 1; it did not fit
    512 training images in 600 steps either). ``"batch"`` (the default) puts BatchNorm
    there instead, which normalizes each channel over the batch and keeps brightness:
    that model learns the animals.

    Args:
        num_classes: outputs of the classifier.
        widths: channels of each stage.
        depths: blocks in each stage (as many as ``widths``).
        norm: ``"batch"`` (BatchNorm) or ``"layer"`` (torchvision's LayerNorm) in the
            stem, the downsampling layers and the head.
        layer_scale: initial scale of each block's residual branch (torchvision's default).
        stochastic_depth_prob: largest drop-path rate (0: none).
    """
    from functools import partial

    from torchvision.models.convnext import CNBlockConfig, ConvNeXt, LayerNorm2d

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    widths, depths = [int(w) for w in widths], [int(d) for d in depths]
    if not widths or len(widths) != len(depths):
        raise ValueError(
            f"widths and depths need one entry per stage (at least one); got {widths} and {depths}"
        )
    if min(widths) < 1 or min(depths) < 1:
        raise ValueError(f"widths and depths must be positive; got {widths} and {depths}")
    norms = {"batch": nn.BatchNorm2d, "layer": partial(LayerNorm2d, eps=1e-6)}
    if norm not in norms:
        raise ValueError(f"norm must be one of {sorted(norms)}; got {norm!r}")
    stages = [
        CNBlockConfig(w, widths[i + 1] if i + 1 < len(widths) else None, d)
        for i, (w, d) in enumerate(zip(widths, depths, strict=True))
    ]
    return ConvNeXt(
        stages,
        stochastic_depth_prob=stochastic_depth_prob,
        layer_scale=layer_scale,
        num_classes=num_classes,
        norm_layer=norms[norm],
    )


MODELS = {
    "small_cnn": SmallCNN,
    "resnet18_small": resnet18_small,
    "small_vit": small_vit,
    "small_convnext": small_convnext,
}


def build_model(name: str, num_classes: int = 2, **kwargs) -> nn.Module:
    """A model of the zoo by name (``small_cnn``, ``resnet18_small``, ``small_vit``, ``small_convnext``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)
