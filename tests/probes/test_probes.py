"""ProbeSet: validation, digest identity, folder round trip and clear errors on bad folders."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from audit.datasets import snow_wolf
from audit.probes import ProbeSet, ProbeSetError


@pytest.fixture(scope="module")
def probes() -> ProbeSet:
    return snow_wolf.probe_set(n_per_group=3, size=32, seed=0)


@pytest.fixture
def folder(tmp_path, probes) -> Path:
    return probes.save(tmp_path / "probes")


def rewrite_manifest(folder: Path, edit) -> None:
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(folder / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


# ---------------------------------------------------------------- round trip and digest
def test_round_trip_keeps_every_field_and_the_digest(probes, folder):
    loaded = ProbeSet.load(folder)
    assert loaded.digest == probes.digest
    assert torch.equal(loaded.images, probes.images)
    assert torch.equal(loaded.labels, probes.labels)
    assert torch.equal(loaded.masks, probes.masks)
    assert loaded.class_names == probes.class_names
    assert [loaded.group_of(i) for i in range(len(loaded))] == [
        probes.group_of(i) for i in range(len(probes))
    ]
    # the pair partition survives (ids may be renumbered)
    same = probes.pairs[:, None] == probes.pairs[None, :]
    assert torch.equal(loaded.pairs[:, None] == loaded.pairs[None, :], same)


def test_digest_is_stable_across_processes(probes, folder):
    code = "from audit.probes import ProbeSet; import sys; print(ProbeSet.load(sys.argv[1]).digest)"
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == probes.digest


def test_digest_ignores_renumbering_of_pairs_and_groups(probes):
    renumbered = ProbeSet(
        images=probes.images,
        labels=probes.labels,
        class_names=probes.class_names,
        masks=probes.masks,
        groups=len(probes.group_names) - 1 - probes.groups,
        group_names=list(reversed(probes.group_names)),
        pairs=probes.pairs * 10 + 7,
    )
    assert renumbered.digest == probes.digest


def _variant(p: ProbeSet, **changes) -> ProbeSet:
    fields = dict(
        images=p.images.clone(),
        labels=p.labels.clone(),
        class_names=list(p.class_names),
        masks=p.masks.clone(),
        groups=p.groups.clone(),
        group_names=list(p.group_names),
        pairs=p.pairs.clone(),
    )
    fields.update(changes)
    return ProbeSet(**fields)


def test_any_content_change_changes_the_digest(probes):
    img = probes.images.clone()
    img[1, 2, 3, 4] = img[1, 2, 3, 4] + (1.0 / 255 if img[1, 2, 3, 4] < 0.5 else -1.0 / 255)
    labels = probes.labels.clone()
    labels[0] = 1 - labels[0]
    masks = probes.masks.clone()
    masks[2, 0, 5, 5] = ~masks[2, 0, 5, 5]
    groups = probes.groups.clone()
    groups[0] = groups[0] ^ 1  # the same class in its other context (group = 2 * label + context)
    pairs = probes.pairs.clone()
    # a different partition that keeps each pair within one label: row 1 joins another scene
    other = next(r for r in range(2, len(probes), 2) if probes.labels[r] == probes.labels[1])
    pairs[1] = pairs[other]
    # a label change must move the row's group and pair too; compared with the same set unlabelled
    plain = _variant(probes, groups=None, group_names=[], pairs=None)
    variants = {
        "pixel": _variant(probes, images=img),
        "mask": _variant(probes, masks=masks),
        "group": _variant(probes, groups=groups),
        "group name": _variant(probes, group_names=[g + "!" for g in probes.group_names]),
        "class name": _variant(
            probes,
            class_names=["Wolf", "husky"],
            group_names=[g.replace("wolf|", "Wolf|") for g in probes.group_names],
        ),
        "pairs": _variant(probes, pairs=pairs),
        "no masks": _variant(probes, masks=None),
    }
    digests = {name: v.digest for name, v in variants.items()}
    for name, d in digests.items():
        assert d != probes.digest, f"changing the {name} kept the digest"
    assert len(set(digests.values())) == len(digests)
    assert (
        _variant(probes, labels=labels, groups=None, group_names=[], pairs=None).digest
        != plain.digest
    )


def test_save_warns_when_pixels_are_not_8_bit(tmp_path, probes):
    odd = _variant(probes, images=probes.images * 0.999)
    with pytest.warns(UserWarning, match="not exactly representable"):
        odd.save(tmp_path / "odd")
    assert ProbeSet.load(tmp_path / "odd").digest != odd.digest


def test_minimal_folder_with_labels_only(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    rows = [["image", "label"]]
    for i, label in enumerate(["dog", "cat", "dog"]):
        Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
        rows.append([f"{i}.jpg", label])
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    ps = ProbeSet.load(tmp_path)
    assert ps.images.shape == (3, 3, 8, 10)
    assert ps.labels.tolist() == [1, 0, 1]
    assert ps.masks is None and ps.groups is None and ps.pairs is None


# ---------------------------------------------------------------- malformed folders
def _break_image(folder: Path) -> None:
    (folder / "images" / "0001.png").write_bytes(b"this is not a png")


def _missing_image(folder: Path) -> None:
    (folder / "images" / "0002.png").unlink()


def _other_size(folder: Path) -> None:
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(folder / "images" / "0003.png")


def _mask_size(folder: Path) -> None:
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "masks" / "0004.png")


def _bad_label(folder: Path) -> None:
    rewrite_manifest(folder, lambda r: [r[0], [r[1][0], "fox", *r[1][2:]], *r[2:]])


def _no_classes(folder: Path) -> None:
    (folder / "classes.txt").unlink()


def _empty_classes(folder: Path) -> None:
    (folder / "classes.txt").write_text("\n\n")


def _no_label_column(folder: Path) -> None:
    rewrite_manifest(folder, lambda r: [[c for i, c in enumerate(row) if i != 1] for row in r])


def _duplicate_row(folder: Path) -> None:
    rewrite_manifest(folder, lambda r: [*r, r[3]])


def _unknown_column(folder: Path) -> None:
    rewrite_manifest(folder, lambda r: [[*r[0][:-1], "paire"], *r[1:]])


def _no_rows(folder: Path) -> None:
    rewrite_manifest(folder, lambda r: r[:1])


def _escaping_path(folder: Path) -> None:
    rewrite_manifest(folder, lambda r: [r[0], ["../outside.png", *r[1][1:]], *r[2:]])


@pytest.mark.parametrize(
    ("breaker", "expected"),
    [
        (_break_image, r"manifest\.csv, row 3: file 'images/0001\.png' cannot be read as an image"),
        (_missing_image, r"manifest\.csv, row 4: file 'images/0002\.png' does not exist"),
        (_other_size, r"row 5: image 'images/0003\.png' is 32x20 but 'images/0000\.png' is 32x32"),
        (_mask_size, r"row 6: mask 'masks/0004\.png' is 16x16 but its image .* is 32x32"),
        (_bad_label, r"row 2: label 'fox' is not in classes\.txt \(wolf, husky\)"),
        (_no_classes, r"classes\.txt is missing; write one class name per line"),
        (_empty_classes, r"classes\.txt is empty"),
        (_no_label_column, r"lacks the required column\(s\) label"),
        (
            _duplicate_row,
            r"row 14: duplicate row: image 'images/0002\.png' is already listed in row 4",
        ),
        (_unknown_column, r"unknown column\(s\) paire; allowed columns are"),
        (_no_rows, r"lists no images"),
        (_escaping_path, r"must be relative to the probe folder, inside it"),
    ],
)
def test_malformed_folder_gives_one_clear_error(folder, breaker, expected):
    breaker(folder)
    with pytest.raises(ProbeSetError, match=expected) as info:
        ProbeSet.load(folder)
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, ProbeSetError)
    assert info.value.__suppress_context__ or info.value.__context__ is None


def test_missing_folder(tmp_path):
    with pytest.raises(ProbeSetError, match="does not exist"):
        ProbeSet.load(tmp_path / "nope")


# ---------------------------------------------------------------- constructor validation
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"images": torch.rand(2, 1, 8, 8)}, r"images must be a float tensor \[N, 3, H, W\]"),
        ({"images": torch.full((2, 3, 8, 8), 2.0)}, r"must lie in \[0, 1\]"),
        ({"labels": torch.tensor([0, 5])}, r"labels\[1\] = 5 is not a class index"),
        (
            {"masks": torch.ones(2, 1, 4, 4, dtype=torch.bool)},
            r"masks must be a bool tensor \[2, 1, 8, 8\]",
        ),
        ({"groups": torch.tensor([0, 1])}, "groups were given without group_names"),
        ({"class_names": ["a", "a"]}, "duplicates"),
    ],
)
def test_constructor_rejects_bad_fields(changes, expected):
    fields = dict(
        images=torch.rand(2, 3, 8, 8), labels=torch.tensor([0, 1]), class_names=["a", "b"]
    )
    fields.update(changes)
    with pytest.raises(ProbeSetError, match=expected):
        ProbeSet(**fields)


def test_subset_keeps_names(probes):
    sub = probes.subset([0, 3])
    assert len(sub) == 2 and sub.group_names == probes.group_names
    assert sub.group_of(1) == probes.group_of(3)
