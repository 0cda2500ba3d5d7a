"""Tiny Hugging Face ``transformers`` image classifiers (random weights, 32 px) and their folders.

``build(family)`` gives an eval-mode ``*ForImageClassification`` of one of the six families the
loader supports; ``save(family, folder)`` writes what ``model.save_pretrained(folder)`` and
``image_processor.save_pretrained(folder)`` write (``config.json``, ``model.safetensors``,
``preprocessor_config.json``). Nothing is downloaded: every model is built from a config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SIZE = 32
#: the image processor's normalization written by :func:`save` (not ImageNet's, so a test sees it used)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
FAMILIES = ("vit", "deit", "swin", "convnext", "beit", "resnet")


def build(family: str, num_labels: int = 2, seed: int = 0) -> nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    vit_like = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=SIZE,
        patch_size=8,
    )
    configs = {
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**vit_like, num_labels=num_labels)),
        "deit": lambda: T.DeiTForImageClassification(
            T.DeiTConfig(**vit_like, num_labels=num_labels)
        ),
        "beit": lambda: T.BeitForImageClassification(
            T.BeitConfig(**vit_like, vocab_size=64, num_labels=num_labels)
        ),
        "swin": lambda: T.SwinForImageClassification(
            T.SwinConfig(
                image_size=SIZE,
                patch_size=4,
                embed_dim=16,
                depths=[1, 1],
                num_heads=[1, 2],
                window_size=4,
                num_labels=num_labels,
            )
        ),
        "convnext": lambda: T.ConvNextForImageClassification(
            T.ConvNextConfig(
                hidden_sizes=[16, 32],
                depths=[1, 1],
                num_stages=2,
                image_size=SIZE,
                num_labels=num_labels,
            )
        ),
        "resnet": lambda: T.ResNetForImageClassification(
            T.ResNetConfig(
                embedding_size=16,
                hidden_sizes=[16, 32],
                depths=[1, 1],
                layer_type="basic",
                num_labels=num_labels,
            )
        ),
    }
    return configs[family]().eval()


def processor(size: int = SIZE):
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=MEAN, image_std=STD)


def save(family: str, folder: Path, model: nn.Module | None = None, num_labels: int = 2) -> Path:
    """``folder`` holding the model's and its processor's ``save_pretrained`` files."""
    model = build(family, num_labels) if model is None else model
    model.save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder
