"""Behaviour evidence: accuracy per context within a class (context gaps), and competence.

Every pair of contexts of a class is one comparison: on its pairs (the same objects in
both contexts) when they cover the groups, otherwise as two independent groups. PASS
when every comparison rules out a gap of ``context_gap.fail`` (intersection-union),
FAIL when one shows a gap above ``context_gap.pass`` (Holm). The rule and its error
guarantees are in :mod:`audit.engine.stats`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from audit.engine import stats
from audit.evidence.behaviour import split_group
from audit.rules.base import Check, Outcome, other_evidence

__all__ = ["comparisons", "judge", "competence"]


def judge(
    beh: Mapping[str, Any],
    gate: Mapping[str, Any],
    support: Mapping[str, tuple[str, bool | None]] | None = None,
) -> Outcome:
    """The context-gap verdict (None without groups, or with no class in two contexts).

    ``support`` maps a group to a line from the attribution evidence and which way it
    leans (:func:`audit.rules.attribution.support`). On the check of the class whose worst
    group it is, the line is corroborating (``Check.support``) when it agrees with the
    class's verdict and shown as pointing the other way (``Check.against``) when it does
    not (:func:`audit.rules.base.other_evidence`).
    """
    if not beh.get("groups"):
        return Outcome(None)
    verdict, checks = _context_gap_checks(beh, gate, support or {})
    return Outcome(verdict, checks)


def comparisons(beh: Mapping[str, Any]) -> list[stats.Comparison]:
    """Every pair of contexts of every class, paired where the pairs cover the groups.

    A pair of groups ``(A, B)`` is compared on its pairs (the paired table of
    ``beh["paired"]``) when they hold at least half the rows of each group
    (``2 * pairs >= max(n_A, n_B)``), and as independent groups on all their rows
    otherwise. The choice depends on the design only (which rows have a partner), never
    on the predictions, so it does not bias either test.
    """
    groups = beh["groups"]
    by_class: dict[str, list[str]] = {}
    for g in groups:
        by_class.setdefault(split_group(g)[0], []).append(g)
    tables: dict[tuple[str, str], tuple[int, int, int, int]] = {}
    for t in beh.get("paired") or []:
        ga, gb = (str(x) for x in t["groups"])
        a, b, c, d = (int(t[k]) for k in ("a", "b", "c", "d"))
        tables[(ga, gb)] = (a, b, c, d)
        tables[(gb, ga)] = (a, c, b, d)
    out = []
    for cls, names in by_class.items():
        for i, ga in enumerate(names):
            for gb in names[i + 1 :]:
                na, nb = int(groups[ga]["n"]), int(groups[gb]["n"])
                t = tables.get((ga, gb))
                if t is not None and sum(t) >= 1 and 2 * sum(t) >= max(na, nb):
                    out.append(stats.Comparison(cls, ga, gb, t, paired=True))
                else:
                    counts = (int(groups[ga]["correct"]), na, int(groups[gb]["correct"]), nb)
                    out.append(stats.Comparison(cls, ga, gb, counts))
    return out


def _context_gap_checks(
    beh: Mapping[str, Any], gate: Mapping[str, Any], support: Mapping[str, tuple[str, bool | None]]
) -> tuple[str | None, list[Check]]:
    """The behaviour verdict (None: no class in two contexts) and one check per class."""
    comps = comparisons(beh)
    if not comps:
        return None, [
            Check(
                "context_gap",
                "behaviour",
                None,
                "no class is seen in two or more contexts (groups '<class>|<context>'), so no context gap can be measured",
            )
        ]
    conf = float(gate["confidence"])
    pct = round(100 * conf)
    g_fail, g_pass = float(gate["context_gap"]["fail"]), float(gate["context_gap"]["pass"])
    dec = stats.decide_comparisons(comps, g_fail, g_pass, conf)
    m = len(comps)
    checks = []
    for cls, v in dec.classes.items():
        r = dec.deciding(cls)
        c = r.comparison
        (k1, n1), (k2, n2) = c.accuracies
        (worse, kw, nw), (better, kb, nb) = sorted(
            [(c.first, k1, n1), (c.second, k2, n2)], key=lambda x: x[1] / x[2]
        )
        head = (
            f"{worse}: accuracy {kw / nw:.2f} ({kw}/{nw}) vs {kb / nb:.2f} ({kb}/{nb}) for {better}"
        )
        if c.paired:
            disc = c.counts[1] + c.counts[2]
            on = f"on {c.size} ({disc} discordant"
            test = "paired score interval, Newcombe"
        else:
            on = f"on {c.size} (independent groups"
            test = "score interval, Newcombe"
        mine = len(dec.of(cls))
        if v == "FAIL":
            tail = (
                f"context gap {abs(r.diff):.2f} {on}; lower bound {r.lower:.2f} at family-wise {pct}%, {test}, "
                f"Holm over {m} comparison{'s' if m > 1 else ''}) is clearly above the tolerated {g_pass:.2f}"
            )
        elif v == "PASS":
            every = (
                f"; the largest of {mine} context pairs, each tested (intersection-union)"
                if mine > 1
                else ""
            )
            tail = (
                f"context gap {abs(r.diff):.2f} {on}; {pct}% one-sided bounds {r.low:+.2f} and {r.high:+.2f}, {test}) "
                f"rules out a gap of {g_fail:.2f} (equivalence test{every})"
            )
        else:
            tail = stats.describe_probes_needed(r, dec)
        nums = {
            "gap": abs(r.diff),
            "low": r.lower,
            "high": r.upper,
            "diff_low": r.low,
            "diff_high": r.high,
            "holm_level": r.level,
            "paired": c.paired,
            "counts": list(c.counts),
            "comparisons": m,
            "class_comparisons": mine,
            "worst_group": worse,
            "worst_accuracy": kw / nw,
            "worst_n": nw,
            "best_group": better,
            "best_accuracy": kb / nb,
            "best_n": nb,
            "fail": g_fail,
            "pass": g_pass,
        }
        text, leans = support.get(worse, ("", None))
        checks.append(
            Check(
                f"context_gap/{cls}",
                "behaviour",
                v,
                f"{head}; {tail}",
                nums,
                **other_evidence(v, leans, text),
            )
        )
    return dec.verdict, checks


def competence(beh: Mapping[str, Any], conf: float) -> Check | None:
    """The ``competence`` check: the model must beat the best constant predictor on these probes.

    Chance is the largest class share of the probes (what always answering the most
    frequent class scores), not ``1 / classes``. INCONCLUSIVE when every probe gets the
    same prediction, or when the accuracy's interval (Wilson, at the gate's confidence)
    does not lie above chance; PASS otherwise. None for evidence without the counts
    (reports written before the check existed, hand-built evidence).
    """
    n, correct = beh.get("n"), beh.get("correct")
    labels, predicted = beh.get("label_counts"), beh.get("predicted_counts")
    if not n or correct is None or not labels or not predicted:
        return None
    n, correct = int(n), int(correct)
    chance = max(int(v) for v in labels.values()) / n
    used = {str(c): int(k) for c, k in predicted.items() if int(k) > 0}
    present = [str(c) for c, k in labels.items() if int(k) > 0]
    low, high = stats.wilson_interval(correct, n, conf)
    pct = round(100 * conf)
    acc = correct / n
    nums = {
        "accuracy": acc,
        "low": low,
        "high": high,
        "n": n,
        "correct": correct,
        "chance": chance,
        "predicted_classes": len(used),
        "constant": len(used) == 1,
    }
    if len(used) == 1:
        (only,) = used
        tail = (
            f"; the probes hold class '{present[0]}' only, so add probes of the other classes"
            if len(present) == 1
            else ""
        )
        return Check(
            "competence",
            "competence",
            "INCONCLUSIVE",
            f"the model predicts '{only}' for every probe ({n} of {n}): its accuracy per context "
            f"says nothing about what it relies on, and a constant model is never promoted{tail}",
            nums,
        )
    ci = f"{pct}% CI {low:.2f} to {high:.2f}"
    if low > chance:
        return Check(
            "competence",
            "competence",
            "PASS",
            f"accuracy {acc:.2f} ({correct}/{n}, {ci}) is above chance: {chance:.2f}, the share of the "
            f"largest class, what always answering it would score",
            nums,
        )
    where = "below" if high < chance else "not clearly above"
    return Check(
        "competence",
        "competence",
        "INCONCLUSIVE",
        f"accuracy {acc:.2f} ({correct}/{n}, {ci}) is {where} chance {chance:.2f} (the share "
        f"of the largest class, what always answering it would score): a model that does not beat a "
        f"constant guess shows nothing about what it relies on, and is never promoted",
        nums,
    )
