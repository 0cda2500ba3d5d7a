"""Grad-CAM and attention rollout on torchvision's transformer families themselves (slow: full-size models).

The fast tests (tests/methods/test_gradcam_tokens.py, tests/methods/test_rollout.py) use small models of
the same torchvision classes; these build ViT-B/16, Swin-T, Swin-V2-T and MaxViT-T.
"""

from __future__ import annotations

import pytest
import torch
from _token_models import images
from torch import nn

from audit.engine.model import AttributionError, layer_outputs
from audit.methods import explain
from audit.methods.gradcam import gradcam_layer


def _vit_b_16() -> nn.Module:
    from torchvision.models import vit_b_16

    m = vit_b_16(num_classes=2, image_size=64)
    nn.init.normal_(m.heads.head.weight, std=0.02)  # zero-initialised by torchvision
    return m


FAMILIES = {  # model, input size, default layer, an explicit layer and its layout
    "vit_b_16": (
        _vit_b_16,
        64,
        "encoder.layers.encoder_layer_11.ln_1",
        "encoder.layers.encoder_layer_5",
        "tokens",
    ),
    "swin_t": ("swin_t", 64, "permute", "features.5", "NHWC"),
    "swin_v2_t": ("swin_v2_t", 64, "permute", "features.5", "NHWC"),
    "maxvit_t": ("maxvit_t", 224, "blocks.3", "blocks.2", "NCHW"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_torchvision_transformer_families(family: str) -> None:
    import torchvision.models as tvm

    make, size, default, explicit, layout = FAMILIES[family]
    torch.manual_seed(0)
    m = (make() if callable(make) else getattr(tvm, make)(num_classes=2)).eval()
    x = images(1, size=size)
    assert gradcam_layer(m, x) == default
    assert next(o for o in reversed(layer_outputs(m, x)) if o.name == explicit).layout == layout
    for layer in (None, explicit):
        maps = explain("gradcam", m, x, 0, layer=layer)
        assert maps.shape == (1, 1, size, size) and torch.isfinite(maps).all() and (maps >= 0).all()
    assert explain("gradcam", m, x, 0, layer=explicit).gt(0).any()


@pytest.mark.slow
def test_rollout_on_vit_b_16_and_refused_on_windowed_attention() -> None:
    import torchvision.models as tvm

    torch.manual_seed(0)
    x = images(2, size=64)
    maps = explain("attention_rollout", _vit_b_16().eval(), x)
    assert (
        maps.shape == (2, 1, 64, 64)
        and torch.isfinite(maps).all()
        and (maps >= 0).all()
        and maps.gt(0).any()
    )
    for name in ("swin_t", "maxvit_t"):
        with pytest.raises(AttributionError, match="MultiheadAttention.*windows.*use gradcam"):
            explain("attention_rollout", getattr(tvm, name)(num_classes=2).eval(), x)
