"""Every torchvision family works with every default method (small members here; full size in the slow test)."""

from __future__ import annotations

import math

import pytest
import torch
from _families import FAMILIES, build, images

from audit.bench import families as bench_families
from audit.methods import explain

DEFAULT = ("gradcam", "input_x_gradient", "lrp")
OPTIONS = {"integrated_gradients": {"steps": 4}, "saliency": {}}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_gives_maps_with_every_default_method(name: str) -> None:
    m, size = build(name)
    x = images(2, size)
    with torch.no_grad():
        logits = m(x)
    target = logits.argmax(1)
    live = logits.gather(1, target[:, None]).squeeze(1) != 0  # SqueezeNet's head ends in a ReLU
    assert live.any()
    for method in DEFAULT + tuple(OPTIONS):
        maps = explain(method, m, x, target, **OPTIONS.get(method, {}))
        assert maps.shape == (2, 1, size, size), method
        assert torch.isfinite(maps).all(), method
        if method != "gradcam":  # Grad-CAM's ReLU may zero a random model's map
            assert (maps.abs().flatten(1).sum(1)[live] > 0).all(), method


@pytest.mark.slow
@pytest.mark.parametrize("name", list(bench_families.FAMILIES))
def test_every_full_size_family_member_works_with_every_method(name: str) -> None:
    """The bench's row for the family: every method gives finite maps; rollout says why not on non-ViTs."""
    methods = [*DEFAULT, "saliency", "integrated_gradients", "attention_rollout"]
    row = bench_families.run(name, methods)
    for method in methods:
        if method == "attention_rollout" and not name.startswith("vit"):
            assert row[method].startswith("AttributionError"), row[method]
        else:
            assert row[method].startswith("ok"), (method, row[method])
    info = row["lrp_info"]
    assert info["backend"] in ("fast", "general")
    assert all(math.isfinite(c) for c in info["conservation"].values())
