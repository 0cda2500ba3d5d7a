"""Grad-CAM on token models (ViT), channels-last maps (Swin), MaxViT, and the layer named in reports and runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _token_models import TokenViT, images, small_vit
from torch import nn
from torchvision.models import resnet18
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

from audit.engine.model import AttributionError, default_layer, layer_outputs, token_grid
from audit.methods import explain
from audit.methods.gradcam import gradcam_layer
from audit.models import SmallCNN

SMALL_VIT_DEFAULT = "encoder.layers.encoder_layer_1.ln_1"


def hand_gradcam(
    model: nn.Module,
    x: torch.Tensor,
    target: list[int],
    layer: str,
    extra: int = 0,
    nhwc: bool = False,
) -> torch.Tensor:
    """Grad-CAM written out: tokens -> drop ``extra`` -> [N, C, s, s] (or NHWC -> NCHW), mean gradient, ReLU."""
    seen: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: seen.setdefault("a", out)
    )
    try:
        logits = model(x)  # the parameters require grad: the graph reaches the layer
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), seen["a"])
    act = seen["a"].detach()
    if act.ndim == 3:
        n, t, c = act.shape
        s = math.isqrt(t - extra)
        act, grad = (z[:, extra:].reshape(n, s, s, c).permute(0, 3, 1, 2) for z in (act, grad))
    elif nhwc:
        act, grad = act.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)


def small_swin(v2: bool = False) -> SwinTransformer:
    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1, 1],
        num_heads=[1, 2, 2],
        window_size=[4, 4],
        num_classes=2,
        **extra,
    ).eval()


# ------------------------------------------------------------------ token grids
@pytest.mark.parametrize(
    ("tokens", "size", "grid"),
    [
        (17, (32, 32), (1, 4, 4)),  # class token + 4x4
        (16, (32, 32), (0, 4, 4)),  # no class token
        (197, (224, 224), (1, 14, 14)),  # ViT-B/16
        (18, (32, 32), (2, 4, 4)),  # class + distillation token (DeiT)
        (1 + 4 * 6, (64, 96), (1, 4, 6)),  # the input's aspect ratio, row by row
        (3, (32, 32), None),
        (2, (32, 32), None),
    ],
)
def test_token_grid(tokens, size, grid) -> None:
    assert token_grid(tokens, size) == grid


# ------------------------------------------------------------------ ViT
def test_default_layer_of_a_vit_is_the_layer_norm_before_the_last_self_attention() -> None:
    m, x = small_vit(), images()
    assert gradcam_layer(m, x) == default_layer(m, x)[0] == SMALL_VIT_DEFAULT
    # not the patch embedding (the last 4-d map), which the old rule picked
    assert [o.name for o in layer_outputs(m, x) if o.layout == "NCHW"] == ["conv_proj"]


def test_vit_maps_are_nonzero_finite_and_equal_the_hand_computation() -> None:
    m, x = small_vit(), images(4)
    target = [0, 1, 1, 0]
    maps = explain("gradcam", m, x, target)
    assert maps.shape == (4, 1, 32, 32) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert maps.flatten(1).amax(dim=1).gt(0).all()  # every row has something
    torch.testing.assert_close(
        maps, hand_gradcam(m, x, target, SMALL_VIT_DEFAULT, extra=1), rtol=1e-4, atol=1e-9
    )
    # chunking changes nothing
    torch.testing.assert_close(
        explain("gradcam", m, x, target, max_batch=3), maps, rtol=1e-5, atol=1e-10
    )


@pytest.mark.parametrize(
    "layer",
    ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_0.mlp.3", "encoder.dropout"],
)
def test_explicit_token_layer_is_reshaped(layer: str) -> None:
    m, x = small_vit(), images(2)
    got = explain("gradcam", m, x, [1, 0], layer=layer)
    torch.testing.assert_close(
        got, hand_gradcam(m, x, [1, 0], layer, extra=1), rtol=1e-4, atol=1e-9
    )


def test_token_model_without_class_token() -> None:
    m, x = TokenViT(class_token=False).eval(), images(3)
    # the rule is the same: the last token output before the last attention starts
    assert gradcam_layer(m, x) == "blocks.1.ln_1"
    maps = explain("gradcam", m, x, [0, 1, 2])
    assert (
        maps.shape == (3, 1, 32, 32)
        and torch.isfinite(maps).all()
        and maps.flatten(1).amax(dim=1).gt(0).all()
    )
    torch.testing.assert_close(
        maps, hand_gradcam(m, x, [0, 1, 2], "blocks.1.ln_1", extra=0), rtol=1e-4, atol=1e-9
    )
    # mean pooling: the last token output reaches the head through every token, and works too
    torch.testing.assert_close(
        explain("gradcam", m, x, [0, 1, 2], layer="norm"),
        hand_gradcam(m, x, [0, 1, 2], "norm"),
        rtol=1e-4,
        atol=1e-9,
    )


def test_a_layer_after_the_last_attention_of_a_class_token_model_is_refused_with_the_fix() -> None:
    m, x = small_vit(), images(2)
    with pytest.raises(
        AttributionError,
        match=rf"only the class token of layer 'encoder.ln'.*'{SMALL_VIT_DEFAULT}'",
    ):
        explain("gradcam", m, x, layer="encoder.ln")


def test_a_default_layer_that_fails_is_not_recommended_again() -> None:
    """Attention computed outside any module (TokenViT's hand path: no module with num_heads runs)
    makes the last token output, ``norm``, the default: Grad-CAM's refusal there says why it was
    picked and names the layer norms in front of it, never ``norm`` itself as the fix."""
    m, x = TokenViT(), images(2)
    m.manual = True
    assert gradcam_layer(m, x) == "norm"
    with pytest.raises(AttributionError) as err:
        explain("gradcam", m, x)
    text = str(err.value)
    assert "only the class token of layer 'norm'" in text and "leave layer unset" not in text
    assert (
        "no module of the model was recognised as attention" in text and "'blocks.1.ln_1'" in text
    )
    maps = explain("gradcam", m, x, layer="blocks.1.ln_1")  # the layer it names works
    assert torch.isfinite(maps).all() and maps.gt(0).any()


def test_a_layer_that_is_no_grid_names_its_shape_and_the_fix() -> None:
    m, x = small_vit(), images(2)
    with pytest.raises(
        AttributionError, match=r"spatial map.*'heads.head' outputs shape \(2, 2\).*neither"
    ):
        explain("gradcam", m, x, layer="heads.head")
    # three tokens of 8 channels tile no grid of a 32x32 input
    odd = nn.Sequential(
        nn.Conv2d(3, 4, 8, 8),
        nn.Flatten(),
        nn.Linear(64, 24),
        nn.Unflatten(1, (3, 8)),
        nn.Flatten(),
        nn.Linear(24, 2),
    ).eval()
    with pytest.raises(
        AttributionError, match=r"'3' outputs shape \(2, 3, 8\).*transformer tokens.*layer norm"
    ):
        explain("gradcam", odd, x, layer="3")


# ------------------------------------------------------------------ Swin (channels last), MaxViT
@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_explicit_stage_is_permuted_from_channels_last(v2: bool) -> None:
    m, x = small_swin(v2), images(2)
    assert (
        gradcam_layer(m, x) == "permute"
    )  # the default: the NCHW map after the last norm, as before
    outs = {o.name: o for o in layer_outputs(m, x)}
    assert outs["features.3"].layout == "NHWC" and outs["features.3"].grid == (0, 4, 4)
    assert outs["features.0.0"].layout == "NCHW"  # the patch embedding's conv, before its Permute
    got = explain("gradcam", m, x, [0, 1], layer="features.3")
    assert torch.isfinite(got).all() and got.gt(0).any()
    torch.testing.assert_close(
        got, hand_gradcam(m, x, [0, 1], "features.3", nhwc=True), rtol=1e-4, atol=1e-9
    )
    # `norm` (NHWC) and `permute` (its NCHW permutation) are one activation: the same map
    torch.testing.assert_close(
        explain("gradcam", m, x, [0, 1], layer="norm"),
        explain("gradcam", m, x, [0, 1], layer="permute"),
    )


def test_maxvit_default_layer_is_its_last_nchw_block() -> None:
    torch.manual_seed(0)
    m = MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[8, 16],
        block_layers=[1, 1],
        head_dim=4,
        stochastic_depth_prob=0.0,
        num_classes=2,
    ).eval()
    x = images(2)
    name = gradcam_layer(m, x)
    assert name == "blocks.1"
    out = next(o for o in reversed(layer_outputs(m, x)) if o.name == name)
    assert out.layout == "NCHW" and out.grid == (0, 4, 4)  # 32 px: stem /2, two blocks /2 each
    maps = explain("gradcam", m, x)
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()


# ------------------------------------------------------------------ CNNs unchanged
def test_cnn_defaults_unchanged() -> None:
    torch.manual_seed(0)
    assert (
        gradcam_layer(resnet18(num_classes=2).eval(), images(2, size=64)) == "layer4"
    )  # 2x2 at 64 px
    assert gradcam_layer(SmallCNN(num_classes=2, widths=(4, 8, 8)).eval(), images(2)) == "features"


# ------------------------------------------------------------------ the layer in evidence, report and run
def test_the_layer_is_named_in_evidence_report_and_run_params() -> None:
    from audit.datasets import snow_wolf
    from audit.evidence.attribution import Evidence, collect
    from audit.gate.job import _run_params
    from audit.pipeline import run_audit
    from audit.report.write import method_layers, render_html, render_markdown

    probes = snow_wolf.probe_set(n_per_group=2, size=32, seed=1)
    m = small_vit()
    ev = collect(m, probes, ["gradcam", "input_x_gradient"], ["deletion"], steps=2)
    assert ev.layers == {"gradcam": SMALL_VIT_DEFAULT}
    half = len(probes) // 2
    parts = [
        collect(m, probes, ["gradcam"], ["deletion"], steps=2, rows=r)
        for r in (range(half), range(half, len(probes)))
    ]
    assert (
        Evidence.cat(parts).layers
        == Evidence.cat(parts).cpu().layers
        == {"gradcam": SMALL_VIT_DEFAULT}
    )
    explicit = collect(
        m,
        probes,
        ["gradcam"],
        ["deletion"],
        steps=2,
        method_options={"gradcam": {"layer": m.encoder.layers[0]}},
    )
    assert explicit.layers == {
        "gradcam": "encoder.layers.encoder_layer_0"
    }  # a module given: its name

    cfg = {
        "methods": ["gradcam"],
        "attribution_probes": 4,
        "sanity_probes": 0,
        "steps": 2,
        "synthesized_probes": 0,
    }
    result = run_audit(m, probes, {"engine": cfg})
    assert result.raw["methods"]["gradcam"]["layer"] == SMALL_VIT_DEFAULT
    assert (
        result.to_dict()["evidence"]["methods"]["gradcam"]["layer"] == SMALL_VIT_DEFAULT
    )  # report.json
    assert method_layers(result) == {"gradcam": SMALL_VIT_DEFAULT}
    assert f"gradcam at <code>{SMALL_VIT_DEFAULT}</code>" in render_html(result)
    assert f"layers: `gradcam` at `{SMALL_VIT_DEFAULT}`" in render_markdown(result)
    params = _run_params(result)
    assert params["gradcam.layer"] == SMALL_VIT_DEFAULT and params["engine.steps"] == 2
