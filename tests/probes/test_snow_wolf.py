"""The snow-wolf benchmark: determinism, balance, correlation, masks and pairs."""

from __future__ import annotations

import pytest
import torch

from audit.datasets import snow_wolf


def test_generate_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = snow_wolf.generate(64, correlation=0.9, size=32, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = snow_wolf.generate(64, correlation=0.9, size=32, seed=5)
    c = snow_wolf.generate(64, correlation=0.9, size=32, seed=6)
    assert a.digest == b.digest
    assert a.digest != c.digest


def test_generate_matches_the_requested_correlation_and_balance():
    ps = snow_wolf.generate(4000, correlation=0.8, size=24, seed=1)
    assert int((ps.labels == 0).sum()) == 2000
    background = ps.groups % 2  # group id = 2 * label + background
    agree = (background == ps.labels).float().mean().item()
    assert abs(agree - 0.8) < 0.03
    assert ps.group_names == ["wolf|snow", "wolf|grass", "husky|snow", "husky|grass"]
    for extreme in (0.0, 1.0):
        ps = snow_wolf.generate(200, correlation=extreme, size=24, seed=1)
        assert bool(((ps.groups % 2) == ps.labels).all()) == (extreme == 1.0)


def test_images_are_8_bit_display_space_with_pixel_exact_masks():
    ps = snow_wolf.generate(32, correlation=0.5, size=48, seed=2)
    assert ps.images.dtype == torch.float32 and ps.images.shape == (32, 3, 48, 48)
    assert torch.equal(torch.round(ps.images * 255) / 255, ps.images)
    area = ps.masks.float().mean(dim=(1, 2, 3))
    assert bool(((area > 0.03) & (area < 0.35)).all()), area
    # the mask is exactly the animal: rendering the same animals on the other
    # background changes every pixel outside the mask and none inside it
    g = torch.Generator().manual_seed(0)
    labels = ps.labels
    params = snow_wolf._animal_params(labels, g)
    img_snow, m1 = snow_wolf.render(
        labels, torch.zeros_like(labels), 48, torch.Generator().manual_seed(1), params
    )
    img_grass, m2 = snow_wolf.render(
        labels, torch.ones_like(labels), 48, torch.Generator().manual_seed(1), params
    )
    assert torch.equal(m1, m2)
    same = (img_snow == img_grass).all(dim=1, keepdim=True)
    assert bool(same[m1].all())
    assert same[~m1].float().mean() < 0.01


def test_probe_set_is_balanced_and_paired():
    ps = snow_wolf.probe_set(n_per_group=5, size=32, seed=3)
    assert len(ps) == 20
    assert torch.bincount(ps.groups).tolist() == [5, 5, 5, 5]
    for k in range(10):
        rows = (ps.pairs == k).nonzero().flatten()
        assert rows.tolist() == [2 * k, 2 * k + 1]
        a, b = rows.tolist()
        assert ps.labels[a] == ps.labels[b]
        assert {ps.group_of(a).split("|")[1], ps.group_of(b).split("|")[1]} == {"snow", "grass"}
        assert torch.equal(ps.masks[a], ps.masks[b])
        inside = ps.masks[a].expand(3, -1, -1)
        assert torch.equal(ps.images[a][inside], ps.images[b][inside])


def test_classes_differ_in_the_animal_not_only_the_background():
    ps = snow_wolf.probe_set(n_per_group=40, size=64, seed=4)
    area = ps.masks.float().mean(dim=(1, 2, 3))
    # huskies' curled tails are shorter than wolves' hanging tails, ears taller: areas overlap
    assert area[ps.labels == 0].mean() != area[ps.labels == 1].mean()
    # backgrounds: snow is bright, grass is green/brown and darker
    outside = ~ps.masks.expand(-1, 3, -1, -1)
    bright = [(ps.images[i][outside[i]]).mean().item() for i in range(len(ps))]
    bg = (ps.groups % 2).tolist()
    snow = [b for b, k in zip(bright, bg, strict=True) if k == 0]
    grass = [b for b, k in zip(bright, bg, strict=True) if k == 1]
    assert min(snow) > 0.7 > 0.5 > max(grass)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "at least one image"),
        ({"n": 4, "size": 8}, "size must be at least 24"),
        ({"n": 4, "correlation": 1.5}, r"correlation must lie in \[0, 1\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        snow_wolf.generate(**kwargs)
