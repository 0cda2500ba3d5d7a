"""``probes.transform``: probe folders of photos of any size, brought to one size (issue 28, item 4).

Fast tests: the geometry (a mask on a known rectangle stays on the transformed
rectangle), loads of a folder of JPEGs of mixed sizes with PNG masks, the digest
(streamed == in memory; another transform, another digest), the hostile-file checks
on the files' own sizes, and the ``model-audit`` command on a real SQLite store.
The verdict check (mixed sizes agree with one size, shortcut and clean model) is slow.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _jobkit import ALLOW, ENGINE, all_runs, cli, registry, state
from _toy_models import ColourReader, ContextReader, colour_probe_set
from mlflow.tracking import MlflowClient
from PIL import Image

from audit.datasets import snow_wolf
from audit.probes import ProbeSet, ProbeSetError
from audit.probes.transform import ProbeTransform, probe_transform

# (height, width) of the files, cycled over the rows: smaller, larger, wider, taller, odd
SIZES = [(48, 48), (60, 44), (40, 56), (96, 72), (37, 53), (72, 72), (50, 45), (90, 120)]


def _write_folder(
    root: Path, ps: ProbeSet, sizes: list[tuple[int, int]] | None, fmt: str = "JPEG"
) -> Path:
    """``ps`` as a probe folder: image i resized (bicubic) to ``sizes[i % len]`` and saved as ``fmt``,
    its mask resized by nearest neighbour and saved as PNG; ``sizes=None`` keeps the set's size."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in ps.class_names))
    pixels = torch.round(ps.images * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ext = "jpg" if fmt == "JPEG" else "png"
    rows = [["image", "label", "mask", "group", "pair"]]
    for i in range(len(ps)):
        image = Image.fromarray(pixels[i], "RGB")
        mask = Image.fromarray(ps.masks[i, 0].numpy().astype(np.uint8) * 255, "L")
        if sizes is not None:
            h, w = sizes[i % len(sizes)]
            image, mask = image.resize((w, h), Image.BICUBIC), mask.resize((w, h), Image.NEAREST)
        image.save(
            root / "images" / f"{i:04d}.{ext}",
            format=fmt,
            **({"quality": 95} if fmt == "JPEG" else {}),
        )
        mask.save(root / "masks" / f"{i:04d}.png")
        rows.append(
            [
                f"images/{i:04d}.{ext}",
                ps.class_names[int(ps.labels[i])],
                f"masks/{i:04d}.png",
                ps.group_of(i),
                str(int(ps.pairs[i])),
            ]
        )
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """16 snow-wolf probes as JPEGs of eight sizes and aspect ratios, with PNG masks."""
    ps = snow_wolf.probe_set(n_per_group=4, size=48, seed=1)
    return _write_folder(tmp_path_factory.mktemp("mixed"), ps, SIZES)


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    ("shape", "target", "rect", "expected"),
    [
        # 60 x 40 (h x w) -> 20 x 20: crop the centre 40 x 40 (rows 10..50), halve it
        ((60, 40), (20, 20), (20, 40, 10, 30), (5, 15, 5, 15)),
        # 30 x 20 -> 40 x 40: crop rows 5..25, double them
        ((30, 20), (40, 40), (10, 20, 4, 12), (10, 30, 8, 24)),
        # 40 x 90 -> 20 x 30 (a non-square target): crop the centre 40 x 60 (cols 15..75), scale 1/2
        ((40, 90), (20, 30), (8, 24, 21, 45), (4, 12, 3, 15)),
    ],
)
def test_a_mask_on_a_known_rectangle_stays_on_the_transformed_rectangle(
    shape, target, rect, expected
):
    h, w = shape
    r0, r1, c0, c1 = rect
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[:, r0:r1, c0:c1] = True
    image = torch.full((3, h, w), 0.2)
    image[:, mask[0]] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1)
    t = ProbeTransform(target)
    m, x = t.mask(mask), t.image(image)
    want = torch.zeros(1, *target, dtype=torch.bool)
    e0, e1, f0, f1 = expected
    want[:, e0:e1, f0:f1] = True
    assert m.shape == (1, *target) and m.dtype == torch.bool
    assert torch.equal(m, want)  # exactly the transformed rectangle
    # the image's red square lands on the mask: inside it (one pixel in from the edge) red, far outside grey
    inner = torch.zeros_like(want)
    inner[:, e0 + 1 : e1 - 1, f0 + 1 : f1 - 1] = True
    far = ~torch.nn.functional.max_pool2d(want.float(), 3, 1, 1).bool()
    assert x.shape == (3, *target) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.allclose(x[:, inner[0]], torch.tensor([0.9, 0.1, 0.1]).view(3, 1), atol=1e-5)
    assert torch.allclose(x[:, far[0]], torch.tensor(0.2), atol=1e-5)


def test_masks_stay_on_their_objects_at_odd_scales(tmp_path):
    # every resize, crop and rounding at once, through JPEG files of eight sizes: colour squares
    # on grey, so a pixel is the object exactly when it is coloured (|R - B| large). After the
    # transform, the mask shrunk by 2 px is coloured and everything 3 px away from it is grey
    # (the margins: JPEG's 4:2:0 colour bleeding, and two resamplings: the file's and ours; a
    # mask off by a pixel is caught exactly by the rectangle test above)
    ps = colour_probe_set(n_per_group=4, size=48, seed=4)
    folder = _write_folder(tmp_path / "squares", ps, SIZES)
    for t in (ProbeTransform(48), ProbeTransform((30, 40), "bicubic")):
        out = ProbeSet.load(folder, transform=t)
        chroma = (out.images[:, 0] - out.images[:, 2]).abs()  # [N, H, W]
        for i in range(len(out)):
            m = out.masks[i, 0]
            core, halo = _shrink(m, 2), _grow(m, 3)
            assert core.any(), (i, t)
            assert bool((chroma[i][core] > 0.4).all()), (i, t)
            assert bool((chroma[i][~halo] < 0.1).all()), (i, t)


def _shrink(m: torch.Tensor, k: int) -> torch.Tensor:
    """``m`` eroded by ``k`` pixels (a square neighbourhood)."""
    return ~_grow(~m, k)


def _grow(m: torch.Tensor, k: int) -> torch.Tensor:
    """``m`` dilated by ``k`` pixels (a square neighbourhood)."""
    return torch.nn.functional.max_pool2d(m[None, None].float(), 2 * k + 1, 1, k)[0, 0].bool()


def test_an_image_already_at_the_size_is_not_touched_and_values_stay_in_range():
    x = torch.rand(3, 24, 24)
    assert ProbeTransform(24).image(x) is x
    big = torch.zeros(3, 50, 70)
    big[:, ::2] = 1.0  # stripes: bicubic overshoots, the result is clamped back to [0, 1]
    for how in ("bilinear", "bicubic"):
        y = ProbeTransform((31, 17), how).image(big)
        assert y.shape == (3, 31, 17) and float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_a_hostile_aspect_ratio_costs_its_crop_not_a_huge_intermediate():
    # 1 x 4096 aimed at 224 x 224: scaling the shorter side first would make 224 x 917,504
    t = ProbeTransform(224)
    assert t.crop_box(1, 4096) == (0, 2047, 1, 1)
    assert t.image(torch.rand(3, 1, 4096)).shape == (3, 224, 224)


@pytest.mark.parametrize(
    ("size", "interp", "input_size", "expected"),
    [
        (None, "bilinear", None, None),
        (None, "bilinear", (32, 40), ProbeTransform((32, 40))),
        (64, "bicubic", None, ProbeTransform((64, 64), "bicubic")),
        ([64, 48], "bilinear", (64, 48), ProbeTransform((64, 48))),
    ],
)
def test_the_size_is_the_configured_one_else_the_models_else_none(
    size, interp, input_size, expected
):
    assert probe_transform(size, interp, input_size=input_size) == expected


@pytest.mark.parametrize(
    ("size", "interp", "input_size", "needle"),
    [
        (0, "bilinear", None, "size must be a positive integer"),
        ("224", "bilinear", None, "size must be a positive integer"),
        ([224, 224, 3], "bilinear", None, "size must be a positive integer"),
        (True, "bilinear", None, "size must be a positive integer"),
        (224, "nearest", None, "interpolation must be one of bilinear, bicubic; got 'nearest'"),
        (None, "area", None, "interpolation must be one of bilinear, bicubic; got 'area'"),
        (
            224,
            "bilinear",
            (299, 299),
            "probes.transform.size asks for 224x224 but the model takes 299x299",
        ),
        (
            None,
            "bilinear",
            (0, 5),
            "the model's input size must be two positive integers (height, width); fix",
        ),
    ],
)
def test_a_bad_transform_is_one_line_naming_the_value(size, interp, input_size, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
        probe_transform(size, interp, input_size=input_size)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- loading a folder
def test_mixed_sizes_without_a_transform_name_the_fix(mixed):
    for reader in (ProbeSet.load, ProbeSet.open):
        with pytest.raises(ProbeSetError) as err:
            reader(mixed)
        msg = str(err.value)
        assert "row 3: image 'images/0001.jpg' is 44x60 but 'images/0000.jpg' is 48x48" in msg
        assert "probes.transform.size=<n>" in msg and "\n" not in msg
    # opened with the size left for later, it is checked and waits; reading it gives the same error
    pf = ProbeSet.open(mixed, defer_size=True)
    assert len(pf) == 16 and "size=mixed" in repr(pf)
    with pytest.raises(ProbeSetError, match="probes.transform.size=<n>"):
        pf.batches().__next__()
    with pytest.raises(ProbeSetError, match="probes.transform.size=<n>"):
        pf.with_transform(None)


def test_a_folder_of_jpegs_of_mixed_sizes_loads_at_one_size(mixed):
    t = ProbeTransform(40)
    ps = ProbeSet.load(mixed, transform=t)
    assert ps.images.shape == (16, 3, 40, 40) and ps.masks.shape == (16, 1, 40, 40)
    assert ps.group_names == snow_wolf.GROUPS[:1] + ps.group_names[1:] and len(ps.group_names) == 4
    assert float(ps.images.min()) >= 0.0 and float(ps.images.max()) <= 1.0
    shares = ps.masks.flatten(1).float().mean(1)
    assert bool(((shares > 0.02) & (shares < 0.6)).all()), shares  # every animal survived its crop
    # each row is its file decoded and transformed, nothing else
    first = torch.from_numpy(
        np.asarray(Image.open(mixed / "images/0003.jpg"), dtype=np.float32) / 255
    ).permute(2, 0, 1)
    assert first.shape == (3, 96, 72)
    assert torch.equal(ps.images[3], t.image(first))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_equals_in_memory_through_a_transform(mixed, workers):
    t = ProbeTransform((36, 44), "bicubic")
    ps = ProbeSet.load(mixed, transform=t)
    pf = ProbeSet.open(mixed, transform=t, workers=workers)
    assert pf.size == ps.size == (36, 44) and pf.images.shape == ps.images.shape
    got = torch.cat([x for _, x in pf.batches(None, batch_size=5)])
    assert torch.equal(got, ps.images)
    assert pf.digest == ps.digest  # fixed by the pass above, from the same decoded rows
    assert torch.equal(pf.masks[[2, 7]], ps.masks[[2, 7]])
    assert pf.subset([1, 4]).digest == ps.subset([1, 4]).digest
    # opened first with the size left open, then given it (as the audit job does)
    later = ProbeSet.open(mixed, defer_size=True).with_transform(t)
    assert later.compute_digest(batch_size=16, workers=0) == ps.digest


def test_the_digest_covers_the_transform(mixed):
    digests = {
        str(t): ProbeSet.open(mixed, transform=t).compute_digest(workers=0)
        for t in (
            ProbeTransform(32),
            ProbeTransform(40),
            ProbeTransform((32, 40)),
            ProbeTransform(32, "bicubic"),
        )
    }
    assert len(set(digests.values())) == 4, digests
    assert (
        ProbeSet.load(mixed, transform=ProbeTransform(32)).digest
        == digests[str(ProbeTransform(32))]
    )


def test_a_transform_to_the_files_own_size_keeps_their_pixels_and_digest(tmp_path):
    ps = snow_wolf.probe_set(n_per_group=2, size=32, seed=2)
    folder = _write_folder(tmp_path / "one-size", ps, None, fmt="PNG")
    plain = ProbeSet.load(folder)
    assert plain.digest == ps.digest
    same = ProbeSet.load(folder, transform=ProbeTransform(32))
    assert (
        torch.equal(same.images, plain.images) and same.digest == plain.digest
    )  # the model sees the same
    # one size, but not the model's: brought to it
    smaller = ProbeSet.load(folder, transform=ProbeTransform(24))
    assert smaller.size == (24, 24) and smaller.digest != plain.digest


# --------------------------------------------------------------------------- hostile files, original sizes
def test_hostile_checks_hold_on_the_files_own_sizes(mixed, tmp_path, monkeypatch):
    t = ProbeTransform(8)
    # max_pixels: 90 x 120 = 10,800 pixels in a file, refused from its header although it becomes 8 x 8
    with pytest.raises(
        ProbeSetError,
        match=r"row 9: image 'images/0007\.jpg' is 120x90 = 10800 pixels, above max_pixels=10000",
    ):
        ProbeSet.load(mixed, transform=t, max_pixels=10_000)
    # max_total_pixels counts what is decoded (the files: 2 x 41,722 pixels), not the 16 x 64 of the result
    decoded = sum(h * w for h, w in SIZES) * 2
    with pytest.raises(
        ProbeSetError, match=rf"the 16 image files are {decoded} pixels in all as decoded"
    ):
        ProbeSet.load(mixed, transform=t, max_total_pixels=decoded - 1)
    assert ProbeSet.load(mixed, transform=t, max_total_pixels=decoded).size == (8, 8)
    # and the stack after the transform, when it is the larger
    with pytest.raises(ProbeSetError, match=r"16 images of 100x100 are 160000 pixels in all"):
        ProbeSet.load(mixed, transform=ProbeTransform(100), max_total_pixels=150_000)
    # a target above max_pixels (a hostile model's input size) is refused before any decoding
    with pytest.raises(
        ProbeSetError,
        match=r"probes.transform would make every image 200x100 = 20000 pixels, above max_pixels=12000",
    ):
        ProbeSet.open(mixed, transform=ProbeTransform((100, 200)), max_pixels=12_000)
    # a file swapped after its header was read, for one of another size: refused when decoded
    victim = shutil.copytree(mixed, tmp_path / "swap")
    pf = ProbeSet.open(victim, transform=t)
    Image.new("RGB", (400, 300)).save(victim / "images/0002.jpg", format="JPEG")
    with pytest.raises(
        ProbeSetError, match=r"row 4: image 'images/0002\.jpg' changed while the folder was read"
    ):
        pf.subset([2])
    # Pillow's decompression-bomb limit, on the file's own size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)  # refused above 4,000: the 96 x 72 file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ProbeSetError, match=r"row 5: image 'images/0003\.jpg' claims more than 4000 pixels"
        ):
            ProbeSet.open(mixed, transform=t)


# --------------------------------------------------------------------------- the model-audit command
@pytest.fixture(scope="module")
def snow_registry(tmp_path_factory) -> tuple[str, Path]:
    """A SQLite registry: 'snow' v1 = ContextReader (reads the background: FAIL on snow-wolf probes)."""
    work = tmp_path_factory.mktemp("snow-registry")
    return registry(work / "store", models=(ContextReader,), name="snow"), work


def test_the_command_audits_a_mixed_folder_and_refuses_one_without_a_size(
    snow_registry, mixed, monkeypatch
):
    uri, work = snow_registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(work)
    client = MlflowClient(uri)
    args = [
        "model.uri=models:/snow/1",
        "probes=folder",
        f"probes.path={mixed}",
        ALLOW,
        *ENGINE,
        "quiet=true",
    ]
    before = (state(client, "snow"), len(all_runs(client)))
    # no transform, no model size: today's error, naming the fix; nothing written
    r = cli(args, work)
    assert r.code == 2 and len(r.errors) == 1, r.err
    assert "bad probe set:" in r.errors[0] and "probes.transform.size=<n>" in r.errors[0]
    for bad, needle in [
        ("probes.transform.size=0", "probes.transform.size must be a positive integer"),
        ("probes.transform.interpolation=nearest", "probes.transform.interpolation must be one of"),
    ]:
        r = cli([*args, bad], work)
        assert r.code == 2 and len(r.errors) == 1 and needle in r.errors[0], r.err
    assert (state(client, "snow"), len(all_runs(client))) == before
    # with a size: audited end to end, the verdict tagged, the digest that of the transformed set
    r = cli([*args, "probes.transform.size=40"], work)
    assert r.code == 1 and "snow v1: FAIL" in r.out, r.out + r.err
    expected = ProbeSet.load(mixed, transform=ProbeTransform(40)).digest
    tags = state(client, "snow")["versions"]["1"]
    assert tags["audit.verdict"] == "FAIL" and tags["audit.probe_digest"] == expected
    run = client.get_run(tags["audit.run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["audit.probe_digest"] == expected
    source = json.loads(run.inputs.dataset_inputs[0].dataset.source)
    assert source["transform"] == {"size": [40, 40], "interpolation": "bilinear"}
    logged = client.download_artifacts(run.info.run_id, "audit_config.yaml", str(work))
    assert yaml.safe_load(Path(logged).read_text())["probes"]["transform"]["size"] == [40, 40]


# --------------------------------------------------------------------------- verdicts agree (slow)
@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "make", "size", "verdict"),
    [
        (ContextReader, lambda: snow_wolf.probe_set(n_per_group=48, size=48, seed=5), 48, "FAIL"),
        (ColourReader, lambda: colour_probe_set(n_per_group=48, size=32, seed=5), 32, "PASS"),
    ],
    ids=["shortcut-snow-wolf", "clean-colour-squares"],
)
def test_a_mixed_size_folder_gets_the_verdict_of_the_same_probes_at_one_size(
    tmp_path, monkeypatch, model, make, size, verdict
):
    ps = make()
    one = _write_folder(tmp_path / "one", ps, None, fmt="PNG")
    sizes = [
        (round(h * size / 48), round(w * size / 48)) for h, w in SIZES
    ]  # the same ratios about this size
    mixed = _write_folder(tmp_path / "mixed", ps, sizes)
    uri = registry(tmp_path / "store", models=(model,), name="m")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    base = [
        "model.uri=models:/m/1",
        "probes=folder",
        ALLOW,
        *ENGINE,
        "quiet=true",
        "promote.tags=false",
    ]
    at_one = cli([*base, f"probes.path={one}"], tmp_path)
    at_many = cli([*base, f"probes.path={mixed}", f"probes.transform.size={size}"], tmp_path)
    assert f"m v1: {verdict}" in at_one.out, at_one.out + at_one.err
    assert f"m v1: {verdict}" in at_many.out, at_many.out + at_many.err
    # not only the verdict: the evidence is close (the context gap within 0.1)
    runs = {
        r.data.tags["audit.probe_digest"]: r
        for r in all_runs(MlflowClient(uri))
        if "audit.verdict" in r.data.tags
    }
    assert len(runs) == 2
    gaps = [r.data.metrics["context_gap"] for r in runs.values()]
    assert abs(gaps[0] - gaps[1]) <= 0.1, gaps
