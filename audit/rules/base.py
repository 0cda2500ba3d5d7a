"""What every evidence rule shares: the :class:`Check` it returns and the number helpers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from audit.engine import stats

__all__ = [
    "Check",
    "Outcome",
    "other_evidence",
    "plain_numbers",
    "finite",
    "max_defined",
    "label",
    "fmt",
    "mean_ci",
]


@dataclass
class Check:
    """One piece of evidence and what it says.

    Attributes:
        name: e.g. ``context_gap/wolf``, ``flip_rate``, ``attribution/gradcam``,
            ``faithfulness/lrp``, ``sanity/saliency``, ``clusters/wolf``.
        kind: ``behaviour``, ``attribution``, ``faithfulness``, ``sanity``, ``clusters``.
        verdict: PASS / FAIL / INCONCLUSIVE for a check that votes; None for one that
            only informs (a filter, a corroborating number).
        finding: the sentence, with its numbers.
        numbers: the numbers behind it.
        decisive: whether this check's verdict entered the final verdict.
        support: numbers from other evidence that agree with ``verdict``, shown below the
            finding as corroborating (never part of it: a decisive reason holds only what
            decided).
        against: numbers from other evidence that point the other way (e.g. maps that put
            the relevance on the object beside a behavioural FAIL), shown as such, never as
            corroborating. See :func:`other_evidence`.
    """

    name: str
    kind: str
    verdict: str | None
    finding: str
    numbers: dict[str, Any] = field(default_factory=dict)
    decisive: bool = False
    support: str = ""
    against: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "verdict": self.verdict,
            "decisive": self.decisive,
            "finding": self.finding,
            "numbers": plain_numbers(self.numbers),
            "support": self.support,
            "against": self.against,
        }


@dataclass
class Outcome:
    """What one kind of evidence says on its own.

    Attributes:
        verdict: PASS / FAIL / INCONCLUSIVE when this evidence can decide the audit,
            None when it is absent or only informs.
        checks: its checks, in the order the report lists them.
    """

    verdict: str | None
    checks: list[Check] = field(default_factory=list)


def other_evidence(verdict: str | None, leans_spurious: bool | None, text: str) -> dict[str, str]:
    """Where a line of other evidence goes on a check of ``verdict``: ``{"support": text}`` when
    it agrees, ``{"against": text}`` when it points the other way, ``{}`` when it says neither.

    A line *leans spurious* (True) when it shows reliance on the context (e.g. relevance
    outside the object beyond its area), the other way (False) when it shows reliance on
    the object, and neither (None) when its parts disagree. It agrees with a FAIL when it
    leans spurious and with a PASS when it leans the other way; an INCONCLUSIVE (or no
    verdict) has nothing to corroborate, so the line is left out (its numbers stay in
    their own check).

    Use it as ``Check(..., **other_evidence(v, leans, text))``.
    """
    if not text or leans_spurious is None or verdict not in ("PASS", "FAIL"):
        return {}
    agrees = leans_spurious == (verdict == "FAIL")
    return {"support": text} if agrees else {"against": text}


def plain_numbers(obj: Any) -> Any:
    """JSON-safe copy: tensors to lists, NaN/Inf to None, tuples to lists."""
    if isinstance(obj, Mapping):
        return {str(k): plain_numbers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_numbers(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return plain_numbers(obj.detach().cpu().tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    try:
        f = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return f if math.isfinite(f) else None


def finite(x: Any) -> float | None:
    """``float(x)``, or None for None, NaN and Inf (a report stores NaN as null)."""
    if x is None or isinstance(x, bool):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def max_defined(*values: float | None) -> float:
    """The largest of the values that are neither None nor NaN; NaN when none is."""
    defined = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return max(defined) if defined else math.nan


def label(method: str) -> str:
    return {"gradcam": "Grad-CAM", "lrp": "LRP", "saliency": "saliency"}.get(method, method)


def fmt(x: float) -> str:
    return "undefined" if x is None or math.isnan(x) else f"{x:.2f}"


def mean_ci(values: Sequence[float], conf: float) -> tuple[float, float, float, int] | None:
    v = torch.tensor([x for x in values if x is not None and math.isfinite(x)], dtype=torch.float64)
    n = int(v.numel())
    if n == 0:
        return None
    mean = float(v.mean())
    if n < 2:
        return mean, -math.inf, math.inf, n
    half = stats.z_value(conf) * float(v.std(unbiased=True)) / math.sqrt(n)
    return mean, mean - half, mean + half, n
