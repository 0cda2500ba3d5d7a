"""Faithfulness evidence: does the order a method ranks the pixels in matter to the prediction?

The statistic is the *symmetric relevance gain* (Bluecher et al. 2024): per probe,
``SRG = AUC(LeRF) - AUC(MoRF)``, the area under the target probability when the
method's least relevant pixels are replaced by the baseline first, minus the area
when its most relevant go first (the deletion curve); same baseline, same steps. A
method counts as evidence when the low end of the mean SRG's interval over probes
(normal, ``confidence``) lies above ``faithfulness.min_gain``. Chance scores 0:
a random ranking and its reverse are equally likely, so no random reference is
needed. Unlike "deletion beats a random ordering", it works when the evidence is
diffuse: a model that reads a background covering most of the image loses its class
about as fast under a random ordering as under the method's, yet keeps it far longer
when the background goes last.

No single baseline (what replaces a removed pixel) suits every model: a fixed colour
(``zero``) is itself a class cue where one class is dark, and ``blur`` keeps the colours
a colour shortcut reads. So the SRG is measured on ``engine.baseline`` and on each of
``engine.also_baselines``, with Bonferroni over them, and a method counts when one shows it.

Reports written before the SRG (no ``lerf_auc`` in a method's evidence) are judged as
they were: the deletion AUC must beat a random ordering's by ``min_advantage``
(paired interval), so :func:`audit.pipeline.recheck` gives their verdict again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from audit.rules.base import Check, mean_ci

__all__ = ["check", "gains"]


def gains(
    morf: Sequence[float | None] | None, lerf: Sequence[float | None] | None
) -> list[float] | None:
    """Per-probe SRG ``lerf - morf`` (probes with a missing value left out); None without both lists."""
    pairs = _pairs(morf, lerf)
    return None if pairs is None else [b - a for a, b in pairs]


def _pairs(
    x: Sequence[float | None] | None, y: Sequence[float | None] | None
) -> list[tuple[float, float]] | None:
    if x is None or y is None or len(x) != len(y):
        return None
    return [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]


def check(m: str, e: Mapping[str, Any], gate: Mapping[str, Any]) -> Check:
    """The ``faithfulness/<m>`` check; ``numbers["used"]`` says whether it lets the method count.

    With curves on several baselines (``srg_baselines``), each baseline's interval is
    taken at ``1 - alpha / k`` (Bonferroni over the ``k`` baselines), and the method
    counts when the SRG is clear on at least one: the chance that a map which is no
    better than a random ordering counts stays at most ``alpha``.
    """
    if "lerf_auc" not in e and "random_deletion_auc" in e:
        return _legacy(m, e, gate)
    conf = float(gate["confidence"])
    need = float(gate["faithfulness"]["min_gain"])
    curves = dict(e.get("srg_baselines") or {})
    if not curves and "lerf_auc" in e:
        curves = {"": {"deletion_auc": e.get("deletion_auc"), "lerf_auc": e.get("lerf_auc")}}
    k = max(1, len(curves))
    each = 1.0 - (1.0 - conf) / k
    found = []
    for b, c in curves.items():
        pairs = _pairs(c.get("deletion_auc"), c.get("lerf_auc"))
        ci = mean_ci([y - x for x, y in pairs], each) if pairs else None
        if ci is not None:
            morf = sum(x for x, _ in pairs) / len(pairs)
            lerf = sum(y for _, y in pairs) / len(pairs)
            found.append((b, morf, lerf, *ci))
    if not found:
        return Check(
            f"faithfulness/{m}",
            "faithfulness",
            None,
            f"{m} is not used as evidence: no least-relevant-first (LeRF) deletion curve to set its "
            "most-relevant-first curve against",
            {"used": False},
        )
    best = max(found, key=lambda f: f[4])  # the highest lower bound
    b, morf, lerf, srg, lo, hi, n = best
    used = lo > need
    pct = round(100 * conf)
    nums = {
        "deletion_auc": morf,
        "lerf_auc": lerf,
        "srg": srg,
        "low": lo,
        "high": hi,
        "n": n,
        "baseline": b,
        "baselines": {f[0]: {"srg": f[3], "low": f[4], "high": f[5]} for f in found},
        "min_gain": need,
        "used": used,
    }
    on = f" on the {b} baseline" if b else ""
    level = (
        f"{pct}% family-wise over {k} baselines, each at {100 * each:.1f}%" if k > 1 else f"{pct}%"
    )
    others = "; ".join(
        f"{f[0]}: {f[3]:.3f} [{f[4]:.3f}, {f[5]:.3f}]" for f in found if f is not best
    )
    what = (
        f"symmetric relevance gain{on} AUC(LeRF) {lerf:.3f} - AUC(MoRF) {morf:.3f} = {srg:.3f}, "
        f"CI {lo:.3f} to {hi:.3f} ({level}) over {n} probes"
        + (f"; other baselines {others}" if others else "")
    )
    if used:
        return Check(
            f"faithfulness/{m}",
            "faithfulness",
            None,
            f"{m} is faithful: the prediction survives removing its least relevant pixels first far longer "
            f"than its most relevant first ({what}; above the required {need:.3f}, a random ordering "
            "scores 0)",
            nums,
        )
    return Check(
        f"faithfulness/{m}",
        "faithfulness",
        None,
        f"{m} is not used as evidence: removing its most relevant pixels first does not clearly hurt the "
        f"prediction more than removing its least relevant first on any baseline ({what}; needs more "
        f"than {need:.3f}, a random ordering scores 0)",
        nums,
    )


def _legacy(m: str, e: Mapping[str, Any], gate: Mapping[str, Any]) -> Check:
    """An old report's rule: the deletion AUC against a random ordering's (``min_advantage``)."""
    conf = float(gate["confidence"])
    pct = round(100 * conf)
    need = float(gate["faithfulness"]["min_advantage"])
    adv = _paired_advantage(e.get("random_deletion_auc"), e.get("deletion_auc"), conf)
    if adv is None:
        return Check(
            f"faithfulness/{m}",
            "faithfulness",
            None,
            f"{m} is not used as evidence: no random-ordering reference to judge its deletion curve against",
            {"used": False},
        )
    mean_m, mean_r, (a, lo, hi) = adv
    nums = {
        "deletion_auc": mean_m,
        "random_deletion_auc": mean_r,
        "advantage": a,
        "low": lo,
        "high": hi,
        "min_advantage": need,
        "used": lo > need,
    }
    old = "(a report without LeRF curves, judged by its deletion AUC against a random ordering)"
    if lo > need:
        return Check(
            f"faithfulness/{m}",
            "faithfulness",
            None,
            f"{m} is faithful {old}: deletion AUC {mean_m:.3f} vs {mean_r:.3f} for a random ordering "
            f"(advantage {a:.3f}, {pct}% CI {lo:.3f} to {hi:.3f}, above the required {need:.3f})",
            nums,
        )
    return Check(
        f"faithfulness/{m}",
        "faithfulness",
        None,
        f"{m} is not used as evidence {old}: its deletion AUC {mean_m:.3f} is not clearly below a random "
        f"ordering's {mean_r:.3f} (advantage {a:.3f}, {pct}% CI {lo:.3f} to {hi:.3f}; needs more than {need:.3f})",
        nums,
    )


def _paired_advantage(rand: Sequence[float] | None, auc: Sequence[float] | None, conf: float):
    pairs = _pairs(rand, auc)
    if not pairs:
        return None
    ci = mean_ci([r - a for r, a in pairs], conf)
    if ci is None:
        return None
    mean_m = sum(a for _, a in pairs) / len(pairs)
    mean_r = sum(r for r, _ in pairs) / len(pairs)
    return mean_m, mean_r, ci[:3]
