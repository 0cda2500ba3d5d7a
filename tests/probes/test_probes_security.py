"""ProbeSet.load on hostile folders: pixel values kept, sizes checked before decoding, paths
kept inside the folder, names that MLflow accepts, groups and pairs that agree with labels."""

from __future__ import annotations

import csv
import io
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from audit.datasets import snow_wolf, stamps
from audit.gate.tracking import metric_key
from audit.probes import ProbeSet, ProbeSetError
from audit.probes.probe_set import MAX_NAME_LENGTH, name_problem


def _folder(
    root: Path, rows: list[list[str]], classes: str = "wolf\nhusky\n", header=("image", "label")
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])
    return root


def _rgb(path: Path, value: int = 100, size=(4, 4)) -> None:
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A real 1x1 PNG whose IHDR says ``width`` x ``height`` (CRC fixed): tiny on disk."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _load_error(folder: Path, **kw) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning may escape either
        with pytest.raises(ProbeSetError) as info:
            ProbeSet.load(folder, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert info.value.__suppress_context__ or info.value.__context__ is None
    return msg


# ---------------------------------------------------------------- image modes and values
def test_16_bit_grayscale_keeps_its_values(tmp_path):
    values = np.array([[0, 1000], [30000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    mask = np.array([[0, 1], [0, 0]], np.uint16)  # 16-bit mask: any nonzero is object
    Image.fromarray(mask).save(tmp_path / "m.png")
    ps = ProbeSet.load(
        _folder(tmp_path, [["a.png", "wolf", "m.png"]], header=("image", "label", "mask"))
    )
    expected = torch.from_numpy(values.astype(np.float32) / np.float32(65535))
    for c in range(3):
        assert torch.equal(ps.images[0, c], expected)
    assert ps.masks[0, 0].tolist() == [[False, True], [False, False]]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda a: Image.fromarray(a[..., 0], "L"), lambda a: np.repeat(a[..., :1], 3, 2)),
        (
            lambda a: Image.fromarray(a, "RGB").convert(
                "P", palette=Image.Palette.ADAPTIVE, colors=4
            ),
            None,
        ),
        (
            lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]), "RGBA"),
            lambda a: a,
        ),
        (
            lambda a: Image.fromarray(
                np.dstack([a[..., 0], np.full(a.shape[:2], 255, np.uint8)]), "LA"
            ),
            lambda a: np.repeat(a[..., :1], 3, 2),
        ),
        (
            lambda a: Image.fromarray(a[..., 0] > 100).convert("1"),
            lambda a: np.repeat((a[..., :1] > 100).astype(np.uint8) * 255, 3, 2),
        ),
    ],
    ids=["L", "P", "RGBA-opaque", "LA-opaque", "1"],
)
def test_accepted_modes_keep_values(tmp_path, make, expected):
    a = np.random.default_rng(0).integers(0, 256, (6, 5, 3)).astype(np.uint8)
    im = make(a)
    im.save(tmp_path / "x.png")
    ps = ProbeSet.load(_folder(tmp_path, [["x.png", "wolf"]]))
    want = np.asarray(im.convert("RGB")) if expected is None else expected(a)
    got = (ps.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(got, want)


def test_float_and_int_tiff(tmp_path):
    f = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    ps = ProbeSet.load(_folder(tmp_path, [["f.tif", "wolf"]]))
    assert torch.equal(ps.images[0, 1], torch.from_numpy(f))
    Image.fromarray(np.array([[0, 70000]], np.int32), "I").save(tmp_path / "i.tif")
    _folder(tmp_path, [["i.tif", "wolf"]])
    assert re.search(
        r"row 2: image 'i\.tif' \(mode I\) has values in \[0, 70000\], outside the 16-bit range",
        _load_error(tmp_path),
    )
    Image.fromarray(np.array([[0.0, 2.0]], np.float32), "F").save(tmp_path / "f2.tif")
    _folder(tmp_path, [["f2.tif", "wolf"]])
    assert "(mode F) has values outside [0, 1]" in _load_error(tmp_path)


def test_transparent_and_cmyk_are_refused(tmp_path):
    rgba = np.full((4, 4, 4), 200, np.uint8)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    _folder(tmp_path, [["t.png", "wolf"]])
    msg = _load_error(tmp_path)
    assert msg.startswith(
        f"{tmp_path / 'manifest.csv'}, row 2: image 't.png' (mode RGBA) has transparent pixels"
    )
    assert "flatten it onto a background" in msg
    Image.new("CMYK", (4, 4), (0, 50, 100, 0)).save(tmp_path / "c.jpg")
    _folder(tmp_path, [["c.jpg", "wolf"]])
    assert re.search(
        r"row 2: image 'c\.jpg' has PIL mode CMYK, which cannot be read without changing its "
        r"values; save it as RGB",
        _load_error(tmp_path),
    )


def test_other_formats_are_not_parsed(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.gif")
    (tmp_path / "x.gif").rename(tmp_path / "x.png")  # a GIF under a PNG name
    _folder(tmp_path, [["x.png", "wolf"]])
    assert "row 2: file 'x.png' cannot be read as an image" in _load_error(tmp_path)


# ---------------------------------------------------------------- sizes from the header
def test_decompression_bomb_header_is_refused_cleanly(tmp_path):
    _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    _folder(tmp_path, [["bomb.png", "wolf"]])
    msg = _load_error(tmp_path)
    assert "row 2: image 'bomb.png' claims more than" in msg and "decompression bomb" in msg


def test_size_above_max_pixels_is_refused_before_decoding(tmp_path):
    _png_claiming(tmp_path / "big.png", 5000, 5000)  # above the default limit, below PIL's
    _folder(tmp_path, [["big.png", "wolf"]])
    assert _load_error(tmp_path).endswith(
        "row 2: image 'big.png' is 5000x5000 = 25000000 pixels, above max_pixels=16777216 (checked "
        "from the header, not decoded); downscale it or raise max_pixels"
    )
    _rgb(tmp_path / "small.png", size=(40, 40))
    _folder(tmp_path, [["small.png", "wolf"]])
    assert "above max_pixels=1000" in _load_error(tmp_path, max_pixels=1000)
    assert ProbeSet.load(tmp_path, max_pixels=1600).size == (40, 40)


def test_total_pixels_are_limited(tmp_path):
    for i in range(3):
        _rgb(tmp_path / f"{i}.png", size=(10, 10))
    _folder(tmp_path, [[f"{i}.png", "wolf"] for i in range(3)])
    msg = _load_error(tmp_path, max_total_pixels=299)
    assert msg.startswith(f"{tmp_path / 'manifest.csv'}: 3 images of 10x10 are 300 pixels in all")
    assert "above max_total_pixels=299" in msg
    assert len(ProbeSet.load(tmp_path, max_total_pixels=300)) == 3


def test_mask_size_is_checked_from_the_header(tmp_path):
    _rgb(tmp_path / "a.png")
    _png_claiming(tmp_path / "m.png", 20000, 20000)
    _folder(tmp_path, [["a.png", "wolf", "m.png"]], header=("image", "label", "mask"))
    assert "mask 'm.png' claims more than" in _load_error(tmp_path)


# ---------------------------------------------------------------- paths and links
def test_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "secret.png"
    _rgb(outside)
    folder = tmp_path / "probes"
    folder.mkdir()
    (folder / "a.png").symlink_to(outside)
    _folder(folder, [["a.png", "wolf"]])
    msg = _load_error(folder)
    assert f"row 2: image 'a.png' leads outside the probe folder (to {outside.resolve()})" in msg
    # a link that stays inside is fine
    _rgb(folder / "real.png")
    (folder / "b.png").symlink_to("real.png")
    _folder(folder, [["b.png", "wolf"]])
    assert len(ProbeSet.load(folder)) == 1


def test_linked_directory_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    _rgb(tmp_path / "elsewhere" / "a.png")
    folder = tmp_path / "probes"
    folder.mkdir()
    (folder / "images").symlink_to(tmp_path / "elsewhere")
    _folder(folder, [["images/a.png", "wolf"]])
    assert "leads outside the probe folder" in _load_error(folder)


@pytest.mark.parametrize("name", ["classes.txt", "manifest.csv"])
def test_top_files_must_not_link_out(tmp_path, name):
    folder = _folder(tmp_path / "probes", [["a.png", "wolf"]])
    _rgb(folder / "a.png")
    real = tmp_path / f"real-{name}"
    (folder / name).rename(real)
    (folder / name).symlink_to(real)
    msg = _load_error(folder)
    assert msg.startswith(f"{folder / name}: {name} leads outside the probe folder")


def test_only_regular_files(tmp_path):
    folder = _folder(tmp_path, [["d", "wolf"]])
    (folder / "d").mkdir()
    assert "row 2: image 'd' is not a regular file" in _load_error(folder)
    os.mkfifo(folder / "fifo")
    _folder(folder, [["fifo", "wolf"]])
    assert "row 2: image 'fifo' is not a regular file" in _load_error(folder)
    (folder / "dev").symlink_to("/dev/zero")
    _folder(folder, [["dev", "wolf"]])
    assert "leads outside the probe folder" in _load_error(folder)


def test_same_file_twice_through_a_link_is_a_duplicate(tmp_path):
    _rgb(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to("a.png")
    _folder(tmp_path, [["a.png", "wolf"], ["b.png", "wolf"]])
    assert (
        "row 3: duplicate row: image 'b.png' is already listed in row 2 (as 'a.png')"
        in _load_error(tmp_path)
    )


# ---------------------------------------------------------------- names
def _grouped(tmp_path: Path, groups: list[tuple[str, str]], classes="wolf\nhusky\n") -> Path:
    rows = []
    for i, (label, group) in enumerate(groups):
        _rgb(tmp_path / f"{i}.png", value=10 * i)
        rows.append([f"{i}.png", label, group])
    return _folder(tmp_path, rows, classes=classes, header=("image", "label", "group"))


@pytest.mark.parametrize(
    "label, group, expected",
    [
        (
            "wolf",
            "wolf|tag/",
            r"row 2: group 'wolf\|tag/': its context 'tag/' has the character '/'",
        ),
        (
            "wolf",
            "horizontal|tag/",
            r"row 2: group 'horizontal\|tag/' names class 'horizontal', which is not a class \(wolf, husky\)",
        ),
        ("wolf", "wolf|..", r"its context '\.\.' is '\.\.', which MLflow reads as a path"),
        ("wolf", "wolf|a b ", None),  # stripped by the CSV reader: fine
        ("wolf", "wolf|a  b", r"has a leading, trailing or double space"),
        ("wolf", "wolf|snow<x>", r"has the character '<'"),
        ("wolf", "wolf|sch\u00e4fer", r"has the character '\u00e4' \(U\+00E4\)"),
        ("wolf", "wolf", r"row 2: group 'wolf' has no '\|'; name groups '<class>\|<context>'"),
        ("wolf", "wolf|a|b", r"group 'wolf\|a\|b' has more than one '\|'"),
        (
            "wolf",
            "husky|snow",
            r"row 2: group 'husky\|snow' is of class 'husky' but the row's label is 'wolf'",
        ),
        ("wolf", "wolf|" + "x" * MAX_NAME_LENGTH, r"characters long, above 200"),
    ],
)
def test_bad_group_names_are_refused_at_load(tmp_path, label, group, expected):
    _grouped(tmp_path, [(label, group)])
    if expected is None:
        assert ProbeSet.load(tmp_path).group_names == [group.strip()]
        return
    assert re.search(expected, _load_error(tmp_path))


def test_groups_that_share_a_metric_key_are_refused(tmp_path):
    _grouped(tmp_path, [("a", "a|b_c"), ("a_b", "a_b|c")], classes="a\na_b\n")
    assert (
        "row 3: groups 'a_b|c' and 'a|b_c' (row 2) both become the MLflow metric key "
        "'acc/a_b_c'; rename one of them"
    ) in _load_error(tmp_path)


@pytest.mark.parametrize(
    "classes, expected",
    [
        ("wolf\nhus/ky\n", r"classes\.txt, line 2: class name 'hus/ky' has the character '/'"),
        ("wolf\nhusky|x\n", r"line 2: class name 'husky\|x' has the character '\|'"),
        ("wolf\n..\n", r"line 2: class name '\.\.' is '\.\.'"),
        ("wolf\n" + "h" * 201 + "\n", r"line 2: class name 'h+\.\.\.' is 201 characters long"),
        ("wolf\nwolf\n", r"line 2: class name 'wolf' is already on line 1"),
        ("wolf\n\nhusky\n", r"line 2: empty class name"),
    ],
)
def test_bad_class_names_are_refused(tmp_path, classes, expected):
    _rgb(tmp_path / "a.png")
    _folder(tmp_path, [["a.png", "wolf"]], classes=classes)
    msg = _load_error(tmp_path)
    assert re.search(expected, msg), msg
    assert "they become MLflow metric keys" in msg or "already" in msg or "empty" in msg


def test_pair_across_labels_is_refused(tmp_path):
    for i in range(3):
        _rgb(tmp_path / f"{i}.png", value=i)
    _folder(
        tmp_path,
        [["0.png", "wolf", "p"], ["1.png", "husky", "q"], ["2.png", "husky", "p"]],
        header=("image", "label", "pair"),
    )
    assert (
        "row 4: pair 'p' joins this row (label 'husky') with row 2 (label 'wolf'); the rows of a "
        "pair show one object, so they share a label"
    ) in _load_error(tmp_path)


def test_every_accepted_name_is_a_valid_mlflow_key():
    from mlflow.utils.validation import _validate_metric_name

    names = ["wolf", "a.b", "x y", "A-1_2", "...", ".x", "x.", "-", "_", "9" * MAX_NAME_LENGTH]
    for n in names:
        assert name_problem(n) is None, n
        for key in (
            metric_key("acc", f"{n}|{n}"),
            f"context_gap/{n}/high",
            metric_key("eval", "acc", f"{n}|{n}"),
        ):
            _validate_metric_name(key)
    for bad in [
        "a/b",
        "a|b",
        ".",
        "..",
        "",
        " a",
        "a\n",
        "a:b",
        "\u00e9",
        "x" * (MAX_NAME_LENGTH + 1),
    ]:
        assert name_problem(bad), bad


# ---------------------------------------------------------------- the constructor and benchmarks
def _base(**changes):
    fields = dict(
        images=torch.rand(4, 3, 4, 4),
        labels=torch.tensor([0, 0, 1, 1]),
        class_names=["wolf", "husky"],
    )
    fields.update(changes)
    return ProbeSet(**fields)


def test_constructor_holds_groups_and_pairs_to_labels():
    with pytest.raises(ProbeSetError, match=r"row 1 is in group 'husky\|snow' but labelled 'wolf'"):
        _base(groups=torch.tensor([0, 1, 1, 1]), group_names=["wolf|snow", "husky|snow"])
    with pytest.raises(ProbeSetError, match=r"group 'fox\|snow' \(row 0\) names class 'fox'"):
        _base(groups=torch.tensor([0, 0, 0, 0]), group_names=["fox|snow"])
    with pytest.raises(
        ProbeSetError, match=r"pairs: rows 1 and 2 share pair 7 but are labelled 'wolf' and 'husky'"
    ):
        _base(pairs=torch.tensor([0, 7, 7, 3]))
    with pytest.raises(
        ProbeSetError, match=r"class_names\[1\] = 'a\\nb' is empty or has a newline"
    ):
        _base(class_names=["wolf", "a\nb"])
    ok = _base(
        groups=torch.tensor([0, 0, 1, 1]),
        group_names=["wolf|snow", "husky|snow"],
        pairs=torch.tensor([0, 0, 1, 1]),
    )
    ok.check_names()
    with pytest.raises(
        ProbeSetError, match=r"group_names\[0\]: group 'wolf\|tag/': its context 'tag/'"
    ):
        _base(
            groups=torch.tensor([0, 0, 1, 1]), group_names=["wolf|tag/", "husky|snow"]
        ).check_names()
    with pytest.raises(ProbeSetError, match=r"class_names\[1\] = 'hus ky!' has the character '!'"):
        _base(class_names=["wolf", "hus ky!"]).check_names()


@pytest.mark.parametrize("bench", [snow_wolf, stamps])
def test_benchmarks_pass_every_rule(tmp_path, bench):
    ps = bench.probe_set(n_per_group=2, size=24, seed=0)
    ps.check_names()
    assert ProbeSet.load(ps.save(tmp_path / "p")).digest == ps.digest
