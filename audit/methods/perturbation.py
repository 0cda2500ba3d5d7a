"""Perturbation explainers: occlusion, RISE and LIME. Forward passes only, no gradients.

All three change parts of the image to a baseline and watch the target class's score:

* ``occlusion`` (Zeiler & Fergus 2014) slides a patch of the baseline over the image;
  a pixel's value is the mean drop of the target logit over the windows covering it.
  It reuses captum's ``Occlusion`` (correct, and batched by its
  ``perturbations_per_eval``: the windows of a pass are built as one tensor).
* ``rise`` (Petsiuk et al. 2018) averages random smooth masks weighted by the target
  class's score on the masked image. Our own code: captum has no RISE.
* ``lime`` (Ribeiro et al. 2016) fits a weighted linear model from superpixels being
  on or off to the target logit; a superpixel's coefficient is its value. Our own code
  rather than captum's ``Lime``: captum draws its samples from the global RNG
  (``torch.bernoulli`` without a generator; the project's rule is a private seeded
  generator), builds and scores every sample one by one in Python and fits one image
  at a time, and its default surrogate is scikit-learn's Lasso (scikit-learn is not a
  declared dependency of ours). Here the samples of a pass are one tensor and the
  weighted ridge regression is solved as one least-squares problem per image. Given the
  same samples, kernel and ridge surrogate, the maps equal captum's (tested).

Baseline: the value hidden pixels take, 0.5 (mid grey in display space ``[0, 1]``) by
default for all three: Zeiler & Fergus occlude with a grey square, RISE's reference
code masks ImageNet-normalized images (hidden pixels at zero: the mean colour, about
0.45 in display space), and LIME's hides a superpixel by its mean colour.

Scores: occlusion and LIME use the pre-softmax target logit, as every explainer of the
registry; both are unchanged by adding a constant to the score (a difference of
logits; a regression with an intercept). RISE by default uses the softmax probability
of the target class, as in the paper: its map is a weighted *mean* of masks, which is
meaningful for non-negative bounded weights; with logits a constant offset of the score
(a logit of 10 on a confident image) adds the masks' sampling noise times that offset
(on the tests' region model, logits around 0.5 instead of around 0 gave 1.3-4x the
noise far from the region). ``score="logit"`` is there for models whose softmax saturates.

Randomness: RISE's coarse grids and shifts and LIME's on/off samples come from a
private ``torch.Generator`` seeded with ``seed`` (never the global RNG), on the CPU: the
draws are small (``n_masks x cells`` bits), a seed gives the same masks and samples on
CPU and GPU, and they are drawn in a fixed order, so the maps do not depend on
``max_batch`` or the memory budget. The full-size masks are made on the model's device, one pass's
worth at a time.

Memory: forward passes hold at most the rows the memory budget allows
(:func:`audit.methods._common.rows_per_pass` over all ``N x perturbations`` images; an
explicit ``max_batch`` wins); no pass builds a graph. RISE never holds more than one
pass's masks.

Cost: one forward pass per perturbation and image (occlusion: one per window position,
225 by default; RISE: ``n_masks``; LIME: ``n_samples``, plus SLIC: 10-30 ms per 64 px
image), plus one pass of the clean images for the targets. Measured on a 2-core CPU
with ResNet-18 (``audit.bench.methods``, sections ``captum`` and ``rise``; medians of
per-round ratios on a shared machine): RISE 1.05x the forward passes of its masks alone
(its own work, masks and masking as one ``addcmul``: 30 ms per 256 masks at 64 px);
occlusion 1.10x captum's ``Occlusion`` called directly; LIME 0.98x captum's ``Lime``
with the same superpixels, samples, kernel and surrogate (the forward passes dominate
on a CPU; captum's per-sample Python weighs more on a GPU, not measured here).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import Occlusion
from torch import nn

from audit.engine.model import AttributionError, chunks
from audit.methods._common import TargetLike, Targets, fixed_targets, map_chunks, rows_per_pass
from audit.methods.registry import register

__all__ = ["occlusion", "rise", "lime"]

_SCORES = ("probability", "logit")
_SEGMENTATIONS = ("slic", "grid")


# ------------------------------------------------------------------ shared checks
def _positive_int(value: object, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttributionError(f"{name} must be a positive integer ({hint}); got {value!r}")
    return value


def _pair(value: object, name: str, hint: str) -> tuple[int, int]:
    """An int or a pair of ints (height, width), each >= 1."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _positive_int(value[0], name, hint), _positive_int(value[1], name, hint)
    if isinstance(value, (tuple, list)):
        raise AttributionError(
            f"{name} must be an integer or a pair (height, width) ({hint}); got {value!r}"
        )
    v = _positive_int(value, name, hint)
    return v, v


def _baseline(baseline: object, inputs: torch.Tensor) -> torch.Tensor:
    """The baseline as a tensor broadcast (not copied) to the inputs' shape."""
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(inputs), inputs.shape)
        except RuntimeError:
            raise AttributionError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs "
                f"{tuple(inputs.shape)}; pass a number or a tensor of shape [C, H, W]"
            ) from None
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise AttributionError(f"baseline must be a finite number; got {baseline!r}")
        return torch.full(
            (1, 1, 1, 1), float(baseline), dtype=inputs.dtype, device=inputs.device
        ).expand(inputs.shape)
    raise AttributionError(
        f"baseline must be a number (0.5 is mid grey in display space) or a tensor; "
        f"got {type(baseline).__name__}"
    )


def _passes(n_images: int, per_image: int, limit: int | None) -> Iterator[tuple[slice, int]]:
    """(images of a chunk, perturbations per pass) so that a pass holds at most ``limit`` rows.

    ``limit`` None: all images at once with all their perturbations in one pass.
    """
    if limit is None:
        yield slice(0, n_images), per_image
        return
    for rows in chunks(n_images, limit):
        n = rows.stop - rows.start
        yield rows, max(1, min(per_image, limit // n))


def _check_outputs(ok: torch.Tensor | None, what: str) -> None:
    """Raise if a pass saw NaN or Inf logits (``ok`` is the device flag: one sync at the end)."""
    if ok is not None and not bool(ok):
        raise AttributionError(
            f"model output contains NaN or Inf for a {what}; check the model's weights and "
            "whether it copes with the baseline value (inputs are in [0, 1] display space)"
        )


def _scores(
    model: nn.Module, batch: torch.Tensor, target: torch.Tensor, probability: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target scores ``[rows]`` of a perturbed batch and whether its logits were finite."""
    logits = model(batch)
    if logits.ndim != 2:
        raise AttributionError(
            f"the model must return logits [N, classes]; got shape {tuple(logits.shape)}"
        )
    finite = torch.isfinite(logits).all()
    if probability:
        logits = logits.float().softmax(dim=1)
    return logits.gather(1, target[:, None]).squeeze(1).float(), finite


# ------------------------------------------------------------------ occlusion
@register("occlusion")
def occlusion(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    baseline: float | torch.Tensor = 0.5,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Occlusion (Zeiler & Fergus 2014) via captum: the target logit's drop when a window is hidden.

    Each window position sets all channels of a ``window`` patch to ``baseline`` and
    records ``logit(x) - logit(x occluded)``; a pixel's value is the mean of that drop
    over the windows that cover it (captum's ``Occlusion``). Windows step by
    ``stride`` and the last one in a row or column is clipped at the image border, so
    every pixel is covered.

    Args:
        model: the classifier.
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax of the clean inputs).
        window: patch size in pixels, an int or (height, width); None: an eighth of the
            image's smaller side (8 px at 64 px, 28 px at 224 px).
        stride: step between window positions, at most the window; None: half the
            window (with the default window: 15 x 15 = 225 positions, one forward pass
            each).
        baseline: the patch's value, a number or a tensor broadcastable to ``[C, H, W]``
            (0.5: mid grey in display space).
        max_batch: at most this many images per forward pass; None: as many as the
            memory budget allows (``explain``'s ``memory_budget``).

    Returns:
        Signed maps ``[N, 1, H, W]`` (positive: hiding the pixel lowers the logit).
    """
    c, h, w = inputs.shape[1:]
    if window is None:
        window = max(1, min(h, w) // 8)
    kh, kw = _pair(window, "window", "the occluding patch's size in pixels")
    if kh > h or kw > w:
        raise AttributionError(
            f"window {kh}x{kw} is larger than the {h}x{w} image; pick a window of at most "
            f"{h}x{w} (default: an eighth of the smaller side)"
        )
    if stride is None:
        stride = (max(1, kh // 2), max(1, kw // 2))
    sh, sw = _pair(stride, "stride", "pixels between window positions")
    if (sh > kh and kh < h) or (sw > kw and kw < w):
        raise AttributionError(
            f"stride {sh}x{sw} is larger than the window {kh}x{kw}: pixels between windows "
            "would never be occluded; pick a stride of at most the window"
        )
    base = _baseline(baseline, inputs)
    positions = (math.ceil((h - kh) / sh) + 1) * (math.ceil((w - kw) / sw) + 1)
    limit = rows_per_pass(model, inputs, max_batch, inputs.shape[0] * positions)
    fixed = fixed_targets(model, inputs, target, limit)
    occ = Occlusion(model)

    def one(x: torch.Tensor, _t: Targets, rows: slice) -> torch.Tensor:
        per_pass = positions if limit is None else max(1, limit // x.shape[0])
        with torch.no_grad():
            attr = occ.attribute(
                x,
                sliding_window_shapes=(c, kh, kw),
                strides=(c, sh, sw),
                baselines=base[rows],
                target=fixed[rows],
                perturbations_per_eval=min(per_pass, positions),
            )
        # the window spans all channels: every channel of a pixel holds the same value
        return attr[:, :1].float()

    maps = map_chunks(inputs, None, limit, one)
    # captum does not look at the occluded logits: a NaN there ends up in the maps
    _check_outputs(torch.isfinite(maps).all(), "occluded image")
    return maps


# ------------------------------------------------------------------ RISE
class _MaskDraws:
    """RISE's coarse grids and shifts, drawn from a private CPU generator in blocks of fixed size.

    Blocks of ``_BLOCK`` masks keep memory bounded for any ``n_masks``, and make mask
    ``j`` the same whatever number of masks a pass takes (``take``).
    """

    _BLOCK = 256

    def __init__(self, n: int, grid: tuple[int, int], p: float, cell: tuple[int, int], seed: int):
        self.left = n
        self.grid = grid
        self.p = p
        self.cell = cell
        self.gen = torch.Generator().manual_seed(seed)
        self.bits: list[torch.Tensor] = []
        self.shifts: list[torch.Tensor] = []
        self.buffered = 0

    def take(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``count`` masks: kept cells ``[count, gh, gw]`` (bool) and shifts ``[count, 2]``."""
        while self.buffered < count:
            b = min(self._BLOCK, self.left)
            self.left -= b
            self.bits.append(torch.rand(b, *self.grid, generator=self.gen) < self.p)
            dy = torch.randint(0, self.cell[0], (b,), generator=self.gen)
            dx = torch.randint(0, self.cell[1], (b,), generator=self.gen)
            self.shifts.append(torch.stack([dy, dx], dim=1))
            self.buffered += b
        bits, shifts = torch.cat(self.bits), torch.cat(self.shifts)
        self.bits, self.shifts = [bits[count:]], [shifts[count:]]
        self.buffered -= count
        return bits[:count], shifts[:count]


def _rise_masks(
    bits: torch.Tensor,
    shifts: torch.Tensor,
    cell: tuple[int, int],
    size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Smooth masks ``[b, H, W]``: grids upsampled bilinearly to (grid+1) cells, cropped at the shifts."""
    b, gh, gw = bits.shape
    up = F.interpolate(
        bits.to(device=device, dtype=dtype)[:, None],
        size=((gh + 1) * cell[0], (gw + 1) * cell[1]),
        mode="bilinear",
        align_corners=False,
    )[:, 0]
    shifts = shifts.to(device)
    ys = shifts[:, :1] + torch.arange(size[0], device=device)  # [b, H]
    xs = shifts[:, 1:] + torch.arange(size[1], device=device)  # [b, W]
    return up[torch.arange(b, device=device)[:, None, None], ys[:, :, None], xs[:, None, :]]


@register("rise")
def rise(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    n_masks: int = 1000,
    cell: int | tuple[int, int] | None = None,
    p: float = 0.5,
    baseline: float | torch.Tensor = 0.5,
    score: str = "probability",
    seed: int = 0,
    max_batch: int | None = None,
) -> torch.Tensor:
    """RISE (Petsiuk et al. 2018): random masks averaged with the target score of the masked image as weight.

    Each mask keeps every cell of a coarse grid with probability ``p``; the grid is
    upsampled bilinearly to one cell more than the image on each side and cropped at
    a random shift within one cell, so that the masks are smooth and not aligned to
    the grid. The masked image is ``x * M + baseline * (1 - M)``; the map is
    ``sum_i score_i * M_i / (n_masks * p)``: about the expected score when the pixel
    is kept (the paper's estimator).

    Args:
        model: the classifier.
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax of the clean inputs).
        n_masks: number of random masks, one forward pass per image each (the paper:
            4000 on ResNet-50 at 224 px; the map's noise falls as 1/sqrt(n_masks)).
        cell: size of a grid cell in pixels, an int or (height, width); None: a 7 x 7
            grid on the image (the paper's s = 7; cells of 32 px at 224 px).
        p: probability of keeping a cell, in (0, 1) (the paper: 0.5).
        baseline: the value of hidden pixels, a number or a tensor broadcastable to
            ``[C, H, W]`` (0.5: mid grey).
        score: ``"probability"`` (softmax of the target class, as in the paper) or
            ``"logit"``.
        seed: seed of the private generator of the masks (the global RNG is never used).
        max_batch: at most this many masked images per forward pass; None: as many as
            the memory budget allows (``explain``'s ``memory_budget``).

    Returns:
        Non-negative maps ``[N, 1, H, W]`` for ``score="probability"``.
    """
    h, w = inputs.shape[2:]
    n_masks = _positive_int(n_masks, "n_masks", "random masks, e.g. 1000")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise AttributionError(
            f"p must be a probability strictly between 0 and 1 (of keeping a cell; the paper "
            f"uses 0.5); got {p!r}"
        )
    if score not in _SCORES:
        raise AttributionError(f"unknown score {score!r}; choose one of {', '.join(_SCORES)}")
    if cell is None:
        cell = (math.ceil(h / 7), math.ceil(w / 7))
    ch, cw = _pair(cell, "cell", "the size of a mask's grid cell in pixels")
    if ch > h or cw > w:
        raise AttributionError(
            f"cell {ch}x{cw} is larger than the {h}x{w} image; pick a cell of at most {h}x{w} "
            "(default: a 7 x 7 grid)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AttributionError(f"seed must be an integer; got {seed!r}")
    grid = (math.ceil(h / ch), math.ceil(w / cw))
    base = _baseline(baseline, inputs)
    limit = rows_per_pass(model, inputs, max_batch, inputs.shape[0] * n_masks)
    fixed = fixed_targets(model, inputs, target, limit)
    probability = score == "probability"
    out = torch.zeros(inputs.shape[0], h * w, device=inputs.device, dtype=torch.float32)
    ok: torch.Tensor | None = None
    with torch.no_grad():
        for rows, per_pass in _passes(inputs.shape[0], n_masks, limit):
            b0, t = base[rows, None], fixed[rows]
            diff = inputs[rows, None] - b0  # masked image = b0 + diff * mask: one op per pass
            n = diff.shape[0]
            draws = _MaskDraws(n_masks, grid, float(p), (ch, cw), seed)  # the same masks per chunk
            for masks_rows in chunks(n_masks, per_pass):
                k = masks_rows.stop - masks_rows.start
                bits, shifts = draws.take(k)
                m = _rise_masks(bits, shifts, (ch, cw), (h, w), inputs.device, inputs.dtype)
                mm = m[None, :, None]  # [1, k, 1, H, W]
                batch = torch.addcmul(b0, diff, mm).reshape(n * k, *inputs.shape[1:])
                s, finite = _scores(model, batch, t.repeat_interleave(k), probability)
                ok = finite if ok is None else ok & finite
                out[rows] += s.view(n, k) @ m.reshape(k, h * w).float()
    _check_outputs(ok, "masked image")
    return (out / (n_masks * float(p))).view(-1, 1, h, w)


# ------------------------------------------------------------------ LIME
def _slic(image: torch.Tensor, segments: int) -> np.ndarray:
    """SLIC superpixels (Achanta et al. 2012) of one image ``[C, H, W]`` (labels ``[H, W]``)."""
    from skimage.segmentation import slic  # imported here: scikit-image loads slowly

    arr = image.detach().float().cpu().permute(1, 2, 0).numpy()
    # SLIC's colour distance expects [0, 1]; an image in another range is rescaled first
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return slic(
        arr,
        n_segments=segments,
        compactness=10.0,
        start_label=0,
        channel_axis=-1,
        convert2lab=arr.shape[2] == 3,
    )


def _grid_labels(h: int, w: int, segments: int) -> torch.Tensor:
    """A regular grid of about ``segments`` rectangular cells, in the image's aspect ratio."""
    gh = max(1, min(h, round(math.sqrt(segments * h / w))))
    gw = max(1, min(w, round(segments / gh)))
    rows = torch.arange(h) * gh // h
    cols = torch.arange(w) * gw // w
    return rows[:, None] * gw + cols[None, :]


def superpixel_labels(
    inputs: torch.Tensor, segments: int | torch.Tensor, segmentation: str
) -> list[torch.Tensor]:
    """Per image: superpixel labels ``[H, W]`` numbered 0..K-1 (long, CPU)."""
    n, _, h, w = inputs.shape
    if isinstance(segments, torch.Tensor):
        if segments.is_floating_point() or segments.dtype == torch.bool:
            raise AttributionError(
                f"segments given as a tensor must hold integer labels; got dtype {segments.dtype}"
            )
        if tuple(segments.shape) not in ((h, w), (n, h, w)):
            raise AttributionError(
                f"segments given as a tensor must be labels [H, W] or [N, H, W] = "
                f"[{n}, {h}, {w}]; got shape {tuple(segments.shape)}"
            )
        labels = segments.detach().cpu().long()
        labels = [labels] * n if labels.ndim == 2 else list(labels)
    else:
        count = _positive_int(segments, "segments", "the number of superpixels, or labels [H, W]")
        if count > h * w:
            raise AttributionError(
                f"segments {count} exceeds the {h}x{w} = {h * w} pixels; pick fewer superpixels"
            )
        if segmentation not in _SEGMENTATIONS:
            raise AttributionError(
                f"unknown segmentation {segmentation!r}; choose one of {', '.join(_SEGMENTATIONS)} "
                "or pass labels [H, W] as segments"
            )
        if segmentation == "grid":
            labels = [_grid_labels(h, w, count)] * n
        else:
            labels = [torch.from_numpy(_slic(x, count)).long() for x in inputs]
    # number the labels 0..K-1 (a user's labels, or SLIC's, may skip numbers)
    return [torch.unique(lab, return_inverse=True)[1] for lab in labels]


def _fit(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """Coefficients ``[K]`` of the weighted ridge regression ``y ~ b + z @ coef`` (intercept free).

    Solved as least squares on the rows scaled by sqrt(weight), with sqrt(alpha) * I
    rows appended for the penalty; float64 on the CPU (``gelsd`` copes with a
    rank-deficient design, e.g. alpha 0 and few samples: the minimum-norm solution).
    """
    k = z.shape[1]
    design = torch.cat([torch.ones(z.shape[0], 1, dtype=torch.float64), z.double()], dim=1)
    sw = weights.double().sqrt()[:, None]
    a, rhs = design * sw, y.double()[:, None] * sw
    if alpha > 0:
        penalty = torch.cat([torch.zeros(k, 1), torch.eye(k)], dim=1).double() * math.sqrt(alpha)
        a, rhs = torch.cat([a, penalty]), torch.cat([rhs, torch.zeros(k, 1, dtype=torch.float64)])
    coef = torch.linalg.lstsq(a, rhs, driver="gelsd").solution[:, 0]
    return coef[1:]


@register("lime")
def lime(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    n_samples: int = 500,
    segments: int | torch.Tensor = 50,
    segmentation: str = "slic",
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    baseline: float | torch.Tensor = 0.5,
    seed: int = 0,
    max_batch: int | None = None,
) -> torch.Tensor:
    """LIME (Ribeiro et al. 2016) on superpixels: a weighted linear model of the target logit.

    The first sample is the image itself; the others switch each superpixel on or off
    with probability 1/2 (off: its pixels take ``baseline``). A sample's weight is
    ``exp(-d^2 / (2 kernel_width^2))`` with ``d`` the cosine distance between its on/off
    vector and all-on (as LIME's reference code for images). The surrogate is a ridge
    regression with intercept; a superpixel's coefficient is painted on its pixels.

    Args:
        model: the classifier.
        inputs: ``[N, C, H, W]``.
        target: class indices or None (argmax of the clean inputs).
        n_samples: perturbed images per image, the image itself included; one forward
            pass each.
        segments: about how many superpixels (an int), or the superpixels themselves as
            integer labels ``[H, W]`` (all images) or ``[N, H, W]``.
        segmentation: ``"slic"`` (scikit-image's SLIC in Lab colour: superpixels follow
            the image's edges, so an object and its background fall apart) or
            ``"grid"`` (rectangular cells, the same for every image); unused when
            ``segments`` is a tensor.
        kernel_width: width of the exponential kernel on the cosine distance (LIME's
            default for images: 0.25).
        alpha: ridge penalty of the coefficients (0: plain weighted least squares).
        baseline: the value of the pixels of a switched-off superpixel, a number or a
            tensor broadcastable to ``[C, H, W]`` (0.5: mid grey).
        seed: seed of the private generator of the samples.
        max_batch: at most this many perturbed images per forward pass; None: as many as
            the memory budget allows (``explain``'s ``memory_budget``).

    Returns:
        Signed maps ``[N, 1, H, W]``, constant on each superpixel.
    """
    n_samples = _positive_int(n_samples, "n_samples", "perturbed images per image, e.g. 500")
    if (
        isinstance(kernel_width, bool)
        or not isinstance(kernel_width, (int, float))
        or not (0.0 < kernel_width < math.inf)
    ):
        raise AttributionError(
            f"kernel_width must be a positive number (e.g. 0.25); got {kernel_width!r}"
        )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not 0.0 <= alpha < math.inf
    ):
        raise AttributionError(f"alpha must be a number >= 0 (the ridge penalty); got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AttributionError(f"seed must be an integer; got {seed!r}")
    base = _baseline(baseline, inputs)
    labels = superpixel_labels(inputs, segments, segmentation)
    n, _, h, w = inputs.shape
    limit = rows_per_pass(model, inputs, max_batch, n * n_samples)
    fixed = fixed_targets(model, inputs, target, limit)
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, h * w, dtype=torch.float32)
    ok: torch.Tensor | None = None
    for rows, per_pass in _passes(n, n_samples, limit):
        # samples per image in image order: the same draws whatever the chunking
        z = [
            _samples(n_samples, int(labels[i].max()) + 1, gen) for i in range(rows.start, rows.stop)
        ]
        kmax = max(zi.shape[1] for zi in z)
        zpad = torch.zeros(len(z), n_samples, kmax, dtype=torch.bool)
        for i, zi in enumerate(z):
            zpad[i, :, : zi.shape[1]] = zi
        zdev = zpad.to(inputs.device)
        lab = torch.stack([labels[i] for i in range(rows.start, rows.stop)]).to(inputs.device)
        lab = lab.view(len(z), 1, h * w)
        x, b0, t = inputs[rows, None], base[rows, None], fixed[rows]
        y = torch.empty(len(z), n_samples, dtype=torch.float32, device=inputs.device)
        with torch.no_grad():
            for srows in chunks(n_samples, per_pass):
                k = srows.stop - srows.start
                on = zdev[:, srows].gather(2, lab.expand(-1, k, -1))  # [n, k, H*W]
                on = on.view(len(z), k, 1, h, w)
                batch = torch.where(on, x, b0).reshape(len(z) * k, *inputs.shape[1:])
                s, finite = _scores(model, batch, t.repeat_interleave(k), False)
                ok = finite if ok is None else ok & finite
                y[:, srows] = s.view(len(z), k)
        _check_outputs(ok, "perturbed image")  # before the fit: a NaN breaks the solver
        y = y.cpu()
        for j, (i, zi) in enumerate(zip(range(rows.start, rows.stop), z, strict=True)):
            coef = _fit(zi.double(), y[j], _kernel(zi, kernel_width), float(alpha))
            out[i] = coef.float()[labels[i].view(-1)]
    return out.view(n, 1, h, w).to(inputs.device)


def _samples(n_samples: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """On/off vectors ``[n_samples, k]`` (bool): all on first, then fair coin flips."""
    z = torch.rand(n_samples, k, generator=gen) < 0.5
    z[0] = True
    return z


def _kernel(z: torch.Tensor, width: float) -> torch.Tensor:
    """Sample weights: exp(-d^2 / (2 width^2)), d = cosine distance of z to all-on (1 for all-off)."""
    on = z.double().sum(dim=1)
    d = 1.0 - torch.sqrt(on / z.shape[1])
    return torch.exp(-(d**2) / (2.0 * width**2))
