"""Faithfulness (deletion / insertion) and localization metrics: known answers and laws."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torchvision.transforms.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from audit.engine.model import AttributionError, hook_count
from audit.metrics import (
    BASELINES,
    curve_auc,
    curve_set,
    deletion_curve,
    insertion_curve,
    make_baseline,
    pointing_game,
    random_attribution,
    random_reference,
    relevance_mass,
    relevance_rank,
)
from audit.models import SmallCNN

FAST = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------- helpers
class RegionModel(nn.Module):
    """Two classes; logit 0 grows with the mean brightness of a fixed region, logit 1 is 0."""

    def __init__(self, h: int, w: int, rows: slice, cols: slice) -> None:
        super().__init__()
        region = torch.zeros(1, 1, h, w)
        region[..., rows, cols] = 1.0
        self.register_buffer("region", region)
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = (x * self.region).sum(dim=(1, 2, 3)) / (self.region.sum() * x.shape[1])
        z = self.scale * (mean - 0.25)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def tiny_cnn(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=classes, widths=(4, 8)).eval()


def images(n: int, h: int, w: int, seed: int = 0, c: int = 3) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def naive_curves(model, x, target, attribution, steps, baseline_images, kind):
    """One forward pass per image and step; ranking by Python's (stable) sort."""
    model.eval()
    n, _, h, w = x.shape
    hw = h * w
    curves = []
    with torch.no_grad():
        for i in range(n):
            s = attribution[i].sum(dim=0).flatten().tolist()
            order = sorted(range(hw), key=lambda p: -s[p])
            t = int(model(x[i : i + 1]).argmax()) if target is None else int(target[i])
            row = []
            for k in range(steps + 1):
                chosen = torch.zeros(hw, dtype=torch.bool)
                chosen[order[: (k * hw) // steps]] = True
                chosen = chosen.view(1, h, w)
                if kind == "deletion":
                    img = torch.where(chosen, baseline_images[i], x[i])
                else:
                    img = torch.where(chosen, x[i], baseline_images[i])
                row.append(float(model(img[None]).softmax(dim=1)[0, t]))
            curves.append(row)
    curves = torch.tensor(curves, dtype=torch.float64)
    auc = torch.tensor(
        [sum((r[j] + r[j + 1]) / 2 / steps for j in range(steps)) for r in curves.tolist()]
    )
    return curves, auc


def naive_baseline(x, baseline):
    if isinstance(baseline, torch.Tensor):
        return torch.broadcast_to(baseline, x.shape)
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    return make_baseline(x, "blur")  # checked against torchvision in test_blur_matches_torchvision


# --------------------------------------------------------------------------- batched == naive
@pytest.mark.parametrize("kind", ["deletion", "insertion"])
@pytest.mark.parametrize(
    ("baseline", "max_batch", "steps"),
    [
        ("zero", 5, 7),  # 12*13 = 156 pixels, 156/7 not whole; batches split curves (8 points)
        ("mean", 3, 5),
        ("blur", None, 7),
        ("tensor", 1, 11),
        ("zero", 64, 1),
    ],
)
def test_batched_matches_naive_loop(kind, baseline, max_batch, steps):
    model = tiny_cnn()
    x = images(4, 12, 13)
    # quantized scores: many ties, so the stable tie order is checked too
    attr = torch.randint(0, 5, (4, 1, 12, 13), generator=torch.Generator().manual_seed(1)).float()
    base = torch.tensor([0.2, 0.5, 0.9])[:, None, None] if baseline == "tensor" else baseline
    target = None if kind == "deletion" else torch.tensor([0, 1, 2, 1])
    fn = deletion_curve if kind == "deletion" else insertion_curve
    curves, auc = fn(model, x, target, attr, steps=steps, baseline=base, max_batch=max_batch)
    ref_curves, ref_auc = naive_curves(model, x, target, attr, steps, naive_baseline(x, base), kind)
    assert curves.shape == (4, steps + 1) and auc.shape == (4,)
    torch.testing.assert_close(curves.double(), ref_curves, atol=1e-5, rtol=0)
    torch.testing.assert_close(auc.double(), ref_auc.double(), atol=1e-5, rtol=0)


class CountingModel(nn.Module):
    """Counts the images it is given (to check which perturbations are evaluated)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize(("max_batch", "steps", "target"), [(3, 5, None), (7, 4, 1), (64, 1, None)])
def test_curve_set_equals_separate_curves_and_shares_endpoints(max_batch, steps, target):
    model = CountingModel(tiny_cnn())
    x = images(5, 12, 13)
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(3 * 5, 1, 12, 13, generator=gen)  # three maps per image
    out = curve_set(
        model, x, target, maps, ("deletion", "insertion"), steps, "blur", max_batch=max_batch
    )
    # the unperturbed and all-baseline image once per input, the inner steps per map and kind
    assert model.seen == 2 * 5 + 3 * 5 * 2 * (steps - 1)
    for kind, fn in (("deletion", deletion_curve), ("insertion", insertion_curve)):
        curves, auc = out[kind]
        ref, ref_auc = fn(
            model, x.repeat(3, 1, 1, 1), target, maps, steps, "blur", max_batch=max_batch
        )
        torch.testing.assert_close(curves, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(auc, ref_auc, atol=1e-6, rtol=0)


def test_curve_set_errors():
    model, x = tiny_cnn(), images(2, 8, 8)
    with pytest.raises(AttributionError, match=r"R \* 2 rows\); got 3 rows"):
        curve_set(model, x, 0, torch.rand(3, 1, 8, 8))
    with pytest.raises(AttributionError, match=r"kinds must be distinct names"):
        curve_set(model, x, 0, torch.rand(2, 1, 8, 8), ("deletion", "deletion"))
    with pytest.raises(AttributionError, match=r"kinds must be distinct names"):
        curve_set(model, x, 0, torch.rand(2, 1, 8, 8), ("removal",))


def test_channel_maps_are_summed():
    model = tiny_cnn()
    x = images(2, 10, 10)
    attr = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    _, a = deletion_curve(model, x, 0, attr, steps=4)
    _, b = deletion_curve(model, x, 0, attr.sum(dim=1, keepdim=True), steps=4)
    torch.testing.assert_close(a, b)


def test_blur_matches_torchvision():
    x = images(2, 20, 20)
    ours = make_baseline(x, "blur", blur_sigma=1.0)  # kernel 7, radius 3
    ref = TF.gaussian_blur(x, kernel_size=[7, 7], sigma=[1.0, 1.0])  # reflect padding
    torch.testing.assert_close(ours[..., 3:-3, 3:-3], ref[..., 3:-3, 3:-3], atol=1e-6, rtol=0)
    flat = torch.full((1, 3, 6, 6), 0.3)
    torch.testing.assert_close(make_baseline(flat, "blur"), flat)  # large kernel, tiny image


# --------------------------------------------------------------------------- known answers
def test_oracle_ordering_beats_random():
    model = RegionModel(16, 16, slice(4, 8), slice(6, 10))
    x = 0.5 + 0.5 * images(6, 16, 16)
    oracle = model.region.expand(6, 1, 16, 16).clone()
    _, del_oracle = deletion_curve(model, x, 0, oracle, steps=16)
    _, del_random = random_reference(model, x, 0, steps=16, repeats=4)
    _, ins_oracle = insertion_curve(model, x, 0, oracle, steps=16)
    _, ins_random = random_reference(model, x, 0, kind="insertion", steps=16, repeats=4)
    assert (del_oracle + 0.3 < del_random).all(), (del_oracle, del_random)
    assert (ins_oracle > ins_random + 0.2).all(), (ins_oracle, ins_random)
    # the oracle removes the 16-pixel region in the first of 16 steps: the curve then stays flat
    curves, _ = deletion_curve(model, x, 0, oracle, steps=16)
    torch.testing.assert_close(
        curves[:, 1:], torch.full_like(curves[:, 1:], 1 / (1 + math.exp(2.0)))
    )


def test_random_reference_is_seeded_and_private():
    model = tiny_cnn()
    x = images(3, 8, 8)
    state = torch.get_rng_state()
    a = random_reference(model, x, steps=4, seed=7)
    b = random_reference(model, x, steps=4, seed=7)
    c = random_reference(model, x, steps=4, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], c[0])
    r = random_attribution(x, seed=7, repeats=2)
    assert r.shape == (6, 1, 8, 8)
    # the mean over repeats equals the mean of single-ranking curves
    multi, _ = random_reference(model, x, steps=4, seed=7, repeats=2)
    singles = (
        deletion_curve(model, x.repeat(2, 1, 1, 1), None, r, steps=4)[0].view(2, 3, -1).mean(0)
    )
    torch.testing.assert_close(multi, singles)


def test_predicted_class_is_the_default_target():
    model = tiny_cnn(classes=3)
    x = images(4, 8, 8)
    attr = torch.rand(4, 1, 8, 8)
    pred = model(x).argmax(dim=1)
    for fn in (deletion_curve, insertion_curve):
        a = fn(model, x, None, attr, steps=3)[0]
        b = fn(model, x, pred, attr, steps=3)[0]
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- laws
@FAST
@given(
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    steps=st.integers(1, 12),
    baseline=st.sampled_from(BASELINES),
    max_batch=st.sampled_from([1, 4, 7, None]),
    seed=st.integers(0, 1000),
)
def test_curve_endpoints_and_auc_range(h, w, steps, baseline, max_batch, seed):
    model = tiny_cnn(seed % 3)
    x = images(3, h, w, seed)
    attr = torch.randn(3, 1, h, w, generator=torch.Generator().manual_seed(seed + 1))
    target = torch.tensor([0, 1, 2])
    base = torch.broadcast_to(make_baseline(x, baseline), x.shape)
    with torch.no_grad():
        p_image = model(x).softmax(dim=1).gather(1, target[:, None])[:, 0]
        p_base = model(base).softmax(dim=1).gather(1, target[:, None])[:, 0]
    d, d_auc = deletion_curve(
        model, x, target, attr, steps=steps, baseline=baseline, max_batch=max_batch
    )
    i, i_auc = insertion_curve(
        model, x, target, attr, steps=steps, baseline=baseline, max_batch=max_batch
    )
    for curve, first, last in ((d, p_image, p_base), (i, p_base, p_image)):
        torch.testing.assert_close(curve[:, 0], first, atol=1e-6, rtol=0)
        torch.testing.assert_close(curve[:, -1], last, atol=1e-6, rtol=0)
    for curves, auc in ((d, d_auc), (i, i_auc)):
        assert (
            (auc >= curves.min(dim=1).values - 1e-6) & (auc <= curves.max(dim=1).values + 1e-6)
        ).all()
        assert ((auc >= 0) & (auc <= 1)).all()
        torch.testing.assert_close(auc, curve_auc(curves))


# --------------------------------------------------------------------------- model state
def test_model_state_restored_and_eval_mode_used():
    model = tiny_cnn()
    model.train()
    model.fc.weight.requires_grad_(False)
    model.features[0].weight.grad = torch.ones_like(model.features[0].weight)
    grad_obj = model.features[0].weight.grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(3, 8, 8)
    with torch.no_grad():
        curves, _ = deletion_curve(model, x, None, torch.rand(3, 1, 8, 8), steps=2)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    deletion_curve(model, x, None, torch.rand(3, 1, 8, 8), steps=2)
    assert torch.is_grad_enabled()
    assert all(m.training for m in model.modules())
    assert not model.fc.weight.requires_grad and model.features[0].weight.requires_grad
    assert model.features[0].weight.grad is grad_obj and model.fc.bias.grad is None
    assert hook_count(model) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics untouched
    model.eval()
    with torch.no_grad():
        expected = model(x).softmax(dim=1).max(dim=1).values
    torch.testing.assert_close(curves[:, 0], expected)


def test_works_under_inference_mode():
    model = tiny_cnn()
    x = images(2, 8, 8)
    attr = torch.rand(2, 1, 8, 8)
    ref = deletion_curve(model, x, None, attr, steps=4, baseline="blur")[1]
    with torch.inference_mode():
        xi, ai = x.clone(), attr.clone()
        curves, auc = deletion_curve(model, xi, None, ai, steps=4, baseline="blur")
        ins = insertion_curve(model, xi, None, ai, steps=4)[1]
        rand = random_reference(model, xi, steps=4)[1]
    assert not curves.is_inference() and not auc.is_inference()
    torch.testing.assert_close(auc, ref)
    assert ins.shape == rand.shape == (2,)


def test_inputs_not_modified():
    model = tiny_cnn()
    x = images(2, 8, 8)
    attr = torch.rand(2, 1, 8, 8)
    x0, a0 = x.clone(), attr.clone()
    insertion_curve(model, x, None, attr, steps=3, baseline="mean")
    assert torch.equal(x, x0) and torch.equal(attr, a0)


# --------------------------------------------------------------------------- errors
class NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], 2)
        out[x.mean(dim=(1, 2, 3)) < 0.01] = float("nan")  # NaN on the all-zero baseline
        return out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"attribution": torch.rand(2, 1, 8, 7)},
            r"attribution must be \[N, 1, H, W\] = \[2, 1, 8, 8\].*\(2, 1, 8, 7\)",
        ),
        ({"attribution": torch.rand(2, 8, 8)}, r"add the channel dimension"),
        (
            {"attribution": torch.full((2, 1, 8, 8), float("nan"))},
            r"NaN or Inf in row\(s\) \[0, 1\]",
        ),
        ({"target": 5}, r"target 5 .*2 outputs"),
        ({"target": torch.tensor([0, 1, 1])}, r"one class index per input \(2\)"),
        ({"target": 0.5}, r"integers"),
        (
            {"baseline": "black"},
            r"unknown baseline 'black'; choose one of \['zero', 'mean', 'blur'\]",
        ),
        ({"baseline": torch.zeros(4, 3, 8, 8)}, r"does not broadcast"),
        ({"baseline": "blur", "blur_sigma": 0}, r"blur_sigma must be a positive number.*0"),
        ({"steps": 0}, r"steps must be a positive integer .*got 0"),
        ({"steps": 2.5}, r"steps must be a positive integer .*got 2.5"),
        ({"max_batch": 0}, r"max_batch must be a positive integer.*got 0"),
    ],
)
def test_errors_name_the_value(kwargs, match):
    args = {
        "model": tiny_cnn(classes=2),
        "inputs": images(2, 8, 8),
        "target": None,
        "attribution": torch.rand(2, 1, 8, 8),
    }
    args.update(kwargs)
    with pytest.raises(AttributionError, match=match):
        deletion_curve(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"attribution": torch.full((2, 1, 8, 8), float("nan"))},
            r"NaN or Inf in row\(s\) \[0, 1\]",
        ),
        ({"target": torch.tensor([0, 5])}, r"target 5 .*2 outputs"),
        ({"model": NaNModel(), "target": 0}, r"NaN or Inf for image 0 at deletion step 4 of 4"),
    ],
)
def test_cuda_checks_after_the_loop_raise_the_same_errors(kwargs, match):
    """On a GPU the map, the targets and the logits are checked after the loop (one sync)."""
    args = {
        "model": tiny_cnn(classes=2),
        "inputs": images(2, 8, 8),
        "target": None,
        "attribution": torch.rand(2, 1, 8, 8),
        "steps": 4,
    }
    args.update(kwargs)
    args = {k: v.cuda() if isinstance(v, (torch.Tensor, nn.Module)) else v for k, v in args.items()}
    with pytest.raises(AttributionError, match=match):
        deletion_curve(**args)


def test_nan_output_names_image_and_step():
    x = images(2, 8, 8)
    with pytest.raises(AttributionError, match=r"NaN or Inf for image 0 at deletion step 4 of 4"):
        deletion_curve(NaNModel(), x, 0, torch.rand(2, 1, 8, 8), steps=4)
    with pytest.raises(AttributionError, match=r"NaN or Inf for image 0 at insertion step 0 of 4"):
        insertion_curve(NaNModel(), x, 0, torch.rand(2, 1, 8, 8), steps=4)


def test_random_reference_errors():
    model = tiny_cnn()
    with pytest.raises(
        AttributionError,
        match=r"kind must be one of \['deletion', 'insertion', 'lerf'\]; got 'del'",
    ):
        random_reference(model, images(2, 8, 8), kind="del")
    with pytest.raises(AttributionError, match=r"repeats must be a positive integer; got 0"):
        random_reference(model, images(2, 8, 8), repeats=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = tiny_cnn()
    x = images(5, 16, 16)
    attr = torch.rand(5, 1, 16, 16)
    for baseline in BASELINES:
        ref_curves, ref_auc = deletion_curve(
            model, x, None, attr, steps=9, baseline=baseline, max_batch=7
        )
        curves, auc = deletion_curve(
            model.cuda(), x, None, attr, steps=9, baseline=baseline, max_batch=7
        )
        model.cpu()
        assert curves.is_cuda
        torch.testing.assert_close(auc.cpu(), ref_auc, atol=1e-5, rtol=0)
        torch.testing.assert_close(curves.cpu(), ref_curves, atol=1e-5, rtol=0)


# =========================================================================== localization
def square_mask(n: int, h: int, w: int, rows: slice, cols: slice) -> torch.Tensor:
    m = torch.zeros(n, 1, h, w, dtype=torch.bool)
    m[..., rows, cols] = True
    return m


def test_relevance_mass_known_values():
    mask = square_mask(1, 8, 8, slice(2, 4), slice(2, 4))
    inside = torch.zeros(1, 1, 8, 8)
    inside[..., 2:4, 2:4] = torch.rand(2, 2) + 0.1
    inside[..., 6, 6] = -5.0  # negative relevance outside is ignored
    assert relevance_mass(inside, mask).item() == pytest.approx(1.0)
    half = torch.zeros(1, 1, 8, 8)
    half[..., 2, 2] = 1.0
    half[..., 7, 7] = 1.0
    assert relevance_mass(half, mask).item() == pytest.approx(0.5)
    assert relevance_mass(-inside.abs(), mask).isnan().all()  # no positive relevance: NaN


def test_relevance_rank_and_pointing_game_known_values():
    mask = square_mask(1, 6, 6, slice(0, 2), slice(0, 2))  # 4 pixels
    a = torch.zeros(1, 1, 6, 6)
    a[0, 0, 0, 0], a[0, 0, 0, 1], a[0, 0, 1, 0] = 4.0, 3.0, 2.0
    a[0, 0, 5, 5] = 2.5  # the 4th highest lies outside
    assert relevance_rank(a, mask).item() == pytest.approx(0.75)
    assert pointing_game(a, mask).item() == 1.0
    a[0, 0, 5, 5] = 10.0
    assert pointing_game(a, mask).item() == 0.0
    # constant map: every pixel tied, expected share = mask area
    const = torch.ones(1, 1, 6, 6)
    assert relevance_rank(const, mask).item() == pytest.approx(4 / 36)
    assert pointing_game(const, mask).item() == pytest.approx(4 / 36)
    # two tied maxima, one on the object
    t = torch.zeros(1, 1, 6, 6)
    t[0, 0, 1, 1] = t[0, 0, 4, 4] = 1.0
    assert pointing_game(t, mask).item() == pytest.approx(0.5)


def test_pointing_game_tolerance_is_euclidean():
    mask = square_mask(1, 12, 12, slice(0, 2), slice(0, 2))
    a = torch.zeros(1, 1, 12, 12)
    a[0, 0, 4, 4] = 1.0  # distance to (1, 1): sqrt(18) = 4.24
    assert pointing_game(a, mask, tolerance=4).item() == 0.0
    assert pointing_game(a, mask, tolerance=5).item() == 1.0
    b = torch.zeros(1, 1, 12, 12)
    b[0, 0, 1, 4] = 1.0  # distance 3 straight right
    assert [pointing_game(b, mask, tolerance=t).item() for t in (2, 3)] == [0.0, 1.0]


@FAST
@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-3, 1e3),
    h=st.integers(2, 12),
    w=st.integers(2, 12),
)
def test_localization_laws(seed, scale, h, w):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(4, 1, h, w, generator=g) < 0.3
    mask[:, 0, 0, 0] = True  # never empty
    a = torch.randn(4, 1, h, w, generator=g)
    a[:, 0, 0, 0] = 1.0  # some positive relevance
    mass = relevance_mass(a, mask)
    assert ((mass >= 0) & (mass <= 1)).all()
    torch.testing.assert_close(relevance_mass(a * scale, mask), mass, atol=1e-5, rtol=0)
    torch.testing.assert_close(relevance_rank(mask.float(), mask), torch.ones(4))
    torch.testing.assert_close(relevance_mass(mask.float(), mask), torch.ones(4))
    rank = relevance_rank(a, mask)
    assert ((rank >= 0) & (rank <= 1)).all()
    torch.testing.assert_close(relevance_rank(a * scale, mask), rank)
    pg = pointing_game(a, mask, tolerance=seed % 3)
    assert ((pg >= 0) & (pg <= 1)).all()


@pytest.mark.parametrize("fn", [relevance_mass, relevance_rank, pointing_game])
def test_localization_errors(fn):
    a = torch.rand(2, 1, 6, 6)
    mask = square_mask(2, 6, 6, slice(0, 2), slice(0, 2))
    with pytest.raises(
        AttributionError, match=r"mask must be \[N, 1, H, W\] = \[2, 1, 6, 6\].*\(2, 1, 6, 5\)"
    ):
        fn(a, mask[..., :5])
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(AttributionError, match=r"mask is empty .* row\(s\) \[1\]"):
        fn(a, empty)
    with pytest.raises(AttributionError, match=r"only 0 and 1"):
        fn(a, mask.float() * 0.5)
    with pytest.raises(AttributionError, match=r"NaN or Inf"):
        fn(torch.full((2, 1, 6, 6), float("inf")), mask)
    assert fn(a, mask.float()).shape == (2,)  # 0/1 float masks are accepted


def test_pointing_game_rejects_bad_tolerance():
    a = torch.rand(1, 1, 4, 4)
    mask = square_mask(1, 4, 4, slice(0, 2), slice(0, 2))
    for bad in (-1, 1.5, True):
        with pytest.raises(AttributionError, match=r"tolerance must be a non-negative integer"):
            pointing_game(a, mask, tolerance=bad)


# --------------------------------------------------------------------------- with the explainers
def _explain():
    try:
        return importlib.import_module("audit.methods").explain
    except (ImportError, AttributeError):
        return None


@pytest.mark.skipif(_explain() is None, reason="audit.methods.explain is not available yet")
def test_saliency_on_region_model_beats_random():
    explain = _explain()
    model = RegionModel(16, 16, slice(4, 8), slice(6, 10))
    x = 0.5 + 0.5 * images(4, 16, 16)
    sal = explain("saliency", model, x, 0)
    assert sal.shape == (4, 1, 16, 16) and hook_count(model) == 0
    _, ours = deletion_curve(model, x, 0, sal, steps=16)
    _, chance = random_reference(model, x, 0, steps=16, repeats=4)
    assert (ours + 0.3 < chance).all(), (ours, chance)
    cam = explain("gradcam", tiny_cnn(), images(4, 16, 16))
    curves, auc = insertion_curve(tiny_cnn(), images(4, 16, 16), None, cam, steps=8)
    assert curves.shape == (4, 9) and auc.shape == (4,)
