"""Counterfactual-pair evidence: how often changing only the context flips the prediction.

Decides only when the probes have pairs but no groups (with groups, the paired context
gaps of :mod:`audit.rules.behaviour` decide and the flip rate corroborates).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from audit.engine import stats
from audit.rules.base import Check, Outcome

__all__ = ["judge", "flip_rate_check"]


def judge(beh: Mapping[str, Any], gate: Mapping[str, Any], *, decides: bool) -> Outcome:
    """The flip-rate check; its verdict counts only when ``decides``."""
    pairs = beh.get("pairs")
    if not pairs or not pairs.get("total"):
        return Outcome(None)
    check = flip_rate_check(pairs, gate)
    if not decides:
        check.verdict = None
    return Outcome(check.verdict, [check])


def flip_rate_check(pairs: Mapping[str, Any], gate: Mapping[str, Any]) -> Check:
    """The ``flip_rate`` check: one-sided Wilson bounds of the share of pairs that flip."""
    conf = float(gate["confidence"])
    pct = round(100 * conf)
    k, n = int(pairs["flipped"]), int(pairs["total"])
    f_fail, f_pass = float(gate["flip_rate"]["fail"]), float(gate["flip_rate"]["pass"])
    code, lo, hi = stats.decide_rate(k, n, f_fail, f_pass, conf)
    v = stats.CODES[int(code)]
    lo, hi = float(lo), float(hi)
    sentence = (
        f"changing only the context flips the prediction on {k} of {n} counterfactual pairs "
        f"(flip rate {k / n:.2f}, {pct}% one-sided bounds {lo:.2f} and {hi:.2f}, Wilson)"
    )
    if v == "PASS":
        sentence += f"; rules out a flip rate of {f_fail:.2f}"
    elif v == "FAIL":
        sentence += f"; clearly above the tolerated {f_pass:.2f}"
    nums = {
        "flip_rate": k / n,
        "low": lo,
        "high": hi,
        "flipped": k,
        "pairs": n,
        "fail": f_fail,
        "pass": f_pass,
    }
    return Check("flip_rate", "behaviour", v, sentence, nums)
