"""Sanity evidence: does a method's map depend on the model's weights at all?

A method whose maps survive the randomization of every layer (Adebayo et al. 2018)
explains the input, not the model, and is not used as evidence. See :func:`check`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from audit.rules.base import Check, finite, label, max_defined

__all__ = ["check"]


def check(m: str, e: Mapping[str, Any], limit: float) -> Check | None:
    """The ``sanity/<m>`` check (``numbers["used"]``: whether it lets the method count), or None.

    Judges the original against the fully randomized model, per probe: a constant
    randomized map counts as similarity 0 (changed completely), a constant original map
    leaves the probe out. Per-probe numbers (``sanity_spearman``, ``sanity_spearman_abs``,
    ``sanity_constant``, ``sanity_constant_randomized``) are recomputed here, so a
    rechecked report gives the same verdict; a report with only ``sanity_similarity``
    (written before them) is judged on that number.
    """
    if "sanity_error" in e:
        return Check(
            f"sanity/{m}",
            "sanity",
            None,
            f"{m} is not used as evidence: its sanity check failed ({e['sanity_error']})",
            {"used": False},
        )
    if e.get("sanity_spearman") is None:
        if "sanity_similarity" not in e:
            return None
        sim = finite(e["sanity_similarity"])
        nums: dict[str, Any] = {"similarity": sim, "max_similarity": limit, "used": False}
        if sim is None:
            nums.pop("similarity")
            return Check(
                f"sanity/{m}",
                "sanity",
                None,
                f"{m} is not used as evidence: its sanity similarity is undefined and the report has no "
                f"per-probe numbers to say why (re-run the audit)",
                nums,
            )
        return _outcome(m, sim, limit, nums)

    signed, absolute = list(e["sanity_spearman"]), list(e.get("sanity_spearman_abs") or [])
    n = len(signed)
    const = [bool(c) for c in (e.get("sanity_constant") or [False] * n)]
    const_r = [bool(c) for c in (e.get("sanity_constant_randomized") or [False] * n)]
    if len(absolute) != n or len(const) != n or len(const_r) != n:
        return Check(
            f"sanity/{m}",
            "sanity",
            None,
            f"{m} is not used as evidence: its sanity numbers do not line up ({n} signed, {len(absolute)} "
            f"absolute, {len(const)} and {len(const_r)} constant flags)",
            {"used": False},
        )
    keep = [i for i in range(n) if not const[i]]
    n_const = n - len(keep)
    n_zero = sum(const_r[i] for i in keep)
    nums = {
        "probes": n,
        "constant_original": n_const,
        "constant_randomized": n_zero,
        "max_similarity": limit,
        "used": False,
    }
    if e.get("sanity_mode") is not None:
        nums["mode"] = str(e["sanity_mode"])
    shown = label(m)
    if not keep:
        return Check(
            f"sanity/{m}",
            "sanity",
            None,
            f"{m} is not used as evidence: {shown} gives a constant map on all {n} sanity probes: it says "
            f"nothing there, so there is nothing a randomized model could change",
            nums,
        )
    means = []
    for values in (signed, absolute):
        vs = [v for v in (finite(values[i]) for i in keep) if v is not None]
        means.append(sum(vs) / len(vs) if vs else None)
    sim = max_defined(*means)
    if math.isnan(sim):
        return Check(
            f"sanity/{m}",
            "sanity",
            None,
            f"{m} is not used as evidence: its similarity to the randomized model's maps is undefined on "
            f"every probe",
            nums,
        )
    nums["similarity"] = sim
    notes = ""
    if n_zero:
        notes += (
            f"; the randomized model's map is constant on {n_zero} of {len(keep)} probes: it changed "
            f"completely there (similarity 0)"
        )
    if n_const:
        notes += (
            f"; {shown} gives a constant map on {n_const} of {n} probes: it says nothing there, "
            f"and they are left out"
        )
    return _outcome(m, sim, limit, nums, notes)


def _outcome(m: str, sim: float, limit: float, nums: dict[str, Any], notes: str = "") -> Check:
    """The sanity check of method ``m`` from its (defined) similarity to the randomized model's maps."""
    nums["used"] = sim < limit
    if nums["used"]:
        return Check(
            f"sanity/{m}",
            "sanity",
            None,
            f"{m} passes the randomization sanity check: similarity {sim:.2f} to the maps of a fully "
            f"randomized model (must stay below {limit:.2f}){notes}",
            nums,
        )
    return Check(
        f"sanity/{m}",
        "sanity",
        None,
        f"{m} is not used as evidence: its maps barely change when every layer is randomized "
        f"(similarity {sim:.2f}, must stay below {limit:.2f}){notes}",
        nums,
    )
