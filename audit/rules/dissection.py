"""Network dissection (:mod:`audit.evidence.dissection`): the units of a layer that respond to the context.

It informs and never votes: a layer whose units follow the background and carry a
class's logit corroborates a shortcut that behaviour measures, but units that see the
context are normal (a clean model sees the background too), and a share of a logit is
not a change of prediction. The numbers come from the ``dissection`` block of
``report.json`` (:func:`audit.evidence.dissection.dissection_raw`), so :func:`audit.pipeline.recheck`
gives the same finding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from audit.rules.base import Check

__all__ = ["check", "context_units", "rows", "metrics", "carried"]

#: A completeness error below this is reported as exact (float rounding).
_EXACT = 1e-4


def _best(block: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Per unit, its best context concept and that IoU (named contexts, else the whole context)."""
    named = block.get("iou_contexts") or {}
    k = int(block["units"])
    if not named:
        return [("context", float(v)) for v in block["iou_context"]]
    out = []
    for u in range(k):
        name, iou = max(((c, float(v[u])) for c, v in named.items()), key=lambda t: t[1])
        out.append((name, iou))
    return out


def context_units(block: Mapping[str, Any] | None) -> list[int]:
    """Units whose best concept is a context with IoU above the block's threshold, most aligned first."""
    if not block or "error" in block:
        return []
    best = _best(block)
    thr = float(block["iou_threshold"])
    obj = block["iou_object"]
    units = [u for u, (_, iou) in enumerate(best) if iou > thr and iou > float(obj[u])]
    return sorted(units, key=lambda u: (-best[u][1], u))


def carried(block: Mapping[str, Any], units: list[int]) -> dict[str, float]:
    """Per class with probes: the share of its logit's positive unit contributions that ``units`` supply."""
    out = {}
    for cls, share in (block.get("share") or {}).items():
        if not share or any(v is None for v in share):
            continue  # a class without probes (NaN, stored as null)
        out[cls] = float(sum(share[u] for u in units))
    return out


def rows(block: Mapping[str, Any] | None, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per listed context unit: unit, concept, its IoU, IoU with the whole context and the object, shares."""
    units = context_units(block)[:limit]
    if not units:
        return []
    best = _best(block)
    shares = {
        c: s for c, s in (block.get("share") or {}).items() if s and all(v is not None for v in s)
    }
    return [
        {
            "unit": u,
            "concept": best[u][0],
            "iou": best[u][1],
            "iou_context": float(block["iou_context"][u]),
            "iou_object": float(block["iou_object"][u]),
            "share": {c: float(s[u]) for c, s in shares.items()},
        }
        for u in units
    ]


def _chance(q: float, area: float) -> float:
    """The IoU of a region of share ``q`` placed at random with a concept of share ``area``."""
    inter = q * area
    return inter / (q + area - inter) if q + area - inter > 0 else 0.0


def check(block: Mapping[str, Any] | None, gate: Mapping[str, Any] | None = None) -> list[Check]:
    """The informing check ``dissection`` (``verdict=None``): the finding with its numbers, or the failure."""
    if not block:
        return []
    if "error" in block:
        return [
            Check(
                "dissection",
                "dissection",
                None,
                f"network dissection could not run on this model ({block['error']}); it only corroborates, "
                "the verdict does not depend on it",
                {"error": str(block["error"])},
            )
        ]
    layer, k = block["layer"], int(block["units"])
    q, thr = float(block["quantile"]), float(block["iou_threshold"])
    units = context_units(block)
    share = carried(block, units)
    named = list(block.get("iou_contexts") or {})
    areas = block.get("areas") or {}
    err = float(block.get("completeness_error") or 0.0)
    how = f"a unit fires on the top {q:.0%} of its upsampled activations; a context concept is " + (
        f"the background of the probes of one context ({', '.join(named)})"
        if named
        else "the whole area outside the masks"
    )
    chance = max(
        (_chance(q, float(areas[c])) for c in (named or ["context"]) if c in areas),
        default=math.nan,
    )
    exact = (
        "exact here: the contributions (gradient x activation) add up to the logit"
        if err < _EXACT
        else f"a first-order estimate here (gradient x activation; the contributions miss the logit change by {err:.0%})"
    )
    numbers: dict[str, Any] = {
        "layer": layer,
        "units": k,
        "context_units": len(units),
        "unit_ids": units[:32],
        "share": share,
        "iou_threshold": thr,
        "quantile": q,
        "completeness_error": err,
    }
    if units:
        kinds: dict[str, int] = {}
        for u in units:
            c = _best(block)[u][0]
            kinds[c] = kinds.get(c, 0) + 1
        split = f" ({', '.join(f'{n} {c}' for c, n in kinds.items())})" if named else ""
        carry = " and ".join(f"{v:.0%} of the {c} logit" for c, v in share.items())
        finding = (
            f"network dissection: {len(units)} of the {k} units of {layer} respond to the context rather than the "
            f"object (best IoU > {thr:g} with a context{split}; a unit firing at random scores {chance:.2f}) and "
            f"carry {carry} (share of the units' positive contributions to each class's logit on its own probes; "
            f"{exact}); {how}. Corroborating only: it never changes the verdict"
        )
    else:
        best = _best(block)
        top = max(range(k), key=lambda u: best[u][1]) if k else None
        most = (
            f"; the most context-aligned is unit {top} (IoU {best[top][1]:.2f} with {best[top][0]})"
            if top is not None
            else ""
        )
        finding = (
            f"network dissection: none of the {k} units of {layer} responds to the context more than to the object "
            f"with IoU > {thr:g} (a unit firing at random scores {chance:.2f}){most}; {how}. Corroborating only: "
            "it never changes the verdict"
        )
    return [Check("dissection", "dissection", None, finding, numbers)]


def metrics(block: Mapping[str, Any] | None) -> dict[str, float]:
    """Flat metrics: ``dissection/context_units`` and ``dissection/context_share/<class>``."""
    if not block or "error" in block:
        return {}
    units = context_units(block)
    out = {"dissection/context_units": float(len(units))}
    for cls, v in carried(block, units).items():
        out[f"dissection/context_share/{cls}"] = v
    return out
