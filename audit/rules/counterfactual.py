"""Synthesized counterfactuals (masks only): how often swapping only the background flips the prediction.

The evidence (``raw["synthesized"]``, :func:`audit.evidence.counterfactual.measure`) holds, per
object, the predictions on its original probe, on its Mixed-Same image (pasted onto the
hole-filled background of another probe of its class) and on its Mixed-Rand image
(another class's background). Per class, a *flip* is an object whose Mixed-Same and
Mixed-Rand predictions differ: the same object, both images pasted (paste artifacts
cancel), only the background changed. Unlike Xiao et al.'s accuracy gap (Mixed-Same
minus Mixed-Rand accuracy) it sees a context reader even when every class is seen in
every context equally often.

PASS when every class's one-sided upper bound (Wilson) lies below ``flip_rate.fail``
(intersection-union) and every class of the probe set has objects; FAIL when some
class's lower bound lies above ``flip_rate.pass`` (Holm over the classes);
INCONCLUSIVE otherwise, with the objects that would decide (:func:`audit.engine.stats.decide_rates`
states the guarantees). The accuracies on original, Mixed-Same and Mixed-Rand images
corroborate (``Check.support``) when their background gap agrees with the class's verdict
(above ``flip_rate.pass`` for a FAIL, within it for a PASS), are shown as pointing the
other way (``Check.against``) beside a PASS with a gap above it, are left out beside a
FAIL without one (the gap is blind to contexts the classes share), and never decide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from audit.engine import stats
from audit.rules.base import Check, Outcome, other_evidence

__all__ = ["judge", "per_class"]

KIND = "counterfactual"

BLIND_SPOT = (
    "what the synthesized counterfactuals cannot see: a cue inside the object mask (a watermark, a stamp or a "
    "texture on the object itself) is pasted with the object into every synthesized image, so it never changes "
    "between the two backgrounds and its use is not measured; nor is a cue that every background shares"
)


def judge(
    syn: Mapping[str, Any] | None,
    gate: Mapping[str, Any],
    methods: Mapping[str, Any],
    usable: Sequence[str],
) -> Outcome:
    """The flip-rate checks per class and their verdict (None without the evidence or without objects).

    ``methods`` and ``usable`` are part of every judge's signature; this evidence does
    not use them (the attribution veto of :mod:`audit.rules.combine` still applies).
    """
    if not syn:
        return Outcome(None)
    counts = per_class(syn)
    checks = [_objects_check(syn, counts)]
    if not counts:
        return Outcome(None, checks)
    conf = float(gate["confidence"])
    f_fail, f_pass = float(gate["flip_rate"]["fail"]), float(gate["flip_rate"]["pass"])
    names = list(counts)
    dec = stats.decide_rates(
        [counts[c]["flips"] for c in names], [counts[c]["n"] for c in names], f_fail, f_pass, conf
    )
    for j, cls in enumerate(names):
        checks.append(_class_check(cls, counts[cls], dec, j, f_fail, f_pass, conf))
    missing = [
        str(c)
        for c, k in zip(syn.get("classes") or [], syn.get("class_counts") or [], strict=False)
        if int(k) > 0 and c not in counts
    ]
    verdict = dec.verdict
    if missing and verdict == "PASS":
        verdict = "INCONCLUSIVE"
    if missing:
        checks.append(
            Check(
                "synthesized/missing",
                KIND,
                "INCONCLUSIVE" if dec.verdict != "FAIL" else None,
                f"no object of class {', '.join(repr(c) for c in missing)} could be pasted (empty or too "
                f"large masks, or no background to draw), so its flip rate is not measured and the "
                f"synthesized counterfactuals cannot PASS",
                {"classes": missing},
            )
        )
    checks.append(Check("synthesized/blind_spot", KIND, None, BLIND_SPOT))
    return Outcome(verdict, checks)


def per_class(syn: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Per class with objects: ``n`` objects, ``flips``, and correct predictions on the
    ``original``, ``same`` (Mixed-Same) and ``rand`` (Mixed-Rand) images; in class order."""
    classes = [str(c) for c in syn.get("classes") or []]
    labels = [int(x) for x in syn.get("labels") or []]
    orig, same, rand = ([int(x) for x in syn.get(k) or []] for k in ("original", "same", "rand"))
    if not len(labels) == len(orig) == len(same) == len(rand):
        raise ValueError(
            f"synthesized evidence: labels, original, same and rand must have one entry per object; got "
            f"{len(labels)}, {len(orig)}, {len(same)}, {len(rand)}"
        )
    bad = next((i for i, y in enumerate(labels) if not 0 <= y < len(classes)), None)
    if bad is not None:
        raise ValueError(
            f"synthesized evidence: object {bad} has label {labels[bad]}, which is not an index into its "
            f"{len(classes)} classes; the report was altered or is from another tool: re-run the audit"
        )
    out: dict[str, dict[str, int]] = {}
    for y, o, s, r in sorted(zip(labels, orig, same, rand, strict=True), key=lambda t: t[0]):
        name = classes[y]
        c = out.setdefault(name, {"n": 0, "flips": 0, "original": 0, "same": 0, "rand": 0})
        c["n"] += 1
        c["flips"] += int(s != r)
        c["original"] += int(o == y)
        c["same"] += int(s == y)
        c["rand"] += int(r == y)
    return out


def _objects_check(syn: Mapping[str, Any], counts: Mapping[str, Mapping[str, int]]) -> Check:
    """What was synthesized and what was skipped (informs, never votes)."""
    skipped = {k: int(v) for k, v in (syn.get("skipped") or {}).items()}
    n = sum(c["n"] for c in counts.values())
    probes = sum(int(k) for k in syn.get("class_counts") or [])
    share = float(syn.get("max_object_share", 0.5))
    why = {
        "empty": "with an empty mask",
        "too_large": f"whose mask covers more than {share:.0%} of the image",
        "no_background": "without another probe of their class, or of another class, to take a background from",
        "over_cap": f"over the cap engine.synthesized_probes={syn.get('limit')}",
    }
    parts = [f"{skipped[k]} {why[k]}" for k in why if skipped.get(k)]
    told = f"; skipped: {'; '.join(parts)}" if parts else "; none skipped"
    if not n:
        return Check(
            "synthesized",
            KIND,
            None,
            f"no object could be pasted onto another probe's background ({probes} probes{told}), so no "
            f"counterfactual was synthesized",
            {"objects": 0, "probes": probes, "skipped": skipped},
        )
    return Check(
        "synthesized",
        KIND,
        None,
        f"{n} objects of {probes} probes were each pasted, at their own position, onto the hole-filled "
        f"background of another probe of their class (Mixed-Same) and of a probe of another class "
        f"(Mixed-Rand), backgrounds drawn with seed {syn.get('seed')}{told}",
        {"objects": n, "probes": probes, "skipped": skipped},
    )


def _class_check(
    cls: str,
    c: Mapping[str, int],
    dec: stats.RateDecision,
    j: int,
    f_fail: float,
    f_pass: float,
    conf: float,
) -> Check:
    k, n = c["flips"], c["n"]
    pct = round(100 * conf)
    m = len(dec.classes)
    v = dec.classes[j]
    head = (
        f"pasting each {cls} onto other probes' backgrounds flips the prediction for {k} of {n} objects between a "
        f"background of its own class and one of another class (flip rate {k / n:.2f}, {pct}% one-sided bounds "
        f"{dec.low[j]:.2f} and {dec.high[j]:.2f}, Wilson)"
    )
    if v == "FAIL":
        tail = (
            f"; its lower bound {dec.lower[j]:.2f} at family-wise {pct}% (Holm over {m} class{'es' if m > 1 else ''}) "
            f"is clearly above the tolerated {f_pass:.2f}"
        )
    elif v == "PASS":
        every = f"; every one of the {m} classes is tested (intersection-union)" if m > 1 else ""
        tail = f"; rules out a flip rate of {f_fail:.2f}{every}"
    else:
        need = stats.min_objects_for_rate(k / n, f_fail, f_pass, conf, comparisons=m)
        tail = (
            f"; the bounds neither rule out a flip rate of {f_fail:.2f} nor show one above {f_pass:.2f}: about "
            f"{need} objects of {cls} would decide a flip rate of {k / n:.2f} with 90% probability"
        )
    acc = {x: c[x] / n for x in ("original", "same", "rand")}
    support = (
        f"accuracy on the {n} {cls} objects: original {acc['original']:.2f} ({c['original']}/{n}), Mixed-Same "
        f"{acc['same']:.2f} ({c['same']}/{n}), Mixed-Rand {acc['rand']:.2f} ({c['rand']}/{n}); background gap "
        f"(Mixed-Same minus Mixed-Rand, Xiao et al. 2020) {acc['same'] - acc['rand']:+.2f}, blind to contexts "
        f"shared by the classes; paste control (original minus Mixed-Same) {acc['original'] - acc['same']:+.2f}"
    )
    nums = {
        "flip_rate": k / n,
        "flips": k,
        "objects": n,
        "low": dec.low[j],
        "high": dec.high[j],
        "holm_low": dec.lower[j],
        "holm_level": dec.level[j],
        "classes": m,
        "fail": f_fail,
        "pass": f_pass,
        "accuracy_original": acc["original"],
        "accuracy_same": acc["same"],
        "accuracy_rand": acc["rand"],
        "bg_gap": acc["same"] - acc["rand"],
        "paste_gap": acc["original"] - acc["same"],
    }
    # a background gap above flip_rate.pass shows the context at work; a small one agrees with a
    # PASS, but is no sign against a FAIL (it is blind to contexts the classes share)
    gap = acc["same"] - acc["rand"]
    leans = True if gap > f_pass else False if v == "PASS" and abs(gap) <= f_pass else None
    return Check(
        f"synthesized/{cls}", KIND, v, head + tail, nums, **other_evidence(v, leans, support)
    )
