"""One small member of every torchvision family, with random weights that give non-trivial logits.

``build(name)`` returns an eval-mode model and its input size. Where torchvision's
classes allow it the member is shrunk (two stages, narrow; VGG's 4096-wide head
narrowed) so that a forward+backward takes milliseconds on a CPU; the others are the
smallest named variant at a small input size. Inception v3 (at least 75 px, 27M
parameters) is left to the slow test of the full-size members; GoogLeNet covers its
blocks here. Two things make random weights usable for attribution tests:

* BatchNorm statistics are calibrated on a random batch (cumulative average, as after
  training): with the default statistics (mean 0, variance 1) deep nets such as
  EfficientNet shrink every activation and return logits of ~1e-13.
* torchvision's ViT head is zero-initialised; it is re-drawn, or every gradient is 0.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.densenet import DenseNet
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig
from torchvision.models.maxvit import MaxVit
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)
from torchvision.models.vision_transformer import VisionTransformer


def _vit() -> nn.Module:
    m = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=2,
    )
    nn.init.normal_(m.heads.head.weight, std=0.02)
    return m


def _swin(v2: bool) -> nn.Module:
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=[4, 4],
        num_classes=2,
        **extra,
    )


def _narrow_head(m: nn.Module, features: int) -> nn.Module:
    """torchvision's 4096-wide head (60-120M parameters) narrowed to 64; the blocks stay theirs."""
    m.classifier = nn.Sequential(
        nn.Dropout(),
        nn.Linear(features, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 64),
        nn.ReLU(True),
        nn.Linear(64, 2),
    )
    return m


FAMILIES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet": (lambda: tvm.resnet18(num_classes=2), 32),
    "vgg": (lambda: _narrow_head(tvm.vgg11_bn(num_classes=2), 512 * 7 * 7), 32),
    "alexnet": (lambda: _narrow_head(tvm.alexnet(num_classes=2), 256 * 6 * 6), 64),
    "densenet": (
        lambda: DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=2),
        32,
    ),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=2), 32),
    "mobilenet_v3": (lambda: tvm.mobilenet_v3_small(num_classes=2), 32),
    "efficientnet": (
        lambda: EfficientNet(
            [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 2)],
            dropout=0.2,
            num_classes=2,
        ),
        32,
    ),
    "efficientnet_v2": (
        lambda: EfficientNet(
            [
                FusedMBConvConfig(1, 3, 1, 16, 16, 1),
                FusedMBConvConfig(4, 3, 2, 16, 24, 1),
                MBConvConfig(4, 3, 2, 24, 32, 2),
            ],
            dropout=0.2,
            num_classes=2,
            last_channel=64,
        ),
        32,
    ),
    "convnext": (
        lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=2),
        32,
    ),
    "regnet": (
        lambda: RegNet(
            BlockParams.from_init_params(4, 16, 8, 2, 8, se_ratio=0.25),
            num_classes=2,
            stem_width=16,
        ),
        32,
    ),
    "shufflenet": (lambda: tvm.shufflenet_v2_x0_5(num_classes=2), 32),
    "squeezenet": (lambda: tvm.squeezenet1_1(num_classes=2), 32),
    "mnasnet": (lambda: tvm.mnasnet0_5(num_classes=2), 32),
    "googlenet": (lambda: tvm.googlenet(num_classes=2, aux_logits=False, init_weights=True), 32),
    "swin": (lambda: _swin(False), 32),
    "swin_v2": (lambda: _swin(True), 32),
    "vit": (_vit, 32),
    "maxvit": (
        lambda: MaxVit(
            input_size=(32, 32),
            stem_channels=8,
            partition_size=2,
            block_channels=[16, 32],
            block_layers=[1, 1],
            head_dim=8,
            stochastic_depth_prob=0.0,
            num_classes=2,
        ),
        32,
    ),
}


def calibrate(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    """BatchNorm running statistics set to those of a random batch; returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model.train()(
            torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(seed + 99))
        )
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def build(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    """A fresh copy of the (cached) calibrated member: several test files use the same models."""
    model, size = _build(name, seed)
    return copy.deepcopy(model), size


@functools.cache
def _build(name: str, seed: int) -> tuple[nn.Module, int]:
    make, size = FAMILIES[name]
    torch.manual_seed(seed)
    return calibrate(make(), size, seed), size


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
