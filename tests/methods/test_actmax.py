"""Activation maximization: beats every probe, reproducible, leaves model and RNG untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from audit.datasets import snow_wolf
from audit.engine.model import AttributionError, hook_count
from audit.methods import activation_maximization
from audit.models import SmallCNN

UNITS = [0, 3, 5, 7]
FAST = {"steps": 48, "size": 32}


def model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=2, widths=(8, 16, 16)).eval()


def test_synthesized_images_beat_every_probe() -> None:
    m = model()
    probes = snow_wolf.probe_set(n_per_group=4, size=32, seed=0)
    with torch.no_grad():
        probe_act = m.features(probes.images).mean(dim=(2, 3))[:, UNITS]  # [16, units]
    images, reached = activation_maximization(m, "features", UNITS, **FAST)
    assert images.shape == (4, 3, 32, 32) and reached.shape == (4,)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert bool((reached > probe_act.max(dim=0).values).all()), (
        reached,
        probe_act.max(dim=0).values,
    )
    # the reported activations are those of the returned images, without jitter
    with torch.no_grad():
        again = m.features(images).mean(dim=(2, 3))[torch.arange(4), UNITS]
    torch.testing.assert_close(reached, again)


def test_class_logits_are_maximized() -> None:
    m = model()
    images, reached = activation_maximization(m, None, [0, 1], **FAST)
    with torch.no_grad():
        logits = m(images)
        start = m(torch.full_like(images, 0.5))
    torch.testing.assert_close(reached, logits[torch.arange(2), torch.tensor([0, 1])])
    assert bool((reached > start[torch.arange(2), torch.tensor([0, 1])]).all())
    _, by_name = activation_maximization(m, "logits", [0, 1], **FAST)
    torch.testing.assert_close(by_name, reached)


def test_reproducible_and_global_rng_untouched() -> None:
    m = model()
    state = torch.random.get_rng_state()
    a, ra = activation_maximization(m, "features.3", [1, 2], seed=3, steps=8, size=24)
    b, rb = activation_maximization(m, "features.3", [1, 2], seed=3, steps=8, size=24)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(ra, rb)
    c, _ = activation_maximization(m, "features.3", [1, 2], seed=4, steps=8, size=24)
    assert not torch.equal(a, c)


def test_model_restored_and_later_layers_not_run() -> None:
    m = model().train()
    m.fc.weight.requires_grad_(False)
    flags = [mod.training for mod in m.modules()]
    req = [p.requires_grad for p in m.parameters()]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    calls = []
    handle = m.fc.register_forward_hook(lambda *_: calls.append(1))
    try:
        activation_maximization(m, "features", [0], steps=4, size=24)
    finally:
        handle.remove()
    assert calls == []  # the forward stopped at `features`
    assert hook_count(m) == 0
    assert [mod.training for mod in m.modules()] == flags
    assert [p.requires_grad for p in m.parameters()] == req
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


def test_regularizers_run_and_clip_pixels_to_grey() -> None:
    m = model()
    images, _ = activation_maximization(
        m,
        "features",
        [0, 1],
        steps=6,
        size=24,
        clip_norm=50.0,
        clip_contribution=10.0,
        blur_every=2,
        jitter=3,
        scale=0.1,
    )
    grey = (images == 0.5).all(dim=1).float().mean(dim=(1, 2))
    assert bool((grey >= 0.5).all())


def test_works_under_inference_mode() -> None:
    m = model()
    with torch.inference_mode():
        images, reached = activation_maximization(m, "features", [0], steps=4, size=24)
        assert torch.is_inference_mode_enabled()
    assert images.shape == (1, 3, 24, 24) and torch.isfinite(reached).all()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"layer": "features", "units": [16]},
            r"unit 16 is not a channel.*16 channels \(0\.\.15\)",
        ),
        ({"layer": "featurez", "units": [0]}, r"layer 'featurez' not found.*features"),
        ({"layer": None, "units": [2]}, r"unit 2 is not a channel.*2 channels"),
        ({"layer": "features", "units": []}, r"non-empty list"),
        ({"layer": "features", "units": [0], "size": 4}, r"size must be at least 8"),
        ({"layer": "features", "units": [0], "clip_norm": 100}, r"clip_norm is a percentile"),
    ],
)
def test_errors_name_the_problem(kwargs: dict, pattern: str) -> None:
    with pytest.raises(AttributionError, match=pattern):
        activation_maximization(model(), steps=2, **kwargs)


def test_nan_activation_is_an_error() -> None:
    m = model()
    with torch.no_grad():
        m.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(AttributionError, match="NaN or Inf"):
        activation_maximization(m, "features", [0], steps=2, size=24)


def test_layer_off_the_forward_path_is_an_error() -> None:
    m = model()
    m.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(AttributionError, match="did not run"):
        activation_maximization(m, "unused", [0], steps=2, size=24)
    assert hook_count(m) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda() -> None:
    m = model().cuda()
    images, reached = activation_maximization(m, "features", UNITS, steps=8, size=32)
    assert images.device.type == "cuda" and reached.device.type == "cuda" and hook_count(m) == 0
