"""Uncertainty for the gate: score intervals for accuracies and for context gaps.

Accuracies measured on a few dozen probes per group are noisy, so the gate decides
from confidence intervals, not from point estimates.

* :func:`wilson_interval`: Wilson score interval for one proportion ``k/n``
  (Newcombe 1998a, method 3).
* :func:`difference_interval`: Newcombe's hybrid score interval for ``p1 - p2`` of
  two independent proportions (Newcombe 1998b, method 10). Unlike the Wald
  interval it stays inside ``[-1, 1]`` and is sensible at ``0/n`` and ``n/n``.
* :class:`GapEstimate`: a context gap (best context minus worst context of one class)
  with its interval; :func:`classify_gap` turns it into PASS / FAIL / INCONCLUSIVE.
* :func:`min_probes_for`: probes per group needed to decide at a given gap.

The decision rule (:func:`classify_gap`) with ``pass_gap < fail_gap``:

* FAIL when the interval's low end exceeds ``pass_gap``: the gap is larger than a
  tolerable one. For a true gap <= ``pass_gap`` this happens with probability at
  most ``(1 - confidence) / 2``.
* PASS when the interval's high end is below ``fail_gap``: a spurious-sized gap is
  ruled out. For a true gap >= ``fail_gap`` this happens with probability at most
  ``(1 - confidence) / 2``.
* INCONCLUSIVE otherwise: the interval is too wide to tell (too few probes).
  When both hold (the whole interval lies between the two thresholds) FAIL wins:
  the gap is measurably above tolerance, which a promotion gate must not wave through.

Multiple comparisons: the best and worst context of a class are chosen after
looking at the data, and the gate looks at several classes. :meth:`GapEstimate.from_counts`
takes ``comparisons`` and widens each interval with Bonferroni's correction
(confidence ``1 - (1 - confidence) / comparisons``). Use ``m * (m - 1) / 2`` pairs for
a class with ``m`` contexts, summed over classes (:func:`comparisons_for`): the
intervals then hold simultaneously for every pair, so also for the pair picked
as (best, worst), and the error bounds above hold for the whole verdict.

References:
    R. G. Newcombe (1998a), Two-sided confidence intervals for the single proportion:
    comparison of seven methods. Statistics in Medicine 17, 857-872.
    R. G. Newcombe (1998b), Interval estimation for the difference between independent
    proportions: comparison of eleven methods. Statistics in Medicine 17, 873-890.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

__all__ = [
    "z_value",
    "bonferroni",
    "wilson_interval",
    "difference_interval",
    "GapEstimate",
    "classify_gap",
    "combine_verdicts",
    "comparisons_for",
    "gap_estimates",
    "min_probes_for",
    "describe_probes_needed",
]

Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE"]


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(
            f"confidence must lie strictly between 0 and 1 (e.g. 0.95); got {confidence}"
        )


def _check_counts(k: int, n: int, what: str = "k/n") -> None:
    if n <= 0:
        raise ValueError(
            f"{what}: n must be a positive count of probes; got n={n} (a group with no probes has no accuracy)"
        )
    if not 0 <= k <= n:
        raise ValueError(f"{what}: k must lie in 0..n; got k={k}, n={n}")


def z_value(confidence: float) -> float:
    """Two-sided standard normal quantile: ``z`` with ``P(|Z| <= z) = confidence``."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def bonferroni(confidence: float, comparisons: int) -> float:
    """Per-comparison confidence ``1 - (1 - confidence) / comparisons`` (family-wise level kept)."""
    _check_confidence(confidence)
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1; got {comparisons}")
    return 1.0 - (1.0 - confidence) / comparisons


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson interval of an observed proportion ``p`` of ``n`` trials (``n`` may be fractional)."""
    z2 = z * z
    half = z * math.sqrt(z2 + 4.0 * n * p * (1.0 - p))
    denom = 2.0 * (n + z2)
    low = 0.0 if p <= 0.0 else max(0.0, (2 * n * p + z2 - half) / denom)
    high = 1.0 if p >= 1.0 else min(1.0, (2 * n * p + z2 + half) / denom)
    return low, high


def _newcombe(p1: float, n1: float, p2: float, n2: float, z: float) -> tuple[float, float]:
    l1, u1 = _wilson(p1, n1, z)
    l2, u2 = _wilson(p2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, low), min(1.0, high)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion.

    ``(2k + z^2 -+ z * sqrt(z^2 + 4 k (n - k) / n)) / (2 (n + z^2))``, clipped to ``[0, 1]``
    (exactly 0 at ``k = 0`` and 1 at ``k = n``), ``z`` the two-sided normal quantile.

    Args:
        k: successes (e.g. correct predictions).
        n: trials (probes), > 0.
        confidence: two-sided confidence level in (0, 1).

    Returns:
        ``(low, high)``.
    """
    _check_counts(k, n)
    return _wilson(k / n, n, z_value(confidence))


def difference_interval(
    k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for ``p1 - p2``.

    With ``(l_i, u_i)`` the Wilson intervals of ``p_i = k_i / n_i`` and ``d = p1 - p2``::

        low  = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)
        high = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)

    Args:
        k1: successes of the first sample.
        n1: size of the first sample (> 0).
        k2: successes of the second sample.
        n2: size of the second sample (> 0).
        confidence: two-sided confidence level in (0, 1).

    Returns:
        ``(low, high)`` within ``[-1, 1]``.
    """
    _check_counts(k1, n1, "k1/n1")
    _check_counts(k2, n2, "k2/n2")
    return _newcombe(k1 / n1, n1, k2 / n2, n2, z_value(confidence))


@dataclass(frozen=True)
class GapEstimate:
    """A context gap: accuracy in the best context minus accuracy in the worst one.

    Attributes:
        best: ``(correct, n)`` in the best context.
        worst: ``(correct, n)`` in the worst context.
        gap: point estimate ``k_b / n_b - k_w / n_w``.
        low: low end of the interval of the gap.
        high: high end of the interval of the gap.
        confidence: the family-wise confidence asked for.
        comparisons: the Bonferroni divisor used for this interval.
    """

    best: tuple[int, int]
    worst: tuple[int, int]
    gap: float
    low: float
    high: float
    confidence: float
    comparisons: int = 1

    @classmethod
    def from_counts(
        cls,
        k_best: int,
        n_best: int,
        k_worst: int,
        n_worst: int,
        confidence: float = 0.95,
        comparisons: int = 1,
    ) -> GapEstimate:
        """The gap and its Newcombe interval at Bonferroni-corrected confidence."""
        per = bonferroni(confidence, comparisons)
        low, high = difference_interval(k_best, n_best, k_worst, n_worst, per)
        return cls(
            best=(k_best, n_best),
            worst=(k_worst, n_worst),
            gap=k_best / n_best - k_worst / n_worst,
            low=low,
            high=high,
            confidence=confidence,
            comparisons=comparisons,
        )

    def __str__(self) -> str:
        pct = round(100 * self.confidence)
        return f"gap {self.gap:.2f} ({pct}% CI {self.low:.2f} to {self.high:.2f})"


def _check_thresholds(fail_gap: float, pass_gap: float) -> None:
    if not 0.0 <= pass_gap < fail_gap <= 1.0:
        raise ValueError(
            f"need 0 <= pass_gap < fail_gap <= 1; got pass_gap={pass_gap}, fail_gap={fail_gap} "
            f"(e.g. pass_gap=0.05, fail_gap=0.15)"
        )


def classify_gap(estimate: GapEstimate, fail_gap: float = 0.15, pass_gap: float = 0.05) -> Verdict:
    """PASS, FAIL or INCONCLUSIVE for one gap (rule in the module docstring).

    Args:
        estimate: the gap with its interval.
        fail_gap: the smallest gap that counts as leaning on the context.
        pass_gap: the largest gap that is tolerated.

    Returns:
        ``"FAIL"`` if ``low > pass_gap``; else ``"PASS"`` if ``high < fail_gap``;
        else ``"INCONCLUSIVE"``.
    """
    _check_thresholds(fail_gap, pass_gap)
    if estimate.low > pass_gap:
        return "FAIL"
    if estimate.high < fail_gap:
        return "PASS"
    return "INCONCLUSIVE"


def combine_verdicts(verdicts: Iterable[Verdict]) -> Verdict:
    """FAIL if any is FAIL; PASS if all (at least one) are PASS; INCONCLUSIVE otherwise."""
    seen = list(verdicts)
    if not seen:
        return "INCONCLUSIVE"
    if "FAIL" in seen:
        return "FAIL"
    return "PASS" if all(v == "PASS" for v in seen) else "INCONCLUSIVE"


def comparisons_for(contexts_per_class: Iterable[int]) -> int:
    """Bonferroni divisor: ``sum m (m - 1) / 2`` over classes with ``m >= 2`` contexts (at least 1)."""
    return max(1, sum(m * (m - 1) // 2 for m in contexts_per_class if m >= 2))


def gap_estimates(
    accuracies: Mapping[str, object], confidence: float = 0.95
) -> dict[str, GapEstimate]:
    """A :class:`GapEstimate` per class from :func:`audit.behaviour.group_accuracy` output.

    The (best, worst) contexts are those of :func:`audit.behaviour.context_gaps`; the
    Bonferroni divisor counts every context pair of every class (:func:`comparisons_for`).

    Args:
        accuracies: group name (``"class|context"``) -> ``GroupAccuracy``.
        confidence: family-wise confidence over all classes.
    """
    from audit.behaviour import context_gaps, split_group

    per_class: dict[str, int] = {}
    for name in accuracies:
        cls = split_group(name)[0]
        per_class[cls] = per_class.get(cls, 0) + 1
    m = comparisons_for(per_class.values())
    out = {}
    for cls, (worst, best) in context_gaps(dict(accuracies)).items():
        out[cls] = GapEstimate.from_counts(
            best.correct, best.n, worst.correct, worst.n, confidence, m
        )
    return out


def min_probes_for(
    gap: float,
    fail_gap: float = 0.15,
    pass_gap: float = 0.05,
    best_accuracy: float = 0.95,
    confidence: float = 0.95,
    power: float = 0.9,
    comparisons: int = 1,
) -> int:
    """Probes per group (both contexts) so that a true ``gap`` is decided with probability ~``power``.

    A gap above ``pass_gap`` should FAIL (a precisely measured gap between the
    thresholds FAILs, see :func:`classify_gap`), one at or below it should PASS. The search plugs an unlucky but
    plausible outcome into the real interval of :func:`classify_gap`: the observed gap
    is off by ``z * sigma``, ``sigma = sqrt((p_b q_b + p_w q_w) / n)``, ``p_b =
    best_accuracy``, ``p_w = best_accuracy - gap``, with ``z = z_power`` towards PASS for
    a FAIL and ``z = z_{(1 + power) / 2}`` towards FAIL for a PASS (the best context is
    picked after the fact, which biases the observed gap upwards). The smallest ``n``
    whose unlucky outcome is still decided is returned. It is an approximation; the
    simulation test checks it.

    Args:
        gap: the true gap to decide.
        fail_gap: the smallest gap that counts as leaning on the context.
        pass_gap: the largest gap that is tolerated.
        best_accuracy: expected accuracy in the best context.
        confidence: family-wise confidence of the intervals.
        power: wanted probability of the right decision.
        comparisons: the Bonferroni divisor of the intervals.

    Returns:
        Probes per group.
    """
    _check_thresholds(fail_gap, pass_gap)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie strictly between 0 and 1 (e.g. 0.9); got {power}")
    if not 0.0 <= gap <= best_accuracy <= 1.0:
        raise ValueError(
            f"need 0 <= gap <= best_accuracy <= 1; got gap={gap}, best_accuracy={best_accuracy}"
        )
    z = z_value(bonferroni(confidence, comparisons))
    p_b, p_w = best_accuracy, best_accuracy - gap
    var = p_b * (1 - p_b) + p_w * (1 - p_w)
    if gap > pass_gap:
        return _search_n(p_b, p_w, var, -NormalDist().inv_cdf(power), z, "FAIL", fail_gap, pass_gap)
    shift = NormalDist().inv_cdf(0.5 + power / 2)
    return _search_n(p_b, p_w, var, shift, z, "PASS", fail_gap, pass_gap)


def _search_n(
    p_b: float,
    p_w: float,
    var: float,
    shift: float,
    z: float,
    want: str,
    fail_gap: float,
    pass_gap: float,
) -> int:
    """Smallest n whose outcome shifted by ``shift * sigma`` is classified ``want``."""

    def decided(n: int) -> bool:
        delta = shift * math.sqrt(var / n)
        ob = min(1.0, max(0.0, p_b + delta / 2))
        ow = min(1.0, max(0.0, p_w - delta / 2))
        low, high = _newcombe(ob, n, ow, n, z)
        return low > pass_gap if want == "FAIL" else high < fail_gap

    hi = 1
    while not decided(hi):
        hi *= 2
        if hi > 10_000_000:
            raise ValueError(
                "no probe count up to 10 million decides this gap; check the thresholds"
            )
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if decided(mid):
            hi = mid
        else:
            lo = mid
    return hi


def describe_probes_needed(
    estimate: GapEstimate, fail_gap: float = 0.15, pass_gap: float = 0.05
) -> str:
    """A sentence for an INCONCLUSIVE finding: the interval and the probes per group that would decide."""
    n_now = min(estimate.best[1], estimate.worst[1])
    best_acc = estimate.best[0] / estimate.best[1]
    gap = min(max(estimate.gap, 0.0), best_acc)
    need = min_probes_for(
        gap, fail_gap, pass_gap, best_acc, estimate.confidence, comparisons=estimate.comparisons
    )
    return (
        f"{estimate} is too wide to tell a gap below {pass_gap:.2f} from one above {fail_gap:.2f} "
        f"with {n_now} probes per group; about {need} probes per group would decide a gap of "
        f"{gap:.2f} with 90% probability"
    )
