"""Deletion and insertion curves: does the evidence a map points at drive the prediction?

Semantics (shared with other tools, e.g. Quantus' pixel flipping, so numbers are comparable;
the gate's use of them is in docs/gate.md):

* The attribution map ``[N, 1, H, W]`` (or ``[N, C, H, W]``, summed over channels)
  ranks the pixels in descending order. The sort is stable: tied pixels keep
  raster order (row by row), so results are deterministic.
* At step ``k = 0 .. steps`` the first ``floor(k * H * W / steps)`` pixels of that
  ranking are replaced by the baseline in all channels (deletion), or are the only
  pixels taken from the image, the rest being baseline (insertion).
* The curve is the softmax probability of the target class; the AUC is the
  trapezoid over ``x = k / steps`` in ``[0, 1]``.
* ``"lerf"`` (least relevant first) is the deletion curve of the reversed ranking:
  the pixels in *ascending* order of relevance, again a stable sort (tied pixels in
  raster order, so a map that ties everywhere gives the same curve both ways).

A faithful map gives a *low* deletion AUC and a *high* insertion AUC. Judge it
against chance with :func:`random_reference`: the same curves for uniformly random
pixel rankings drawn from a private ``torch.Generator`` (the global RNG is never
touched); or by its *symmetric relevance gain* (:func:`relevance_gain`, Bluecher et
al. 2024, "Decoupling pixel flipping and occlusion strategy"): ``AUC(LeRF) -
AUC(MoRF)`` on the same baseline, where MoRF is the deletion curve. It needs no
random reference: a random ranking and its reverse are equally likely, so chance
scores 0 exactly in expectation. It also holds when the evidence is diffuse: a model
that reads a background covering most of the image loses its class at about the
same pace under any ordering (MoRF barely beats random), but keeps it far longer
when the background goes last.

Baselines (``baseline=``):

* ``"zero"``: 0 in every channel (black in display space).
* ``"mean"``: the per-image, per-channel mean.
* ``"blur"``: a Gaussian blur of the image, standard deviation ``blur_sigma``
  pixels (default 5.0), kernel truncated at 3 sigma (size ``2 * ceil(3 * sigma) + 1``),
  separable, with replicate padding at the borders.
* a tensor broadcastable to the inputs ``[N, C, H, W]`` (e.g. ``[C, 1, 1]``).

Cost: ``N * (steps + 1)`` forward passes, in batches of at most ``max_batch`` images;
a batch may mix steps of several images, so every batch but the last is full. The
perturbed images of a batch are built on the model's device from one ranking
(one ``argsort`` per call) with a gather, a comparison against the per-step
thresholds and a masked fill (``torch.where`` for other baselines), and nothing in
the loop waits for the device. Memory beyond the model's own: the inputs, the
baseline, an int32 rank per pixel and one batch of perturbed images (with its
ranks and masks). The model runs in eval mode without gradients, and its state is
restored afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from audit.engine.model import AttributionError, chunks, prepare_inputs, preserved, resolve_target
from audit.engine.progress import task
from audit.metrics.localization import finite_map_flag, pixel_scores, raise_if_not_finite_map

__all__ = [
    "BASELINES",
    "curve_set",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_BLUR_SIGMA",
    "deletion_curve",
    "insertion_curve",
    "lerf_curve",
    "relevance_gain",
    "random_reference",
    "random_attribution",
    "make_baseline",
    "curve_auc",
]

BASELINES = ("zero", "mean", "blur")
DEFAULT_MAX_BATCH = 64
DEFAULT_BLUR_SIGMA = 5.0
_KINDS = ("deletion", "insertion", "lerf")


def deletion_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | torch.Tensor | list | None,
    attribution: torch.Tensor,
    steps: int = 16,
    baseline: str | torch.Tensor = "zero",
    *,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target probability as the top-ranked pixels are replaced by the baseline.

    Args:
        model: classifier returning logits ``[N, classes]``.
        inputs: ``[N, C, H, W]`` images (never modified).
        target: class index (int), one per image (tensor or list ``[N]``), or None
            for the model's predicted class on the unperturbed image.
        attribution: ``[N, 1, H, W]`` or ``[N, C, H, W]`` map ranking the pixels.
        steps: number of deletion steps (>= 1); the curve has ``steps + 1`` points.
        baseline: ``"zero"``, ``"mean"``, ``"blur"`` or a tensor broadcastable to the inputs.
        max_batch: most images through the model at once (None: all at once).
        blur_sigma: standard deviation in pixels of the ``"blur"`` baseline.

    Returns:
        ``(curves, auc)``: float32 ``[N, steps + 1]`` and ``[N]`` on the model's device.
        ``curves[:, 0]`` is the probability on the unperturbed image and
        ``curves[:, -1]`` the probability on the baseline.

    Raises:
        AttributionError: mismatched shapes, a bad target, baseline or step count,
            or NaN/Inf in the model's output.
    """
    return _curves(
        model, inputs, target, attribution, steps, baseline, max_batch, blur_sigma, ("deletion",)
    )["deletion"]


def insertion_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | torch.Tensor | list | None,
    attribution: torch.Tensor,
    steps: int = 16,
    baseline: str | torch.Tensor = "zero",
    *,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target probability as the top-ranked pixels are revealed on the baseline.

    The mirror image of :func:`deletion_curve` (same arguments): at step ``k`` the
    first ``floor(k * H * W / steps)`` pixels of the ranking come from the image and
    all others from the baseline. ``curves[:, 0]`` is the probability on the baseline
    and ``curves[:, -1]`` on the unperturbed image; None as target means the class
    predicted on the unperturbed image.
    """
    return _curves(
        model, inputs, target, attribution, steps, baseline, max_batch, blur_sigma, ("insertion",)
    )["insertion"]


def lerf_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | torch.Tensor | list | None,
    attribution: torch.Tensor,
    steps: int = 16,
    baseline: str | torch.Tensor = "zero",
    *,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target probability as the *lowest*-ranked pixels are replaced by the baseline first.

    :func:`deletion_curve` (same arguments and result) of the ascending ranking: at
    step ``k`` the last ``floor(k * H * W / steps)`` pixels of the ranking are removed.
    A faithful map keeps the probability high for long: a *high* AUC.
    """
    return _curves(
        model, inputs, target, attribution, steps, baseline, max_batch, blur_sigma, ("lerf",)
    )["lerf"]


def relevance_gain(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | torch.Tensor | list | None,
    attribution: torch.Tensor,
    steps: int = 16,
    baseline: str | torch.Tensor = "zero",
    *,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> torch.Tensor:
    """The symmetric relevance gain per image ``[N]``: ``AUC(LeRF) - AUC(MoRF)`` on one baseline.

    MoRF is :func:`deletion_curve`, LeRF :func:`lerf_curve`; both come from one
    :func:`curve_set` pass (the unperturbed and all-baseline images are shared). In
    ``[-1, 1]``: above 0 the map ranks the pixels the prediction rests on first, 0 is
    chance (a random ranking's expectation, and any constant map), below 0 the map
    points away from the evidence.
    """
    out = curve_set(
        model,
        inputs,
        target,
        attribution,
        ("deletion", "lerf"),
        steps,
        baseline,
        max_batch=max_batch,
        blur_sigma=blur_sigma,
    )
    return out["lerf"][1] - out["deletion"][1]


def curve_set(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | torch.Tensor | list | None,
    attributions: torch.Tensor,
    kinds: tuple[str, ...] | list[str] = _KINDS,
    steps: int = 16,
    baseline: str | torch.Tensor = "zero",
    *,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Deletion, LeRF and/or insertion curves of several maps per image, in one batched pass.

    ``attributions`` holds ``R * N`` maps, ``R`` per image: row ``r * N + i`` ranks the
    pixels of image ``i`` (e.g. the maps of R methods concatenated, or random maps
    from :func:`random_attribution`). The result equals calling
    :func:`deletion_curve` / :func:`insertion_curve` on the inputs repeated ``R``
    times, at lower cost: the unperturbed and the all-baseline image of each input are
    evaluated once for all rows and kinds.

    Returns:
        kind -> ``(curves, auc)``, ``[R * N, steps + 1]`` and ``[R * N]``, for each kind.
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in _KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise AttributionError(
            f"kinds must be distinct names from {list(_KINDS)}; got {list(kinds)}"
        )
    _check_batch(inputs)
    n = inputs.shape[0]
    rows = (
        attributions.shape[0] if isinstance(attributions, torch.Tensor) and attributions.ndim else 0
    )
    if n == 0 or rows % n:
        raise AttributionError(
            f"attributions must hold R maps per input image (R * {n} rows); got {rows} rows"
        )
    return _curves(
        model,
        inputs,
        target,
        attributions,
        steps,
        baseline,
        max_batch,
        blur_sigma,
        kinds,
        repeats=rows // n,
    )


def random_reference(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | torch.Tensor | list | None = None,
    *,
    kind: str = "deletion",
    steps: int = 16,
    baseline: str | torch.Tensor = "zero",
    repeats: int = 1,
    seed: int = 0,
    max_batch: int | None = DEFAULT_MAX_BATCH,
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deletion (insertion, LeRF) curve of chance: uniformly random pixel rankings.

    ``repeats`` random rankings per image, drawn by :func:`random_attribution` from a
    private generator seeded with ``seed``, run through the model in one batched pass.

    Args:
        kind: ``"deletion"``, ``"insertion"`` or ``"lerf"``.
        repeats: random rankings per image (>= 1); the result is their mean.
        seed: seed of the private generator (the global RNG is not touched).
        Others: as in :func:`deletion_curve`.

    Returns:
        ``(curves, auc)`` averaged over the repeats: ``[N, steps + 1]`` and ``[N]``.
        The AUC is that of the mean curve, which equals the mean of the AUCs.
    """
    if kind not in _KINDS:
        raise AttributionError(f"kind must be one of {list(_KINDS)}; got {kind!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise AttributionError(f"repeats must be a positive integer; got {repeats!r}")
    _check_batch(inputs)
    n = inputs.shape[0]
    attr = random_attribution(inputs, seed=seed, repeats=repeats)
    curves, _ = _curves(
        model,
        inputs,
        target,
        attr,
        steps,
        baseline,
        max_batch,
        blur_sigma,
        (kind,),
        repeats=repeats,
    )[kind]
    with torch.inference_mode(False):  # plain tensors even when called under inference mode
        curves = curves.view(repeats, n, -1).mean(dim=0)
        return curves, curve_auc(curves)


def random_attribution(inputs: torch.Tensor, seed: int = 0, repeats: int = 1) -> torch.Tensor:
    """Uniform random maps ``[repeats * N, 1, H, W]`` (a random pixel ranking) on the inputs' device.

    Drawn on the CPU from a private generator seeded with ``seed`` and then moved, so
    the ranking is the same on every device and the global RNG is untouched. Row
    ``r * N + i`` belongs to image ``i``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AttributionError(f"seed must be an integer; got {seed!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise AttributionError(f"repeats must be a positive integer; got {repeats!r}")
    n, _, h, w = inputs.shape
    g = torch.Generator().manual_seed(seed)
    return torch.rand(repeats * n, 1, h, w, generator=g).to(inputs.device)


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under curves ``[N, steps + 1]`` sampled at ``x = k / steps`` in ``[0, 1]``."""
    steps = curves.shape[1] - 1
    if steps < 1:
        raise AttributionError(f"a curve needs at least 2 points; got shape {tuple(curves.shape)}")
    return (curves[:, 1:] + curves[:, :-1]).sum(dim=1) / (2.0 * steps)


def make_baseline(
    inputs: torch.Tensor,
    baseline: str | torch.Tensor = "zero",
    blur_sigma: float = DEFAULT_BLUR_SIGMA,
) -> torch.Tensor:
    """The baseline that replaces deleted pixels, broadcastable to ``inputs`` ``[N, C, H, W]``.

    ``"zero"`` gives a ``[1, 1, 1, 1]`` zero, ``"mean"`` ``[N, C, 1, 1]``, ``"blur"`` and a
    full tensor ``[N, C, H, W]``; a tensor keeps its (broadcastable) shape, on the
    inputs' device and dtype. ``torch.broadcast_to(b, inputs.shape)`` gives the images.
    """
    x = inputs
    if isinstance(baseline, torch.Tensor):
        b = baseline.detach().to(device=x.device, dtype=x.dtype)
        try:
            torch.broadcast_shapes(b.shape, x.shape)
        except RuntimeError:
            raise AttributionError(
                f"baseline tensor of shape {tuple(b.shape)} does not broadcast to the inputs "
                f"{tuple(x.shape)}; pass [N, C, H, W], [C, H, W], [C, 1, 1] or a scalar"
            ) from None
        if torch.broadcast_shapes(b.shape, x.shape) != x.shape:
            raise AttributionError(
                f"baseline tensor of shape {tuple(b.shape)} would enlarge the inputs "
                f"{tuple(x.shape)}; pass at most [N, C, H, W]"
            )
        if not torch.isfinite(b).all():
            raise AttributionError("baseline tensor contains NaN or Inf")
        while b.ndim < 4:
            b = b[None]
        return b
    if baseline == "zero":
        return x.new_zeros(1, 1, 1, 1)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True)
    if baseline == "blur":
        return gaussian_blur(x, blur_sigma)
    raise AttributionError(
        f"unknown baseline {baseline!r}; choose one of {list(BASELINES)} or pass a tensor "
        "broadcastable to the inputs [N, C, H, W]"
    )


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]``: kernel ``2 * ceil(3 * sigma) + 1``, replicate padding."""
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0:
        raise AttributionError(f"blur_sigma must be a positive number of pixels; got {sigma!r}")
    radius = math.ceil(3.0 * float(sigma))
    r = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / float(sigma)) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    y = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# --------------------------------------------------------------------------- engine
def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AttributionError(f"steps must be a positive integer (e.g. 16); got {steps!r}")


def _check_batch(inputs: object) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise AttributionError(f"inputs must be a batch [N, C, H, W]; got {got}")


def _check_max_batch(max_batch: int | None) -> None:
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
    ):
        raise AttributionError(
            f"max_batch must be a positive integer (images per forward pass) or None; got {max_batch!r}"
        )


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Position of every pixel in the descending stable order, int32 ``[M, H*W]`` (int64 if huge)."""
    m, hw = scores.shape
    dtype = torch.int32 if hw < 2**31 else torch.int64
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.empty(m, hw, dtype=dtype, device=scores.device)
    pos = torch.arange(hw, dtype=dtype, device=scores.device).expand(m, hw)
    return rank.scatter_(1, order, pos)


def _curves(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | torch.Tensor | list | None,
    attribution: torch.Tensor,
    steps: int,
    baseline: str | torch.Tensor,
    max_batch: int | None,
    blur_sigma: float,
    kinds: tuple[str, ...],
    repeats: int = 1,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Curves of every kind in ``kinds`` for ``repeats * N`` rankings (row ``m`` ranks image ``m % N``).

    Every distinct perturbed image is evaluated once. The unperturbed image (deletion
    and LeRF step 0, insertion step ``steps``) and the all-baseline image (deletion and
    LeRF step ``steps``, insertion step 0) do not depend on the ranking, so they are
    shared by all rows of an image and by every kind; only the ``steps - 1`` inner
    steps are per row and kind. For the audit's three methods with deletion and LeRF
    that is ``2 + 3 * 2 * 15 = 92`` forwards per probe instead of 102.

    The evaluations are enumerated as: the ``N`` unperturbed images, the ``N``
    baseline images, then per kind and row its inner steps; this sequence is cut into
    batches of ``max_batch`` regardless of those boundaries (every batch but the last
    is full). The unperturbed images come first, so with ``target=None`` the predicted
    classes are known before any perturbed image is scored. Nothing synchronizes with
    the device inside the loop; NaN/Inf is checked once at the end.
    """
    _check_steps(steps)
    _check_max_batch(max_batch)
    if not isinstance(model, nn.Module):
        raise AttributionError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    # the inputs, the map and the ranking need nothing of the model but its device: made
    # before the model is guarded, the ranking's sort runs on a GPU while the host does that
    x = prepare_inputs(model, inputs)
    n, _, h, w = x.shape
    hw = h * w
    device = x.device
    # on a GPU every check waits for the device: the finiteness of the map, of the
    # logits and the range of GPU targets are checked together after the loop, with
    # one sync (the forwards of a map with NaN run before its error is raised)
    defer = isinstance(attribution, torch.Tensor) and attribution.device == device
    defer = defer and device.type == "cuda"
    scores = pixel_scores(attribution, check=not defer).to(device)
    rows = repeats * n
    if tuple(scores.shape) != (rows, h, w):
        raise AttributionError(
            f"attribution must be [N, 1, H, W] = [{rows}, 1, {h}, {w}] to match the "
            f"inputs {tuple(x.shape)}; got shape {tuple(attribution.shape)}"
        )
    zero = isinstance(baseline, str) and baseline == "zero"
    base = None if zero else make_baseline(x, baseline, blur_sigma)
    rank = _ranks(scores.flatten(1))
    if "lerf" in kinds:  # the ascending ranking, rows ``rows ..``: ties keep raster order too
        rank = torch.cat([rank, _ranks(scores.flatten(1).neg())])
    with preserved(model, grad=False):
        inner = steps - 1
        plan = _plan(n, repeats, steps, kinds, hw, rank.dtype, device)
        total = plan.total
        probs = torch.empty(total, 1, dtype=torch.float32, device=device)
        # a row's float64 sum is finite exactly when all its logits are (float32 logits
        # cannot overflow it): one reduction per batch, written in place
        row_sums = torch.empty(total, dtype=torch.float64, device=device)
        tgt: torch.Tensor | None = None
        tgt_of: torch.Tensor | None = None  # the target of every evaluation, once known
        bad_target: torch.Tensor | None = None
        classes = 0
        name = baseline if isinstance(baseline, str) else "tensor baseline"
        ticker = task(f"curves ({', '.join(kinds)}; {name} baseline)", total, "forwards")
        for sl in chunks(total, max_batch):
            ticker.advance(sl.stop - sl.start)
            img = plan.img_of[sl]
            fill = rank[plan.row_of[sl]] < plan.thr_of[sl, None]
            if sl.stop > plan.first_insertion:  # insertion keeps the top-ranked pixels instead
                fill.ne_(plan.inv_of[sl, None])
            fill = fill.view(-1, 1, h, w)
            batch = x[img]
            if zero:
                batch.masked_fill_(fill, 0.0)
            else:
                torch.where(fill, base[img] if base.shape[0] > 1 else base, batch, out=batch)
            logits = model(batch)
            if tgt is None:
                _check_output(logits, batch.shape[0])
                tgt, bad_target = _first_targets(target, logits, n)
                classes = logits.shape[1]
            if target is None and sl.start < n:  # the unperturbed images decide the class
                stop = min(sl.stop, n)
                tgt[sl.start : stop] = logits[: stop - sl.start].argmax(dim=1)
            if tgt_of is None and sl.stop >= n:  # every image's class is known from here on
                tgt_of = tgt[plan.img_of]
            index = tgt_of[sl] if tgt_of is not None else tgt[sl]  # (before n: row = image)
            torch.sum(logits, dim=1, dtype=torch.float64, out=row_sums[sl])  # NaN, +-Inf propagate
            lp = logits if logits.dtype == torch.float32 else logits.float()
            torch.gather(lp.softmax(dim=1), 1, index[:, None], out=probs[sl])
        ticker.close()
        # the curves are queued before the checks' sync, so the device runs them meanwhile
        out = {}
        probs = probs[:, 0]
        clean, empty = probs[plan.clean_of], probs[plan.empty_of]
        per_kind = rows * inner
        for i, kind in enumerate(kinds):
            mid = probs[2 * n + i * per_kind : 2 * n + (i + 1) * per_kind].view(rows, inner)
            first, last = (empty, clean) if kind == "insertion" else (clean, empty)
            curves = torch.cat([first[:, None], mid, last[:, None]], dim=1)
            out[kind] = (curves, curve_auc(curves))
    # after the model is restored: the host's restoring overlaps the device's last batches
    _verify(
        attribution if defer else None, bad_target, target, classes, row_sums, n, rows, kinds, steps
    )
    return out


class _Plan:
    """What every evaluation of a curve set is: its ranking row, image, threshold, direction.

    Built once per shape (a few small tensors on the device; ~20 kernels) and cached,
    so that the batches only slice it. Deletion removes the first ``floor(k * HW / steps)``
    pixels, insertion keeps only them: a pixel takes the baseline where
    ``(rank < threshold) != invert``; threshold 0 keeps all, HW removes all. LeRF is a
    deletion that reads the ascending ranking, stored in rows ``rows ..`` of the rank
    tensor (``row_of`` points there).
    """

    def __init__(
        self, n: int, repeats: int, steps: int, kinds: tuple[str, ...], hw: int, dtype, device
    ) -> None:
        rows, inner = repeats * n, steps - 1
        per_kind = rows * inner
        self.total = 2 * n + len(kinds) * per_kind
        ar = torch.arange(n, device=device)
        r_inner = torch.arange(rows, device=device).repeat_interleave(inner).repeat(len(kinds))
        k_inner = torch.arange(1, steps, device=device, dtype=torch.int64).repeat(rows * len(kinds))
        self.img_of = torch.cat([ar, ar, r_inner]) % n
        for i, kind in enumerate(kinds):
            if kind == "lerf":  # its rankings are the reversed ones, stored after the others
                start = i * per_kind
                r_inner[start : start + per_kind] += rows
        self.row_of = torch.cat([ar, ar, r_inner])
        self.thr_of = torch.cat(
            [
                torch.zeros(n, dtype=torch.int64, device=device),
                torch.full((n,), hw, device=device),
                (k_inner * hw) // steps,
            ]
        ).to(dtype)
        self.inv_of = torch.zeros(self.total, dtype=torch.bool, device=device)
        self.first_insertion = self.total  # no evaluation inverts before this one
        for i, kind in enumerate(kinds):
            if kind == "insertion":
                start = 2 * n + i * per_kind
                self.inv_of[start : start + per_kind] = True
                self.first_insertion = min(self.first_insertion, start)
        r = torch.arange(rows, device=device) % n
        self.clean_of, self.empty_of = r, r + n  # each row's unperturbed and all-baseline image


_PLANS: dict[tuple, _Plan] = {}


def _plan(
    n: int, repeats: int, steps: int, kinds: tuple[str, ...], hw: int, dtype, device
) -> _Plan:
    """The cached :class:`_Plan` of this shape (the last 16 shapes are kept)."""
    key = (n, repeats, steps, kinds, hw, dtype, device)
    plan = _PLANS.pop(key, None) or _Plan(n, repeats, steps, kinds, hw, dtype, device)
    _PLANS[key] = plan  # most recent last
    while len(_PLANS) > 16:
        del _PLANS[next(iter(_PLANS))]
    return plan


def _first_targets(
    target: int | torch.Tensor | list | None, logits: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class indices ``[N]`` on the logits' device (None: to be filled) and a deferred check.

    Targets given on the CPU (ints, lists, CPU tensors) are checked against the model's
    number of outputs right away, on the host. Targets already on a GPU are checked
    after the loop instead (the returned flag): checking them here would synchronize
    after the first batch and leave the GPU idle while the next one is launched.
    Meanwhile they are clamped, so the device never gathers an invalid index.
    """
    if target is None:
        return torch.zeros(n, dtype=torch.long, device=logits.device), None
    t = torch.as_tensor(target)
    if t.device.type == "cpu" or logits.device.type == "cpu":
        return resolve_target(t, torch.empty(n, logits.shape[1])).to(logits.device), None
    t = t.to(logits.device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise AttributionError(f"target must hold class indices (integers); got dtype {t.dtype}")
    t = t.long().expand(n) if t.ndim == 0 else t.long()
    if t.ndim != 1 or t.shape[0] != n:
        raise AttributionError(
            f"target must be an int, None or one class index per input ({n}); got shape {tuple(t.shape)}"
        )
    k = logits.shape[1]
    return t.clamp(0, k - 1), ((t < 0) | (t >= k)).any()


def _verify(
    attribution: torch.Tensor | None,
    bad_target: torch.Tensor | None,
    target: object,
    classes: int,
    row_sums: torch.Tensor,
    n: int,
    rows: int,
    kinds: tuple[str, ...],
    steps: int,
) -> None:
    """The checks left for after the loop, read with one device sync; raise in input order."""
    flags = [torch.isfinite(row_sums).all()]
    if bad_target is not None:
        flags.append(~bad_target)
    if attribution is not None:  # deferred map check (GPU)
        flags.append(finite_map_flag(attribution))
    if all(torch.stack(flags).tolist()):
        return
    if attribution is not None:
        raise_if_not_finite_map(attribution)
    _raise_if_bad_target(bad_target, target, classes, n)
    _raise_if_not_finite(row_sums, n, rows, kinds, steps)


def _raise_if_bad_target(flag: torch.Tensor | None, target: object, k: int, n: int) -> None:
    if flag is not None and bool(flag):
        resolve_target(torch.as_tensor(target).cpu(), torch.empty(n, k))  # raises, naming the row


def _check_output(logits: object, batch: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != batch:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise AttributionError(
            f"the model must return logits [batch, classes]; got {got} for a batch of {batch}"
        )


def _raise_if_not_finite(
    row_sums: torch.Tensor, n: int, rows: int, kinds: tuple[str, ...], steps: int
) -> None:
    """Name the first evaluation whose logits (their float64 row sum) hold NaN or Inf."""
    bad = ~torch.isfinite(row_sums)
    if bad.any():
        i = int(bad.nonzero()[0])
        if i < 2 * n:  # shared by every row and kind: named by the first kind's step
            kind, clean = kinds[0], i < n
            k = 0 if clean == (kind != "insertion") else steps
            what = "the unperturbed image" if clean else "the all-baseline image"
            where = f"image {i % n} at {kind} step {k} of {steps} ({what})"
        else:
            q, inner = i - 2 * n, steps - 1
            kind, rem = kinds[q // (rows * inner)], q % (rows * inner)
            where = f"image {(rem // inner) % n} at {kind} step {rem % inner + 1} of {steps}"
        raise AttributionError(
            f"model output contains NaN or Inf for {where}; check the model's weights and "
            "whether it accepts the baseline images"
        )
