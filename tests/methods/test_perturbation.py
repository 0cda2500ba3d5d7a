"""Occlusion, RISE and LIME: known answers on a model that reads one rectangle, seeds, memory, errors.

The generic contract (state restored, no_grad/inference_mode, max_batch, target and NaN
errors) runs for these methods in tests/methods/test_methods.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from audit.engine.model import AttributionError, hook_count
from audit.methods import METHODS, explain
from audit.models import SmallCNN

SIZE = 32
REGION = (slice(8, 16), slice(16, 28))  # rows 8..15, columns 16..27 of a 32 x 32 image


class RegionMean(nn.Module):
    """Logits ``[l, -l]``, ``l = scale * (m - offset)``, ``m`` the mean of the input over REGION (all channels)."""

    def __init__(self, scale: float = 1.0, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset
        self.scale = nn.Parameter(torch.tensor(float(scale)))  # a parameter: the model has a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3))
        logit = self.scale * (m - self.offset)
        return torch.stack([logit, -logit], dim=1)


def bright(n: int = 2, seed: int = 0) -> torch.Tensor:
    """Images in [0.75, 1]: every pixel is brighter than the 0.5 baseline."""
    g = torch.Generator().manual_seed(seed)
    return 0.75 + 0.25 * torch.rand(n, 3, SIZE, SIZE, generator=g)


def region_mask() -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[REGION] = True
    return mask


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=3, widths=(4, 8, 8)).eval()


def images(n: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ occlusion
def _occlusion_by_hand(x: torch.Tensor, k: int, s: int, baseline: float) -> torch.Tensor:
    """Mean over the windows covering each pixel of the drop of m (windows clipped at the border)."""
    region = region_mask()
    total = torch.zeros(SIZE, SIZE, dtype=torch.float64)
    count = torch.zeros(SIZE, SIZE, dtype=torch.float64)
    starts = [i * s for i in range(math.ceil((SIZE - k) / s) + 1)]
    area = 3 * int(region.sum())
    for y in starts:
        for x0 in starts:
            win = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            win[y : y + k, x0 : x0 + k] = True
            drop = ((x.double() - baseline) * (win & region)).sum() / area
            total[win] += drop
            count[win] += 1
    return (total / count).float()


@pytest.mark.parametrize(("k", "s"), [(4, 4), (6, 4), (5, 3)])
def test_occlusion_equals_the_hand_computed_mean_drop(k: int, s: int) -> None:
    x = bright(2)
    got = explain("occlusion", RegionMean(), x, 0, window=k, stride=s, baseline=0.5)
    for i in range(2):
        expected = _occlusion_by_hand(x[i], k, s, 0.5)
        torch.testing.assert_close(got[i, 0], expected, rtol=1e-5, atol=1e-7)
        # nonzero exactly where a window that overlaps the region covers the pixel
        starts = [j * s for j in range(math.ceil((SIZE - k) / s) + 1)]
        touched = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        for y in starts:
            for x0 in starts:
                if region_mask()[y : y + k, x0 : x0 + k].any():
                    touched[y : y + k, x0 : x0 + k] = True
        assert torch.equal(got[i, 0] > 0, touched)
        assert bool((got[i, 0][~touched] == 0).all())


def test_occlusion_target_sign_and_default_window() -> None:
    x = bright(1)
    up = explain("occlusion", RegionMean(), x, 0, window=4, stride=4)
    down = explain("occlusion", RegionMean(), x, 1, window=4, stride=4)
    torch.testing.assert_close(down, -up)
    # default: an eighth of the side (4 px here), stride half of it
    torch.testing.assert_close(
        explain("occlusion", RegionMean(), x, 0),
        explain("occlusion", RegionMean(), x, 0, window=4, stride=2),
    )


# ------------------------------------------------------------------ RISE
@pytest.mark.parametrize("score", ["probability", "logit"])
def test_rise_is_clearly_higher_inside_the_region(score: str) -> None:
    """White image, black baseline: m is the kept share of the region, logit 4 (m - 1/2)."""
    x = torch.ones(1, 3, SIZE, SIZE)
    model = RegionMean(scale=4.0, offset=0.5)
    sal = explain("rise", model, x, 0, n_masks=1000, cell=8, baseline=0.0, score=score)[0, 0]
    region = region_mask()
    far = torch.ones(SIZE, SIZE, dtype=torch.bool)  # beyond a cell (the masks' correlation length)
    far[0:26, 6:32] = False
    inside, outside = sal[region], sal[far]
    # away from the region a pixel's mask says nothing about the score: the map is E[score],
    # which is 1/2 for the probability (sigmoid(8 (m - 1/2)), m symmetric about 1/2) and 0 for
    # the logit. Measured (seed 0): inside 0.69 / 0.62 on average, outside 0.49 / -0.02
    expected_outside, margin = (0.5, 0.1) if score == "probability" else (0.0, 0.3)
    assert abs(float(outside.mean()) - expected_outside) < 0.05
    assert float(inside.mean() - outside.mean()) > margin
    assert float(inside.min()) > float(outside.max())


def test_rise_seeded_independent_of_chunking_and_leaves_the_global_rng() -> None:
    m, x = small_cnn(), images(3)
    state = torch.random.get_rng_state()
    a = explain("rise", m, x, 1, n_masks=40, seed=3)
    b = explain("rise", m, x, 1, n_masks=40, seed=3, max_batch=7)  # 2 masks x 3 images per pass
    c = explain("rise", m, x, 1, n_masks=40, seed=3, max_batch=2)  # image chunks of 2, 1 mask
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a, explain("rise", m, x, 1, n_masks=40, seed=4))
    assert bool((a >= 0).all()) and bool(torch.isfinite(a).all())


def test_rise_more_masks_than_a_draw_block_and_row_independence() -> None:
    m, x = small_cnn(), images(2)
    a = explain("rise", m, x, 0, n_masks=300, max_batch=64)  # blocks of 256 draws, passes of 32
    b = explain("rise", m, x, 0, n_masks=300)
    torch.testing.assert_close(a, b)
    # each image sees the same masks: an image's map does not depend on the others
    torch.testing.assert_close(explain("rise", m, x[1:], 0, n_masks=300), a[1:])


# ------------------------------------------------------------------ LIME
def _grid_segments() -> torch.Tensor:
    """4 x 4 cells of 8 px; REGION covers cell (1, 2) and the left half of cell (1, 3)."""
    rows = torch.arange(SIZE) // 8
    return rows[:, None] * 4 + rows[None, :]


def _lime_by_hand(x: torch.Tensor, labels: torch.Tensor, baseline: float) -> torch.Tensor:
    """The exact linear model: a superpixel's coefficient is its share of m's rise over the baseline."""
    region = region_mask()
    area = 3 * int(region.sum())
    out = torch.zeros(SIZE, SIZE)
    for k in labels.unique():
        cell = labels == k
        out[cell] = float(((x.double() - baseline) * (cell & region)).sum() / area)
    return out


def test_lime_recovers_the_exact_linear_model() -> None:
    x = bright(2)
    labels = _grid_segments()
    got = explain("lime", RegionMean(), x, 0, segments=labels, n_samples=64, alpha=0.0)
    for i in range(2):
        torch.testing.assert_close(
            got[i, 0], _lime_by_hand(x[i], labels, 0.5), rtol=1e-4, atol=1e-6
        )


def test_lime_default_ridge_and_grid_segmentation() -> None:
    x = bright(1)
    got = explain("lime", RegionMean(), x, 0, segments=16, segmentation="grid", n_samples=200)[0, 0]
    expected = _lime_by_hand(x[0], _grid_segments(), 0.5)
    inside = expected > 0
    assert int(inside.sum()) == 2 * 64  # two 8 x 8 cells hold the region
    # the ridge penalty shrinks the weights a little; outside they stay about 0
    assert bool((got[inside] > 0.8 * expected[inside]).all())
    assert float(got[~inside].abs().max()) < 0.02 * float(expected.max())


def test_lime_slic_superpixels_follow_the_region() -> None:
    """SLIC on a dark image with a bright rectangle: the rectangle's superpixels carry the weight."""
    x = torch.full((1, 3, SIZE, SIZE), 0.1)
    x[:, :, REGION[0], REGION[1]] = torch.tensor([0.9, 0.8, 0.2])[:, None, None]
    got = explain("lime", RegionMean(), x, 0, segments=12, n_samples=200, baseline=0.0)[0, 0]
    region = region_mask()
    assert bool((got[region] > 0).all())
    assert float(got[~region].abs().max()) < 0.02 * float(got[region].min())


def test_lime_seeded_and_independent_of_chunking() -> None:
    m, x = small_cnn(), images(3)
    opts = {"n_samples": 30, "segments": 9, "segmentation": "grid", "seed": 5}
    state = torch.random.get_rng_state()
    a = explain("lime", m, x, 2, **opts)
    torch.testing.assert_close(a, explain("lime", m, x, 2, max_batch=4, **opts))
    torch.testing.assert_close(a, explain("lime", m, x, 2, max_batch=2, **opts))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.allclose(a, explain("lime", m, x, 2, **{**opts, "seed": 6}))
    assert bool(torch.isfinite(a).all())
    # maps are constant on each superpixel: at most 9 distinct values per image
    assert all(len(a[i].unique()) <= 9 for i in range(3))


# ------------------------------------------------------------------ against captum
def _trained_like_cnn() -> SmallCNN:
    """SmallCNN with spread-out BatchNorm statistics: logits that vary with the input."""
    m = small_cnn()
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 0.1 + 0.01)
    return m


def test_occlusion_equals_captum_occlusion_with_argmax_target() -> None:
    from captum.attr import Occlusion

    m, x = _trained_like_cnn(), images(3)
    with torch.no_grad():
        argmax = m(x).argmax(dim=1)
    ref = Occlusion(m).attribute(
        x, sliding_window_shapes=(3, 5, 5), strides=(3, 3, 3), baselines=0.25, target=argmax
    )
    got = explain("occlusion", m, x, None, window=5, stride=3, baseline=0.25)
    assert got.abs().max() > 1e-3
    torch.testing.assert_close(got, ref[:, :1])
    torch.testing.assert_close(ref[:, 1:], ref[:, :1].expand(-1, 2, -1, -1))  # channels alike


def test_lime_equals_captum_lime_on_the_same_samples() -> None:
    """captum's Lime fed our on/off samples, our kernel and a ridge surrogate gives our map."""
    pytest.importorskip("sklearn")  # captum's SkLearnRidge
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    from audit.methods.perturbation import _samples

    m, x = _trained_like_cnn(), images(1)
    rows = torch.arange(16) // 4
    labels = rows[:, None] * 4 + rows[None, :]
    n, k, width = 40, 16, 0.25
    ours = explain("lime", m, x, 2, segments=labels, n_samples=n, seed=3)
    z = _samples(n, k, torch.Generator().manual_seed(3))  # the draws lime makes for one image

    def perturb(_inputs: torch.Tensor, **_kw: object):
        for row in z:
            yield row[None].long()

    def similarity(_orig: object, _pert: object, sample: torch.Tensor, **_kw: object) -> float:
        d = 1.0 - math.sqrt(float(sample.sum()) / k)
        return math.exp(-d * d / (2 * width**2))

    lime = Lime(
        m,
        interpretable_model=SkLearnRidge(alpha=1.0),
        similarity_func=similarity,
        perturb_func=perturb,
    )
    ref = lime.attribute(
        x,
        target=2,
        feature_mask=labels.expand(1, 3, 16, 16),
        baselines=0.5,
        n_samples=n,
        perturbations_per_eval=8,
    )
    scale = float(ours.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(ours, ref[:, :1], rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------ memory
@pytest.mark.parametrize(
    ("method", "opts", "work"),
    [
        ("occlusion", {"window": 4, "stride": 4}, 16),
        ("rise", {"n_masks": 20}, 20),
        ("lime", {"n_samples": 20, "segments": 4, "segmentation": "grid"}, 20),
    ],
)
def test_passes_never_exceed_max_batch_or_the_budget(method: str, opts: dict, work: int) -> None:
    from audit.methods._common import activation_bytes

    m, x = small_cnn(), images(3)
    rows: list[int] = []
    handle = m.register_forward_pre_hook(lambda _m, inp: rows.append(inp[0].shape[0]))
    try:
        explain(method, m, x, 0, max_batch=5, **opts)
        assert max(rows) <= 5 and sum(rows) >= 3 * work
        rows.clear()
        explain(method, m, x, 0, **opts)  # small model, default budget: all in one pass
        assert max(rows) == 3 * work
        rows.clear()
        cost = activation_bytes(m, x)
        explain(method, m, x, 0, memory_budget=7 * cost, **opts)
        assert max(rows) <= 7
    finally:
        handle.remove()
    assert hook_count(m) == 0


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("method", "opts", "needle"),
    [
        ("occlusion", {"window": 17}, r"window 17x17 is larger than the 16x16 image"),
        ("occlusion", {"window": (4, 0)}, r"window must be a positive integer"),
        ("occlusion", {"window": 4, "stride": 6}, r"stride 6x6 is larger than the window 4x4"),
        (
            "occlusion",
            {"baseline": torch.zeros(2, 16, 16)},
            r"baseline of shape \(2, 16, 16\) does not broadcast",
        ),
        ("occlusion", {"baseline": "grey"}, r"baseline must be a number"),
        ("rise", {"n_masks": 0}, r"n_masks must be a positive integer"),
        ("rise", {"p": 1.0}, r"p must be a probability strictly between 0 and 1"),
        ("rise", {"p": 0}, r"p must be a probability"),
        ("rise", {"cell": 32}, r"cell 32x32 is larger than the 16x16 image"),
        (
            "rise",
            {"score": "softmax"},
            r"unknown score 'softmax'; choose one of probability, logit",
        ),
        ("rise", {"seed": 1.5}, r"seed must be an integer"),
        ("lime", {"n_samples": -1}, r"n_samples must be a positive integer"),
        ("lime", {"segments": 0}, r"segments must be a positive integer"),
        ("lime", {"segments": 300}, r"segments 300 exceeds the 16x16 = 256 pixels"),
        (
            "lime",
            {"segments": torch.zeros(8, 8, dtype=torch.long)},
            r"labels \[H, W\] or \[N, H, W\]",
        ),
        ("lime", {"segments": torch.zeros(16, 16)}, r"integer labels; got dtype torch.float32"),
        (
            "lime",
            {"segmentation": "quickshift"},
            r"unknown segmentation 'quickshift'; choose one of slic, grid",
        ),
        ("lime", {"kernel_width": 0}, r"kernel_width must be a positive number"),
        ("lime", {"alpha": -1.0}, r"alpha must be a number >= 0"),
    ],
)
def test_bad_options_raise_one_clear_error(method: str, opts: dict, needle: str) -> None:
    with pytest.raises(AttributionError, match=needle):
        explain(method, small_cnn(), images(2), **opts)


def test_nan_under_the_baseline_is_reported() -> None:
    """A model that is finite on the images but NaN on the perturbed ones: the error says so."""

    class NanOnBright(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(x.mean(dim=(2, 3)))
            bright = x.amax(dim=(1, 2, 3)) > 0.45  # the images stay below 0.4, the baseline is 0.5
            return torch.where(bright[:, None], torch.full_like(out, float("nan")), out)

    x = images(2) * 0.4
    cases = (
        ("occlusion", {"window": 4}, "occluded"),
        ("rise", {"n_masks": 4}, "masked"),
        ("lime", {"n_samples": 4, "segments": 4, "segmentation": "grid"}, "perturbed"),
    )
    for method, opts, what in cases:
        with pytest.raises(AttributionError, match=rf"NaN or Inf for a {what} image"):
            explain(method, NanOnBright(), x, 0, **opts)


def test_registered() -> None:
    assert {"occlusion", "rise", "lime"} <= set(METHODS)
