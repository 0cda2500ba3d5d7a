"""The combination rule: the checks of every kind of evidence -> one verdict.

Each kind of evidence lives in its own module of :mod:`audit.rules` and returns an
:class:`~audit.rules.base.Outcome` (its checks, and a verdict when it can decide).
This module is the only place that weighs them against each other:

1. **Filters** pick the methods whose maps count as evidence: faithful
   (:mod:`~audit.rules.faithfulness`) and sane (:mod:`~audit.rules.sanity`).
2. **The deciding evidence** is the first present of, in this order: context gaps
   within classes (:mod:`~audit.rules.behaviour`, groups), the flip rate of
   counterfactual pairs (:mod:`~audit.rules.pairs`, pairs without groups), the
   synthesized counterfactuals (:mod:`~audit.rules.counterfactual`, masks only) and the
   attribution excess (:mod:`~audit.rules.attribution`, masks only; FAIL or
   INCONCLUSIVE, never PASS). Behaviour outranks attribution because it measures what
   the model does when the context changes; a map only shows where relevance lies.
3. **Vetoes**: a behavioural PASS becomes INCONCLUSIVE when the usable methods
   clearly put the relevance off the object (``attribution.veto``); any verdict but
   FAIL becomes INCONCLUSIVE when the model does not beat a constant guess
   (``competence``).
4. Without any deciding evidence the verdict is INCONCLUSIVE; with labels only, the
   maps' clusters (:mod:`~audit.rules.clusters`) are listed for review.

A registered extra kind of evidence (:func:`audit.evidence.register_kind`) needs no
edit here: :func:`extra_checks` adds its checks, corroborating only (they never
decide); a raw block of a kind that is not registered is named in a check and left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from audit.evidence import BUILTIN_KINDS, get_kind
from audit.rules import (
    attribution,
    behaviour,
    clusters,
    concepts,
    counterfactual,
    dissection,
    faithfulness,
    pairs,
    sanity,
)
from audit.rules.base import Check, Outcome

__all__ = ["decide", "usable_methods", "extra_checks", "DECIDERS", "UNREGISTERED"]

# the kinds of evidence that can decide, first present wins (see the module docstring)
DECIDERS = ("behaviour", "pairs", "synthesized", "attribution")

#: the kind of the check that names a raw block of a kind not registered here
UNREGISTERED = "unregistered"


def usable_methods(
    methods: Mapping[str, Mapping[str, Any]], gate: Mapping[str, Any]
) -> tuple[list[str], list[Check]]:
    """The methods that count as evidence (faithful and sane), and the filter checks."""
    usable: list[str] = []
    checks: list[Check] = []
    limit = float(gate["sanity"]["max_similarity"])
    for m, e in methods.items():
        if "error" in e:
            checks.append(
                Check(
                    f"faithfulness/{m}",
                    "faithfulness",
                    None,
                    f"{m} is not used as evidence: it failed ({e['error']})",
                    {"used": False},
                )
            )
            continue
        faithful = faithfulness.check(m, e, gate)
        checks.append(faithful)
        ok = bool(faithful.numbers.get("used"))
        sane = sanity.check(m, e, limit)
        if sane is not None:
            checks.append(sane)
            ok = ok and bool(sane.numbers.get("used"))
        if ok:
            usable.append(m)
    if methods:
        checks.append(
            Check(
                "methods",
                "summary",
                None,
                f"methods used as evidence: {', '.join(usable) if usable else 'none'} (of {', '.join(methods)})",
                {"used": list(usable)},
            )
        )
    return usable, checks


def extra_checks(raw: Mapping[str, Any], gate: Mapping[str, Any]) -> list[Check]:
    """The checks of the registered extra kinds whose raw blocks ``raw`` holds, in its order.

    A kind without a ``judge`` only records its numbers. A block of a kind that is not
    registered here (a report made where it was) gets one check of kind
    :data:`UNREGISTERED` saying the verdict is judged without it.

    Raises:
        TypeError: a kind's judge returned something other than checks of its own kind.
    """
    out: list[Check] = []
    for name, block in raw.items():
        if name in BUILTIN_KINDS:
            continue
        kind = get_kind(name)
        if kind is None:
            out.append(
                Check(
                    f"{UNREGISTERED}/{name}",
                    UNREGISTERED,
                    None,
                    f"the evidence {name!r} is of a kind not registered here, so it is judged without it "
                    f"(register it with audit.evidence.register_kind to judge it)",
                )
            )
            continue
        for c in kind.judge(block, gate) if kind.judge is not None else []:
            if not isinstance(c, Check) or c.kind != name:
                raise TypeError(
                    f"the judge of evidence kind {name!r} returned {c!r}: return audit.rules.Check objects of kind {name!r}"
                )
            out.append(c)
    return out


def decide(raw: Mapping[str, Any], gate: Mapping[str, Any]) -> tuple[str, list[Check]]:
    """The verdict and its checks from plain evidence numbers (the ``evidence`` block of a report).

    Args:
        raw: ``behaviour`` (``n``, ``correct``, ``label_counts``, ``predicted_counts``,
            ``chance``, counts per group, paired tables, flipped pairs), ``methods``
            (per-probe deletion AUCs and references, outside shares and areas, sanity
            numbers), ``synthesized`` (counterfactuals built from the masks),
            ``clusters``.
        gate: the gate thresholds (``conf/gate/default.yaml``).

    Returns:
        ``(verdict, checks)``; the checks that decided have ``decisive=True``.
    """
    beh = raw.get("behaviour", {})
    methods = raw.get("methods", {})
    usable, checks = usable_methods(methods, gate)

    attr = attribution.judge(methods, usable, gate)
    outcomes: dict[str, Outcome] = {"attribution": attr}
    outcomes["behaviour"] = behaviour.judge(beh, gate, attribution.support(methods, usable))
    outcomes["pairs"] = pairs.judge(beh, gate, decides=outcomes["behaviour"].verdict is None)
    outcomes["synthesized"] = counterfactual.judge(raw.get("synthesized"), gate, methods, usable)
    for kind in ("attribution", "behaviour", "pairs", "synthesized"):
        checks.extend(outcomes[kind].checks)
    checks.extend(concepts.check(raw.get("tcav"), gate))  # informs only: TCAV never votes
    checks.extend(
        dissection.check(raw.get("dissection"), gate)
    )  # informs only: dissection never votes
    checks.extend(extra_checks(raw, gate))  # registered extra kinds: corroborate, never vote
    competence = behaviour.competence(beh, float(gate["confidence"]))
    if competence is not None:
        checks.append(competence)

    decider = next((k for k in DECIDERS if outcomes[k].verdict is not None), None)
    if decider is not None:
        verdict, decisive = str(outcomes[decider].verdict), [decider]
    else:
        verdict, decisive = "INCONCLUSIVE", []
        checks.extend(clusters.checks(raw.get("clusters")))
        only_labels = not (
            beh.get("groups")
            or beh.get("pairs")
            or any("outside_share" in e for e in methods.values())
        )
        reason = (
            "the probe set has only labels (no masks, groups or pairs): the attribution maps are clustered "
            "per class for review, and the gate does not guess"
            if only_labels
            else "no usable evidence: no faithful and sane attribution method, and no groups or pairs to measure behaviour"
        )
        checks.insert(
            0, Check("verdict", "summary", "INCONCLUSIVE", f"INCONCLUSIVE: {reason}", decisive=True)
        )
    if (
        verdict == "PASS"
        and decider != "attribution"
        and attr.verdict == "FAIL"
        and gate["attribution"]["veto"]
    ):
        verdict = "INCONCLUSIVE"
        decisive.append("attribution")
        checks.insert(
            0,
            Check(
                "veto",
                "attribution",
                "INCONCLUSIVE",
                "INCONCLUSIVE: behaviour passes, but the faithful attribution methods put clearly more relevance "
                "outside the object masks than their area explains; a human should look at the overlays",
                decisive=True,
            ),
        )
    if competence is not None and competence.verdict == "INCONCLUSIVE" and verdict != "FAIL":
        # vetoes a PASS (then it alone decides), and is the first reason of any other
        # INCONCLUSIVE: without it, a constant or guessing model's per-context accuracies
        # look like "no context gap"
        if verdict == "PASS":
            decisive = []
        verdict = "INCONCLUSIVE"
        decisive.append("competence")
        checks.remove(competence)
        checks.insert(0, competence)
        competence.finding = f"INCONCLUSIVE: {competence.finding}"
    kinds = {
        "behaviour": {"behaviour"},
        "pairs": {"behaviour"},
        "synthesized": {"counterfactual"},
        "attribution": {"attribution"},
        "competence": {"competence"},
    }
    # a check decides when it is of a deciding kind AND says what that evidence concluded (a FAIL
    # also explains an INCONCLUSIVE, e.g. split methods): in a FAIL of one class in ten, the nine
    # classes that PASS are not reasons for the FAIL
    said = {d: verdict if d == "competence" else outcomes[d].verdict for d in decisive}
    for c in checks:
        if c.verdict is not None and any(
            c.kind in kinds[d] and (c.verdict == v or (v, c.verdict) == ("INCONCLUSIVE", "FAIL"))
            for d, v in said.items()
        ):
            c.decisive = True
    return verdict, checks
