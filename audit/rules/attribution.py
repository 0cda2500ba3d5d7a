"""Attribution evidence: how much relevance the usable methods put outside the object masks.

Per method, the per-probe share of positive relevance outside the mask against the
share of the image outside it (the *excess*, scaled to -1..+1), with a normal interval
over probes. It can FAIL (a clear excess in most usable methods) but never PASS:
relevance on the object does not show that the context is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from audit.rules.base import Check, Outcome, label, mean_ci

__all__ = ["judge", "support"]


def judge(
    methods: Mapping[str, Mapping[str, Any]], usable: Sequence[str], gate: Mapping[str, Any]
) -> Outcome:
    """One ``attribution/<m>`` check per method with masks; the verdict from the usable ones.

    FAIL when more than half of the usable methods show a clear excess, INCONCLUSIVE
    when some usable method was measured, None when none was.
    """
    conf = float(gate["confidence"])
    pct = round(100 * conf)
    a_fail = float(gate["attribution"]["fail"])
    votes: list[str] = []
    checks: list[Check] = []
    for m, e in methods.items():
        if "outside_share" not in e or e.get("outside_area") is None:
            continue
        ex = _excess(e["outside_share"], e["outside_area"], conf)
        if ex is None:
            continue
        share, area, (d, lo, hi), n = ex
        nums = {
            "outside_share": share,
            "outside_area": area,
            "excess": d,
            "low": lo,
            "high": hi,
            "n": n,
            "fail": a_fail,
            "used": m in usable,
        }
        sentence = (
            f"{share:.0%} of {label(m)} relevance lies outside the object masks, where {area:.0%} of the "
            f"image's area lies (excess {d:+.2f} on a -1 to +1 scale, {pct}% CI {lo:+.2f} to {hi:+.2f}, {n} probes)"
        )
        if m in usable:
            v = "FAIL" if lo > a_fail else "INCONCLUSIVE"
            votes.append(v)
            checks.append(Check(f"attribution/{m}", "attribution", v, sentence, nums))
        else:
            checks.append(
                Check(
                    f"attribution/{m}",
                    "attribution",
                    None,
                    sentence + "; not used as evidence",
                    nums,
                )
            )
    if not votes:
        return Outcome(None, checks)
    return Outcome("FAIL" if 2 * votes.count("FAIL") > len(votes) else "INCONCLUSIVE", checks)


def support(
    methods: Mapping[str, Mapping[str, Any]], usable: Sequence[str]
) -> dict[str, tuple[str, bool | None]]:
    """Per group, a line from the usable methods' outside shares, and which way it leans.

    E.g. ``("on wolf|snow, Grad-CAM puts 73% of its relevance outside the object, LRP 61%;
    the context covers 92% of these images", True)``. The flag says whether the line shows
    reliance on the context (True: every method puts more of its relevance outside the
    object than the context's share of the area), on the object (False: every method puts
    less), or neither (None: the methods disagree, or one matches the area exactly): the
    rule that attaches it (:func:`audit.rules.base.other_evidence`) shows it as
    corroborating only when it agrees with the verdict.
    """
    shares: dict[str, list[str]] = {}
    areas: dict[str, float] = {}
    leans: dict[str, set[bool | None]] = {}
    for m in usable:
        e = methods.get(m, {})
        if "outside_share" not in e or e.get("outside_area") is None:
            continue
        for g, (share, area) in _per_group_outside(e).items():
            first = not shares.get(g)
            shares.setdefault(g, []).append(
                f"{label(m)} puts {share:.0%} of its relevance outside the object"
                if first
                else f"{label(m)} {share:.0%}"
            )
            areas.setdefault(g, area)
            leans.setdefault(g, set()).add(None if share == area else share > area)
    return {
        g: (
            f"on {g}, {', '.join(parts)}; the context covers {areas[g]:.0%} of these images",
            next(iter(leans[g])) if len(leans[g]) == 1 else None,
        )
        for g, parts in shares.items()
    }


def _excess(share: Sequence[float], area: Sequence[float], conf: float):
    both = [
        (s, a)
        for s, a in zip(share, area, strict=True)
        if s is not None and a is not None and math.isfinite(s)
    ]
    if not both:
        return None
    ci = mean_ci([_normalized_excess(s, a) for s, a in both], conf)
    mean_s = sum(s for s, _ in both) / len(both)
    mean_a = sum(a for _, a in both) / len(both)
    return mean_s, mean_a, ci[:3], ci[3]


def _normalized_excess(share: float, area: float) -> float:
    """Outside share against outside area on a [-1, 1] scale: 0 = as the area predicts,
    +1 = every bit of relevance outside the object, -1 = every bit on it.

    A plain difference cannot work when objects are small: with an outside area of
    91%, even a model looking only at the context has an excess of at most 0.09. So
    the difference is divided by the room it has in its direction.
    """
    d = share - area
    room = (1.0 - area) if d >= 0 else area
    return d / room if room > 0 else 0.0


def _per_group_outside(e: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    groups = e.get("groups")
    if not groups:
        return {}
    acc: dict[str, list[tuple[float, float]]] = {}
    for g, s, a in zip(groups, e["outside_share"], e["outside_area"], strict=True):
        if s is not None and a is not None and math.isfinite(s):
            acc.setdefault(g, []).append((s, a))
    return {
        g: (sum(s for s, _ in v) / len(v), sum(a for _, a in v) / len(v)) for g, v in acc.items()
    }
