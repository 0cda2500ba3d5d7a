"""The stamps benchmark: determinism, balance, correlation, masks, stamps and pairs.

The last test trains two models (about a minute each on one core) and is marked slow.
"""

from __future__ import annotations

import math

import pytest
import torch

from audit.datasets import stamps
from audit.probes import ProbeSet
from audit.training import ProbeDataModule


def _contexts(ps: ProbeSet) -> torch.Tensor:
    return ps.groups % 2  # group id = 2 * label + context


def test_generate_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = stamps.generate(64, correlation=0.9, size=32, seed=5)
    p = stamps.probe_set(n_per_group=4, size=32, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.digest == stamps.generate(64, correlation=0.9, size=32, seed=5).digest
    assert a.digest != stamps.generate(64, correlation=0.9, size=32, seed=6).digest
    assert p.digest == stamps.probe_set(n_per_group=4, size=32, seed=5).digest
    assert p.digest != stamps.probe_set(n_per_group=4, size=32, seed=6).digest


@pytest.mark.parametrize("size", [24, 64])
def test_images_are_8_bit_display_space_with_non_empty_masks(size):
    ps = stamps.generate(48, correlation=0.5, size=size, seed=2)
    assert ps.images.dtype == torch.float32 and ps.images.shape == (48, 3, size, size)
    assert ps.labels.dtype == torch.long and ps.masks.dtype == torch.bool
    assert ps.masks.shape == (48, 1, size, size)
    assert float(ps.images.min()) >= 0.0 and float(ps.images.max()) <= 1.0
    assert torch.equal(torch.round(ps.images * 255) / 255, ps.images)
    area = ps.masks.float().mean(dim=(1, 2, 3))
    assert bool(((area > 0.02) & (area < 0.2)).all()), area
    # the stamp is high contrast: every image holds near-black and near-white pixels
    flat = ps.images.amax(dim=1).flatten(1), ps.images.amin(dim=1).flatten(1)
    assert bool((flat[0].amax(dim=1) >= 0.85).all() and (flat[1].amin(dim=1) <= 0.15).all())


def test_generate_matches_the_requested_correlation_and_balance():
    ps = stamps.generate(4000, correlation=0.8, size=24, seed=1)
    assert int((ps.labels == 0).sum()) == 2000
    assert ps.class_names == stamps.CLASSES == ["disc", "ring"]
    assert (
        ps.group_names
        == stamps.GROUPS
        == ["disc|checker", "disc|stripes", "ring|checker", "ring|stripes"]
    )
    ctx = _contexts(ps)
    for label in (0, 1):  # the majority context of class c is context c
        share = (ctx[ps.labels == label] == label).float().mean().item()
        assert abs(share - 0.8) < 0.04, (label, share)
    for extreme in (0.0, 1.0):
        ps = stamps.generate(200, correlation=extreme, size=24, seed=1)
        assert bool((_contexts(ps) == ps.labels).all()) == (extreme == 1.0)
        assert bool((_contexts(ps) != ps.labels).all()) == (extreme == 0.0)


@pytest.mark.parametrize("size", [24, 32, 48, 64, 96])
def test_the_stamp_is_all_that_changes_and_lies_outside_the_mask(size):
    n = 400 if size <= 48 else 100
    g = torch.Generator().manual_seed(size)
    labels = torch.arange(n) % 2
    params = stamps._scene_params(labels, size, g)
    zeros, ones = torch.zeros_like(labels), torch.ones_like(labels)
    checker, m0 = stamps.render(labels, zeros, size, torch.Generator().manual_seed(1), params)
    stripes, m1 = stamps.render(labels, ones, size, torch.Generator().manual_seed(1), params)
    box = stamps.stamp_boxes(params, size)
    k = stamps._stamp_side(size)
    assert torch.equal(m0, m1)
    assert bool((box.sum(dim=(1, 2, 3)) == k * k).all())
    assert not bool((box & m0).any()), "a stamp overlaps its shape"
    differ = (checker != stripes).any(dim=1, keepdim=True)
    assert not bool((differ & ~box).any()), "pixels outside the stamp changed"
    assert bool(differ.flatten(1).any(dim=1).all()), "a stamp did not change"
    # same grey levels, same area: the two stamps have the same mean brightness
    in_box = box.expand(-1, 3, -1, -1)
    mean0 = (checker * in_box).sum(dim=(1, 2, 3)) / in_box.sum(dim=(1, 2, 3))
    mean1 = (stripes * in_box).sum(dim=(1, 2, 3)) / in_box.sum(dim=(1, 2, 3))
    assert torch.allclose(mean0, mean1, atol=1e-6)


def test_the_fallback_stamp_spot_is_clear_of_the_largest_shapes():
    # with no random candidates, _stamp_spot falls back to the farthest corner
    for size in (24, 25, 28, 31, 40, 47, 64, 100):
        area = (stamps._AREA[1] * size) ** 2
        lo_hole = 1.0 - stamps._HOLE[1] ** 2
        a = math.sqrt(area / (math.pi * stamps._ASPECT[0] * lo_hole))
        c = torch.linspace(a + 1.0, size - a - 1.0, 9)
        cy, cx = (t.flatten() for t in torch.meshgrid(c, c, indexing="ij"))
        radius = torch.full_like(cx, a)
        k = stamps._stamp_side(size)
        sx, sy = stamps._stamp_spot(cx, cy, radius, size, k, torch.Generator(), tries=0)
        dist = stamps._box_distance(sx.float(), sy.float(), k, cx, cy)
        assert bool((dist > radius + 2.0).all()), size
        assert bool(((sx >= 1) & (sx + k <= size - 1) & (sy >= 1) & (sy + k <= size - 1)).all())


def test_probe_set_is_balanced_and_paired():
    ps = stamps.probe_set(n_per_group=6, size=64, seed=3)
    assert len(ps) == 24
    assert torch.bincount(ps.groups).tolist() == [6, 6, 6, 6]
    assert bool(ps.masks.flatten(1).any(dim=1).all())
    k = stamps._stamp_side(64)
    for pair in range(12):
        rows = (ps.pairs == pair).nonzero().flatten()
        assert rows.tolist() == [2 * pair, 2 * pair + 1]
        a, b = rows.tolist()
        assert ps.labels[a] == ps.labels[b]
        assert {ps.group_of(a).split("|")[1], ps.group_of(b).split("|")[1]} == {
            "checker",
            "stripes",
        }
        assert torch.equal(ps.masks[a], ps.masks[b])
        inside = ps.masks[a].expand(3, -1, -1)
        assert torch.equal(ps.images[a][inside], ps.images[b][inside])
        # outside the mask they differ, and only within one k x k square (the stamp)
        differ = (ps.images[a] != ps.images[b]).any(dim=0)
        assert bool(differ.any()) and not bool((differ & ps.masks[a, 0]).any())
        ys, xs = differ.nonzero(as_tuple=True)
        assert int(ys.max() - ys.min()) < k and int(xs.max() - xs.min()) < k


def test_classes_differ_in_the_shape_not_in_its_area():
    g = torch.Generator().manual_seed(4)
    labels = torch.arange(2000) % 2
    params = stamps._scene_params(labels, 64, g)
    mask = stamps._shape_mask(params, 64)
    area = mask.float().mean(dim=(1, 2))
    disc, ring = area[labels == 0], area[labels == 1]
    assert abs(disc.mean() - ring.mean()) < 0.003  # the same painted area on average
    # a ring has a hole at its centre, a disc is filled there
    cx, cy = params["cx"].long(), params["cy"].long()
    centre = mask[torch.arange(2000), cy, cx]
    assert bool(centre[labels == 0].all()) and not bool(centre[labels == 1].any())


def test_probe_set_round_trips_through_the_folder_format(tmp_path):
    ps = stamps.probe_set(n_per_group=3, size=32, seed=8)
    loaded = ProbeSet.load(ps.save(tmp_path / "probes"))
    assert loaded.digest == ps.digest
    assert loaded.group_names == stamps.GROUPS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "at least one image"),
        ({"n": 4, "size": 16}, "size must be at least 24"),
        ({"n": 4, "correlation": -0.1}, r"correlation must lie in \[0, 1\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stamps.generate(**kwargs)


@pytest.mark.parametrize("generate", ["audit.datasets.stamps.generate", stamps.generate])
def test_probe_data_module_trains_on_any_benchmark(generate):
    dm = ProbeDataModule(
        generate, n_train=20, n_val=8, correlation=0.9, size=24, seed=3, batch_size=8
    )
    assert dm.hparams.generate == "audit.datasets.stamps.generate"
    dm.setup("fit")
    assert dm.train_set.digest == stamps.generate(20, 0.9, 24, seed=3).digest
    assert dm.val_set.digest == stamps.generate(8, 0.9, 24, seed=4).digest
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 24, 24) and y.dtype == torch.long
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 8
    with pytest.raises(ValueError, match="cannot be imported"):
        ProbeDataModule("audit.datasets.no_such.generate")


@pytest.mark.slow
def test_a_model_trained_at_high_correlation_learns_the_stamp_and_one_at_half_does_not():
    import pytorch_lightning as pl

    from audit.evidence.behaviour import context_gaps, group_accuracy, predict
    from audit.training import Classifier

    probes = stamps.probe_set(n_per_group=200, size=64, seed=123)
    results = {}
    for rho in (0.99, 0.5):
        pl.seed_everything(0, workers=True, verbose=False)
        data = ProbeDataModule(stamps.generate, n_train=4000, n_val=256, correlation=rho, size=64)
        module = Classifier({"_target_": "audit.models.SmallCNN", "num_classes": 2})
        trainer = pl.Trainer(
            max_epochs=3,
            accelerator="cpu",
            devices=1,
            deterministic=True,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=data)
        accuracies = group_accuracy(probes, predict(module.net, probes.images))
        gaps = {c: b.accuracy - w.accuracy for c, (w, b) in context_gaps(accuracies).items()}
        mean = sum(a.accuracy for a in accuracies.values()) / len(accuracies)
        results[rho] = (accuracies, gaps, mean)

    accuracies, gaps, _ = results[0.99]
    assert set(gaps) == {"disc", "ring"}
    # every class is right with its usual stamp and wrong with the other one
    assert all(gap >= 0.5 for gap in gaps.values()), accuracies
    accuracies, gaps, mean = results[0.5]
    assert all(gap <= 0.05 for gap in gaps.values()), accuracies
    assert mean >= 0.9, accuracies
