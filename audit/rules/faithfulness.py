"""Faithfulness evidence: does deleting what a method points at change the prediction?

A method whose deletion curve does not fall clearly faster than a random ordering's
is not used as evidence (paired interval over probes, ``faithfulness.min_advantage``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from audit.rules.base import Check, mean_ci

__all__ = ["check"]


def check(m: str, e: Mapping[str, Any], gate: Mapping[str, Any]) -> Check:
    """The ``faithfulness/<m>`` check; ``numbers["used"]`` says whether it lets the method count."""
    conf = float(gate["confidence"])
    pct = round(100 * conf)
    need = float(gate["faithfulness"]["min_advantage"])
    adv = _paired_advantage(e.get("random_deletion_auc"), e.get("deletion_auc"), conf)
    if adv is None:
        return Check(f"faithfulness/{m}", "faithfulness", None,
                     f"{m} is not used as evidence: no random-ordering reference to judge its deletion curve against",
                     {"used": False})  # fmt: skip
    mean_m, mean_r, (a, lo, hi) = adv
    nums = {"deletion_auc": mean_m, "random_deletion_auc": mean_r, "advantage": a, "low": lo, "high": hi,
            "min_advantage": need, "used": lo > need}  # fmt: skip
    if lo > need:
        return Check(f"faithfulness/{m}", "faithfulness", None,
                     f"{m} is faithful: deletion AUC {mean_m:.3f} vs {mean_r:.3f} for a random ordering "
                     f"(advantage {a:.3f}, {pct}% CI {lo:.3f} to {hi:.3f}, above the required {need:.3f})", nums)  # fmt: skip
    return Check(f"faithfulness/{m}", "faithfulness", None,
                 f"{m} is not used as evidence: its deletion AUC {mean_m:.3f} is not clearly below a random "
                 f"ordering's {mean_r:.3f} (advantage {a:.3f}, {pct}% CI {lo:.3f} to {hi:.3f}; needs more than {need:.3f})", nums)  # fmt: skip


def _paired_advantage(rand: Sequence[float] | None, auc: Sequence[float] | None, conf: float):
    if rand is None or auc is None or len(rand) != len(auc):
        return None
    pairs = [(r, a) for r, a in zip(rand, auc, strict=True) if r is not None and a is not None]
    if not pairs:
        return None
    ci = mean_ci([r - a for r, a in pairs], conf)
    if ci is None:
        return None
    mean_m = sum(a for _, a in pairs) / len(pairs)
    mean_r = sum(r for r, _ in pairs) / len(pairs)
    return mean_m, mean_r, ci[:3]
