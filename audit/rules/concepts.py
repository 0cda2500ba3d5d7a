"""TCAV evidence (:mod:`audit.evidence.concepts`): whether a class logit moves along a context concept.

It corroborates and never votes: every check informs (``verdict=None``). One finding per
(class, concept) whose TCAV scores differ from the random concepts' (the paper's
two-sided t-test, Bonferroni over the (class, concept) tests, at the gate's
``confidence``), and one summary finding when none does. A TCAV score counts the sign
of a derivative, not its size; the findings also give the logit shift (its first-order
size) so that a consistent but tiny effect reads as one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from audit.evidence.concepts import summary
from audit.rules.base import Check

__all__ = ["check", "rows"]


def rows(block: Mapping[str, Any] | None, gate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table of a ``tcav`` evidence block (:func:`audit.evidence.concepts.summary`); [] when absent or failed."""
    if not block or "error" in block:
        return []
    return summary(block, float(gate["confidence"]))


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "p undefined"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _confounded(block: Mapping[str, Any], concept: str) -> str:
    classes = (block.get("concept_classes") or {}).get(concept) or []
    if len(classes) == 1 and len(block.get("classes") or []) > 1:
        return f"; every {concept} probe is of class {classes[0]}, so the concept is confounded with that class"
    return ""


def check(block: Mapping[str, Any] | None, gate: Mapping[str, Any]) -> list[Check]:
    """Informing checks (kind ``concepts``) from a ``tcav`` evidence block; [] without one."""
    if not block:
        return []
    if "error" in block:
        return [
            Check(
                "tcav",
                "concepts",
                None,
                f"TCAV was not computed: {block['error']}",
                {"error": block["error"]},
            )
        ]
    table = rows(block, gate)
    layer, cavs = block.get("layer"), block.get("random_concepts")
    out = []
    for r in table:
        if not r["significant"]:
            continue
        finding = (
            f"TCAV (layer {layer}): the {r['class']} logit {r['direction']} along the {r['concept']} concept: "
            f"score {r['score']:.2f} (share of {r['scored']} {r['class']} probes with a positive derivative, "
            f"mean over {cavs} CAVs against random concepts; random concepts: {r['random']:.2f} \u00b1 "
            f"{r['random_sd']:.2f}; {_p(r['p_adjusted'])}, Bonferroni over {r['tests']} tests); "
            f"first-order logit shift {r['shift']:+.2f} (random: \u00b1{r['random_shift_sd']:.2f})"
            + _confounded(block, r["concept"])
        )
        out.append(Check(f"tcav/{r['class']}/{r['concept']}", "concepts", None, finding, dict(r)))
    if not out and table:
        best = min(table, key=lambda r: r["p"] if math.isfinite(r["p"]) else math.inf)
        alpha = 1.0 - float(gate["confidence"])
        finding = (
            f"TCAV (layer {layer}, {cavs} random concepts): no class logit moves along a context concept "
            f"differently from random concepts ({len(table)} tests, Bonferroni, alpha {alpha:.2g}); closest: "
            f"{best['class']} along {best['concept']}, score {best['score']:.2f} (random {best['random']:.2f} "
            f"\u00b1 {best['random_sd']:.2f}; {_p(best['p_adjusted'])}), logit shift {best['shift']:+.2f}"
        )
        out.append(
            Check("tcav", "concepts", None, finding, {"tests": len(table), "closest": dict(best)})
        )
    return out
