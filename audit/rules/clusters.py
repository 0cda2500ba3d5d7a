"""Labels-only evidence: the maps of each class clustered (SpRAy) for a human to review.

It never decides: with labels only, the gate says INCONCLUSIVE rather than guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from audit.rules.base import Check, label

__all__ = ["checks"]


def checks(clusters: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> list[Check]:
    """One informing check per class and method with its cluster sizes."""
    out = []
    for m, cs in (clusters or {}).items():
        out.extend(Check(f"clusters/{m}", "clusters", None, line) for line in _cluster_lines(m, cs))
    return out


def _cluster_lines(method: str, clusters: Sequence[Mapping[str, Any]]) -> list[str]:
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for c in clusters:
        by_class.setdefault(str(c["class_name"]), []).append(c)
    lines = []
    for cls, cs in by_class.items():
        sizes = ", ".join(str(int(c["size"])) for c in cs)
        lines.append(
            f"{label(method)} maps of class {cls} fall into {len(cs)} cluster(s) of sizes {sizes}; "
            f"review the cluster means in the report"
        )
    return lines
