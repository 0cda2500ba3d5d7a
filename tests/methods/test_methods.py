"""Explainers by name: known answers on hand-built models, the common contract, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from audit.engine.model import AttributionError, hook_count
from audit.methods import METHODS, explain, register
from audit.models import SmallCNN

ALL = (
    "gradcam",
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "lrp",
    "guided_backprop",
    "deconvnet",
    "guided_gradcam",
    "occlusion",
    "rise",
    "lime",
)
FAST_OPTIONS = {
    "integrated_gradients": {"steps": 4},
    "occlusion": {"window": 8, "stride": 4},
    "rise": {"n_masks": 16},
    "lime": {"n_samples": 16, "segments": 4, "segmentation": "grid"},
}


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return _randomize_bn(SmallCNN(num_classes=3, widths=(4, 8, 8)), seed).eval()


def linear_model(seed: int = 0, size: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 4)).eval()


def images(n: int = 4, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ registry
def test_every_method_is_registered() -> None:
    assert set(ALL) <= set(METHODS)


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(
        AttributionError, match="unknown explanation method 'gradcamm'.*gradcam.*lrp.*saliency"
    ):
        explain("gradcamm", small_cnn(), images())


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(AttributionError, match="unknown option.*layr.*layer, max_batch"):
        explain("gradcam", small_cnn(), images(), layr="features")


def test_register_custom_method_gets_the_contract() -> None:
    @register("test_constant")
    def constant(model, inputs, target, *, value: float = 1.0):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        assert not model.training
        return torch.full((inputs.shape[0], 1, *inputs.shape[2:]), value)

    try:
        m = small_cnn().train()
        with torch.inference_mode():
            out = explain("test_constant", m, images(2), value=2.0)
        assert m.training and out.shape == (2, 1, 16, 16) and bool((out == 2).all())

        with pytest.raises(AttributionError, match="already registered"):

            @register("test_constant")
            def other(model, inputs, target):
                return inputs
    finally:
        METHODS.pop("test_constant", None)


# ------------------------------------------------------------------ known answers
def test_gradcam_equals_cam_on_gap_network() -> None:
    """GAP + linear head: Grad-CAM = ReLU(sum_k w_ck A_k) / (h w), upsampled (CAM, Zhou et al.)."""
    m, x = small_cnn(), images()
    target = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        a = m.features(x)
        cam = torch.einsum("nk,nkhw->nhw", m.fc.weight[target], a)[:, None]
        cam = F.relu(cam) / (a.shape[2] * a.shape[3])
        expected = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    got = explain("gradcam", m, x, target, layer="features")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # the default layer of SmallCNN is `features`
    torch.testing.assert_close(explain("gradcam", m, x, target), got)


def test_gradcam_matches_captum_on_resnet() -> None:
    torchvision = pytest.importorskip("torchvision")
    from captum.attr import LayerAttribution, LayerGradCam

    torch.manual_seed(0)
    m = _randomize_bn(torchvision.models.resnet18(num_classes=3)).eval()
    x = images(2, 32)
    ours = explain("gradcam", m, x, [0, 2], layer="layer3")
    ref = LayerGradCam(m, m.layer3).attribute(x, target=[0, 2], relu_attributions=True)
    ref = LayerAttribution.interpolate(ref, (32, 32), "bilinear")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_saliency_of_linear_model_is_max_abs_weight() -> None:
    m, x = linear_model(), images(3, 8)
    target = torch.tensor([3, 0, 1])
    w = m[1].weight.detach().reshape(4, 3, 8, 8)
    expected = w[target].abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(explain("saliency", m, x, target), expected)


def test_input_x_gradient_and_ig_of_linear_model() -> None:
    m, x = linear_model(), images(3, 8)
    w = m[1].weight.detach().reshape(4, 3, 8, 8)[2]
    torch.testing.assert_close(explain("input_x_gradient", m, x, 2), (x * w).sum(1, keepdim=True))
    base = torch.full((3, 8, 8), 0.25)
    ig = explain("integrated_gradients", m, x, 2, steps=3, baseline=base)
    torch.testing.assert_close(ig, ((x - base) * w).sum(1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_completeness_on_cnn() -> None:
    m, x = small_cnn(), images(2)
    ig = explain("integrated_gradients", m, x, 1, steps=64)
    with torch.no_grad():
        delta = m(x)[:, 1] - m(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(ig.sum(dim=(1, 2, 3)), delta, rtol=0.02, atol=1e-3)


def test_smoothgrad_private_generator_reproducible() -> None:
    m, x = small_cnn(), images(2)
    state = torch.random.get_rng_state()
    a = explain("saliency", m, x, 0, smooth_samples=3, noise=0.1, seed=7)
    b = explain("saliency", m, x, 0, smooth_samples=3, noise=0.1, seed=7, max_batch=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, explain("saliency", m, x, 0, smooth_samples=3, noise=0.1, seed=8))
    plain = explain("saliency", m, x, 0)
    torch.testing.assert_close(explain("saliency", m, x, 0, smooth_samples=2, noise=0.0), plain)


# ------------------------------------------------------------------ the common contract
def _trainable_state(m: nn.Module) -> tuple:
    return (
        [mod.training for mod in m.modules()],
        [p.requires_grad for p in m.parameters()],
        [p.grad for p in m.parameters()],
        {k: v.clone() for k, v in m.state_dict().items()},
    )


@pytest.mark.parametrize("method", ALL)
def test_contract_state_restored_inputs_untouched(method: str) -> None:
    m = small_cnn().train()
    m.features[0].weight.requires_grad_(False)
    m.fc.weight.grad = torch.ones_like(m.fc.weight)
    before = _trainable_state(m)
    x = images(3)
    x_copy = x.clone()
    out = explain(method, m, x, **FAST_OPTIONS.get(method, {}))
    after = _trainable_state(m)
    assert out.shape == (3, 1, 16, 16) and out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(x, x_copy)
    assert hook_count(m) == 0
    assert before[0] == after[0] and before[1] == after[1]
    assert all(a is b for a, b in zip(before[2], after[2], strict=True))
    assert before[3].keys() == after[3].keys()
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_contract_works_without_grad_mode(method: str, mode: str) -> None:
    m, x = small_cnn(), images(2)
    expected = explain(method, m, x, 1, **FAST_OPTIONS.get(method, {}))
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        xi = x.clone()
        got = explain(method, m, xi, 1, **FAST_OPTIONS.get(method, {}))
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", ALL)
def test_contract_max_batch_chunks_give_same_maps(method: str) -> None:
    m, x = small_cnn(), images(5)
    opts = FAST_OPTIONS.get(method, {})
    torch.testing.assert_close(
        explain(method, m, x, max_batch=2, **opts), explain(method, m, x, **opts)
    )


@pytest.mark.parametrize("method", ALL)
def test_errors_target_out_of_range_names_row(method: str) -> None:
    with pytest.raises(AttributionError, match=r"target 7 \(row 3\).*3 outputs \(0\.\.2\)"):
        explain(
            method,
            small_cnn(),
            images(4),
            torch.tensor([0, 1, 2, 7]),
            max_batch=2,
            **FAST_OPTIONS.get(method, {}),
        )


def test_errors_target_shape_and_inputs_shape() -> None:
    with pytest.raises(AttributionError, match="one class index per input"):
        explain("saliency", small_cnn(), images(4), [0, 1])
    with pytest.raises(AttributionError, match=r"add a batch dimension"):
        explain("saliency", small_cnn(), images(1)[0])


def test_errors_bad_layer_lists_layers() -> None:
    with pytest.raises(
        AttributionError,
        match="layer 'layer5' not found.*features.*fc.*conv layers are: features.0",
    ):
        explain("gradcam", small_cnn(), images(), layer="layer5")
    with pytest.raises(AttributionError, match="spatial map.*'fc'"):
        explain("gradcam", small_cnn(), images(), layer="fc")


@pytest.mark.parametrize("method", ALL)
def test_errors_nan_output(method: str) -> None:
    m = small_cnn()
    with torch.no_grad():
        m.fc.bias[1] = float("nan")
    with pytest.raises(AttributionError, match="NaN or Inf"):
        explain(method, m, images(2), 0, **FAST_OPTIONS.get(method, {}))


# ------------------------------------------------------------------ properties
@settings(max_examples=12, deadline=None)
@given(rows=st.lists(st.integers(0, 5), min_size=1, max_size=4), target=st.integers(0, 2))
def test_gradcam_nonnegative_and_independent_of_batch_composition(
    rows: list[int], target: int
) -> None:
    m, x = small_cnn(), images(6)
    full = explain("gradcam", m, x, target)
    part = explain("gradcam", m, x[rows], target)
    assert bool((full >= 0).all())
    torch.testing.assert_close(part, full[rows], rtol=1e-5, atol=1e-7)


@settings(max_examples=12, deadline=None)
@given(scale=st.floats(0.01, 100.0), target=st.integers(0, 3))
def test_saliency_scales_linearly_with_a_scaled_linear_model(scale: float, target: int) -> None:
    m, x = linear_model(), images(2, 8)
    base = explain("saliency", m, x, target)
    with torch.no_grad():
        m[1].weight.mul_(scale)
    torch.testing.assert_close(
        explain("saliency", m, x, target), base * scale, rtol=1e-5, atol=1e-8
    )


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ALL)
def test_cuda_same_maps_as_cpu(method: str) -> None:
    m, x = small_cnn(), images(3)
    cpu = explain(method, m, x, 1, **FAST_OPTIONS.get(method, {}))
    gpu = explain(method, m.cuda(), x.cuda(), 1, **FAST_OPTIONS.get(method, {}))
    assert gpu.device.type == "cuda" and hook_count(m) == 0
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-5)
