"""Localization: how much of an attribution map falls on the object mask.

All three metrics take batched tensors and return one value per image ``[N]``
(float32, on the attribution's device). An attribution map is ``[N, 1, H, W]`` or
``[N, C, H, W]`` (summed over channels); a mask is ``[N, 1, H, W]``, True on the
object (the evidence the model *should* use).

* :func:`relevance_mass`: share of the positive relevance that lies inside the
  mask (Arras et al., 2022, "CLEVR-XAI", relevance mass accuracy).
* :func:`relevance_rank`: share of the top-``K`` pixels that lie inside the mask,
  ``K`` = the mask's area (Arras et al., 2022, relevance rank accuracy).
* :func:`pointing_game`: whether the map's maximum lies on the object, optionally
  within a tolerance in pixels (Zhang et al., 2018).

Ties are never broken by pixel position: :func:`relevance_rank` and
:func:`pointing_game` return the *expected* score when tied pixels are ordered
uniformly at random, so a constant map scores the mask's area share, not whatever
the raster order favours.

An empty mask (an image without object pixels) is an error: none of the three
scores is defined for it. Drop such rows first (``ProbeSet.subset``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from audit.engine.model import AttributionError

__all__ = ["relevance_mass", "relevance_rank", "pointing_game", "pixel_scores"]


def pixel_scores(
    attribution: torch.Tensor, what: str = "attribution", check: bool = True
) -> torch.Tensor:
    """One score per pixel ``[N, H, W]``: the map summed over its channel dimension.

    Args:
        attribution: ``[N, 1, H, W]`` or ``[N, C, H, W]`` with finite values.
        what: the argument's name, for error messages.

    Raises:
        AttributionError: not a 4-D floating tensor, or NaN/Inf in it.
    """
    if not isinstance(attribution, torch.Tensor):
        raise AttributionError(
            f"{what} must be a tensor [N, 1, H, W]; got {type(attribution).__name__}"
        )
    if attribution.ndim != 4:
        raise AttributionError(
            f"{what} must be a map [N, 1, H, W] (or [N, C, H, W], summed over channels); "
            f"got shape {tuple(attribution.shape)}"
            + (" (add the channel dimension with a[:, None])" if attribution.ndim == 3 else "")
        )
    a = attribution.detach()
    if not a.is_floating_point():
        a = a.float()
    if check:
        raise_if_not_finite_map(a, what)
    return a.sum(dim=1) if a.shape[1] > 1 else a[:, 0]


def finite_map_flag(attribution: torch.Tensor) -> torch.Tensor:
    """A 0-d bool on the map's device: True when every value is finite (no sync)."""
    # one reduction (a float64 sum of finite values cannot overflow in practice); the
    # element-wise check only runs to name the rows
    return torch.isfinite(attribution.detach().sum(dtype=torch.float64))


def raise_if_not_finite_map(attribution: torch.Tensor, what: str = "attribution") -> None:
    """Raise naming the rows of ``attribution`` that hold NaN or Inf."""
    a = attribution.detach()
    if not bool(finite_map_flag(a)) and not torch.isfinite(a).all():
        rows = (~torch.isfinite(a)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise AttributionError(
            f"{what} contains NaN or Inf in row(s) {rows[:10]}; a ranking of such a map is "
            "undefined (check the explainer's output)"
        )


def _masks(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The mask as bool ``[N, H, W]`` on the scores' device, validated against ``scores``."""
    n, h, w = scores.shape
    if not isinstance(mask, torch.Tensor):
        raise AttributionError(
            f"mask must be a bool tensor [N, 1, H, W]; got {type(mask).__name__}"
        )
    if (
        mask.ndim != 4
        or mask.shape[1] != 1
        or tuple(mask.shape[2:]) != (h, w)
        or mask.shape[0] != n
    ):
        raise AttributionError(
            f"mask must be [N, 1, H, W] = [{n}, 1, {h}, {w}] to match the attribution; "
            f"got shape {tuple(mask.shape)}"
        )
    m = mask.detach().to(scores.device)
    if m.dtype != torch.bool:
        if not ((m == 0) | (m == 1)).all():
            raise AttributionError(
                f"mask must be bool or hold only 0 and 1; got dtype {m.dtype} with other values "
                "(threshold it first, e.g. mask > 0.5)"
            )
        m = m != 0
    m = m[:, 0]
    empty = ~m.flatten(1).any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise AttributionError(
            f"mask is empty (no object pixel) in row(s) {rows[:10]}; localization is undefined "
            "there. Drop those rows first (e.g. probes.subset(...))"
        )
    return m


def _float(scores: torch.Tensor) -> torch.Tensor:
    return scores if scores.dtype == torch.float64 else scores.float()


def relevance_mass(attribution: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the positive relevance that lies inside the mask, per image.

    ``sum(R+ * mask) / sum(R+)`` with ``R+ = max(R, 0)`` (Arras et al., 2022).
    Negative relevance is ignored, so the score lies in ``[0, 1]`` and does not change
    when the map is multiplied by a positive constant. Compare it with the mask's
    area share (``mask.mean()``), the score of a uniform map.

    Args:
        attribution: ``[N, 1, H, W]`` or ``[N, C, H, W]`` (summed over channels).
        mask: bool ``[N, 1, H, W]``, True on the object.

    Returns:
        float ``[N]``. NaN for an image without any positive relevance (the share is
        undefined; ``torch.nanmean`` skips it, and a gate should treat it as missing
        evidence, not as 0).

    Raises:
        AttributionError: shape mismatch, NaN/Inf in the map, a non-binary or empty mask.
    """
    scores = _float(pixel_scores(attribution))
    m = _masks(mask, scores)
    pos = scores.clamp(min=0)
    total = pos.flatten(1).sum(dim=1)
    inside = (pos * m).flatten(1).sum(dim=1)
    share = inside / torch.where(total > 0, total, torch.ones_like(total))
    share = torch.where(total > 0, share, torch.full_like(share, math.nan))
    return share.clamp(max=1.0).float()


def relevance_rank(attribution: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the ``K`` highest-scoring pixels that lie inside the mask, ``K`` = mask area.

    Pixels are ranked by their signed score (pass ``attribution.abs()`` for a
    sign-agnostic ranking). Pixels tied with the ``K``-th score share the remaining
    places in proportion: the result is the expected score under a uniformly random
    order of tied pixels (a constant map scores ``K / (H * W)``).

    Args:
        attribution: ``[N, 1, H, W]`` or ``[N, C, H, W]`` (summed over channels).
        mask: bool ``[N, 1, H, W]``, True on the object.

    Returns:
        float ``[N]`` in ``[0, 1]``; 1 when the top-``K`` pixels are exactly the mask.

    Raises:
        AttributionError: shape mismatch, NaN/Inf in the map, a non-binary or empty mask.
    """
    scores = _float(pixel_scores(attribution))
    m = _masks(mask, scores).flatten(1)
    s = scores.flatten(1)
    k = m.sum(dim=1)  # [N] >= 1
    kth = s.sort(dim=1, descending=True).values.gather(1, (k - 1)[:, None])  # [N, 1]
    above = s > kth
    tied = s == kth
    n_above = above.sum(dim=1)
    n_tied = tied.sum(dim=1)  # >= 1: the K-th value itself
    in_above = (above & m).sum(dim=1)
    in_tied = (tied & m).sum(dim=1)
    expected = in_above + (k - n_above).to(s.dtype) * in_tied.to(s.dtype) / n_tied.to(s.dtype)
    return (expected / k.to(s.dtype)).float().clamp(0.0, 1.0)


def _disk(radius: int, device: torch.device) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()


def pointing_game(
    attribution: torch.Tensor, mask: torch.Tensor, tolerance: int = 0
) -> torch.Tensor:
    """Whether the map's maximum lies on the object (Zhang et al., 2018), per image.

    With ``tolerance = t > 0`` a maximum also counts as a hit when it lies within
    Euclidean distance ``t`` pixels of the mask (the mask is dilated by a disk of
    radius ``t``; Zhang et al. use 15 px at 224 x 224).

    Ties: when several pixels share the maximum, the score is the share of them that
    hit, i.e. the expected hit under a random choice among them. A unique maximum
    gives exactly 1.0 (hit) or 0.0 (miss); a constant map gives the (dilated) mask's
    area share. The mean over images is the pointing-game accuracy.

    Args:
        attribution: ``[N, 1, H, W]`` or ``[N, C, H, W]`` (summed over channels).
        mask: bool ``[N, 1, H, W]``, True on the object.
        tolerance: non-negative integer radius in pixels.

    Returns:
        float ``[N]`` in ``[0, 1]``.

    Raises:
        AttributionError: shape mismatch, NaN/Inf in the map, a non-binary or empty
            mask, a negative or non-integer tolerance.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise AttributionError(
            f"tolerance must be a non-negative integer number of pixels; got {tolerance!r}"
        )
    scores = _float(pixel_scores(attribution))
    m = _masks(mask, scores)
    if tolerance > 0:
        disk = _disk(tolerance, scores.device)[None, None]
        m = F.conv2d(m[:, None].float(), disk, padding=tolerance)[:, 0] > 0.5
    s = scores.flatten(1)
    is_max = s == s.max(dim=1, keepdim=True).values
    hits = (is_max & m.flatten(1)).sum(dim=1)
    return (hits.float() / is_max.sum(dim=1).float()).float()
