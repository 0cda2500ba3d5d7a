"""Uncertainty for the gate: score intervals and the decision rule with stated error rates.

Accuracies measured on a few dozen probes per group are noisy, so the gate decides
from confidence bounds, not from point estimates.

Intervals
---------
* :func:`wilson_interval`: Wilson score interval for one proportion ``k/n``
  (Newcombe 1998a, method 3).
* :func:`difference_interval`: Newcombe's hybrid score interval for ``p1 - p2`` of two
  *independent* proportions (Newcombe 1998b, method 10).
* :func:`paired_difference_interval`: Newcombe's hybrid score interval for the
  difference of two *paired* proportions (Newcombe 1998c, method 10): the same object
  seen in two contexts. With ``a`` pairs right in both contexts, ``b`` right in the first
  only, ``c`` right in the second only and ``d`` wrong in both (``n`` pairs), the
  difference is ``(b - c) / n``; the interval combines the Wilson intervals
  ``(l1, u1)``, ``(l2, u2)`` of the two marginals ``p1 = (a + b) / n``,
  ``p2 = (a + c) / n`` with their correlation::

      low  = (p1 - p2) - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
      high = (p1 - p2) + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)

  ``phi = N / sqrt((a + b)(c + d)(a + c)(b + d))`` (0 when a margin is 0) with
  ``N = ad - bc - n/2`` when ``ad - bc > n/2``, ``N = 0`` when ``0 <= ad - bc <= n/2``
  and ``N = ad - bc`` when negative (Newcombe's continuity correction of ``phi``, which
  keeps the interval from collapsing to zero width at ``b = c = 0``). It reproduces
  the method-10 rows of the paper's table to the printed 4 decimals
  (``tests/engine/test_stats_paired.py``; e.g. ``(a, b, c, d) = (36, 12, 2, 0)`` gives
  0.0569 to 0.3404 at 95%). Chosen over Tango's (1998) score interval because it is
  closed form, so the gate and the Monte Carlo test can evaluate it on arrays of counts.

Every interval here is computed at a normal quantile ``z``; each end is then a
*one-sided* bound at level ``1 - Phi(z)``: ``z = z_{1-alpha}`` gives the two one-sided
``(1 - alpha)`` bounds the rule below needs (``alpha = 1 - confidence``).

The decision rule (:func:`decide_counts`, the one function that maps counts to a verdict)
-----------------------------------------------------------------------------------------
A *comparison* is one pair of contexts ``(A, B)`` of one class, with
``d = accuracy(A) - accuracy(B)``; a class's context gap (best minus worst context) is
``max |d|`` over its pairs of contexts. ``M`` comparisons in all (``m (m - 1) / 2`` for a
class with ``m`` contexts, summed over classes). ``fail_gap > pass_gap >= 0``.

* **PASS** needs every comparison to rule out ``|d| >= fail_gap``: its one-sided
  ``(1 - alpha)`` upper bound of ``d`` below ``fail_gap`` *and* its one-sided
  ``(1 - alpha)`` lower bound above ``-fail_gap`` (two one-sided tests, an equivalence
  test of size ``alpha``), in every comparison, with no multiplicity correction: an
  intersection-union test (Berger 1982).
* **FAIL** needs one comparison with ``|d| > pass_gap`` shown: the lower confidence bound
  of ``|d|`` (from the two-sided interval at level ``1 - alpha_j``, i.e. each end one-sided
  at ``alpha_j / 2``, because the direction of the gap is not known beforehand) above
  ``pass_gap``, with Holm's step-down levels ``alpha_j = alpha / (M - r)`` (``r``
  comparisons already shown). A class FAILs when one of its comparisons is shown; the
  verdict FAILs when a class does (a FAIL beats a PASS).
* **INCONCLUSIVE** otherwise (the bounds are too wide), with the number of probes or
  pairs that would decide (:func:`min_probes_for`, :func:`describe_probes_needed`).

Guarantees (``alpha = 1 - confidence``):

* If *any* class has a true context gap of ``fail_gap`` or more (some pair of its
  contexts with ``|d| >= fail_gap``), the probability of PASS is at most ``alpha``:
  PASS needs that comparison's one-sided test to reject, which it does with probability
  at most ``alpha`` (Berger 1982). In particular this holds when every gap is ``fail_gap``.
* If every class's true context gap is at most ``pass_gap``, the probability of FAIL is
  at most ``alpha``; more strongly (Holm 1979, strong family-wise control), whatever the
  other gaps are, the probability that *some* class whose gaps are all at most
  ``pass_gap`` is reported FAIL is at most ``alpha``.
* The best and worst contexts are picked after looking at the data; both guarantees
  cover that, because every pair of contexts is tested.

What they rest on: independent probes (independent pairs in the paired design; the
rows of one pair may be correlated in any way), and one-sided bounds whose error is at
most their nominal level. The Wilson and Newcombe score bounds are large-sample
approximations, not exact, so the guarantees are nominal; ``tests/rules/test_decision_rule_mc.py``
measures the achieved error rates by simulation at the sizes the gate meets (2 and 10
classes, 2 and 3 contexts, paired and unpaired) and checks them against ``alpha`` plus
three Monte Carlo standard errors.

The flip rate (pairs, no groups) has one comparison and one direction (a rate of flips
is never negative): PASS when its one-sided ``(1 - alpha)`` upper bound (Wilson) is below
``flip_rate.fail``, FAIL when its one-sided lower bound is above ``flip_rate.pass``
(:func:`decide_rate`); the same two guarantees hold.

Flip rates per class (the synthesized counterfactuals of a masks-only probe set,
:mod:`audit.evidence.counterfactual`) are one such rate per class, ``K`` classes:
:func:`decide_rates` PASSes when every class's one-sided upper bound is below
``flip_rate.fail`` (intersection-union, no correction) and FAILs when some class's
lower bound is above ``flip_rate.pass`` with Holm's one-sided levels ``alpha / (K - r)``;
the same two guarantees hold per class (:func:`decide_rates`).

``python -m audit.engine.stats power`` prints the probes (unpaired) and pairs (paired) per class
needed to PASS a clean model (:func:`power_table`).

References:
    R. L. Berger (1982), Multiparameter hypothesis testing and acceptance sampling.
    Technometrics 24, 295-300.
    S. Holm (1979), A simple sequentially rejective multiple test procedure.
    Scandinavian Journal of Statistics 6, 65-70.
    R. G. Newcombe (1998a), Two-sided confidence intervals for the single proportion:
    comparison of seven methods. Statistics in Medicine 17, 857-872.
    R. G. Newcombe (1998b), Interval estimation for the difference between independent
    proportions: comparison of eleven methods. Statistics in Medicine 17, 873-890.
    R. G. Newcombe (1998c), Improved confidence intervals for the difference between
    binomial proportions based on paired data. Statistics in Medicine 17, 2635-2650.
    T. Tango (1998), Equivalence test and confidence interval for the difference in
    proportions for the paired-sample design. Statistics in Medicine 17, 891-908.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

__all__ = [
    "z_value",
    "bonferroni",
    "wilson_interval",
    "difference_interval",
    "paired_difference_interval",
    "Comparison",
    "ComparisonResult",
    "GapDecision",
    "RuleResult",
    "decide_counts",
    "decide_comparisons",
    "decide_rate",
    "RateDecision",
    "decide_rates",
    "min_objects_for_rate",
    "combine_verdicts",
    "comparisons_for",
    "min_probes_for",
    "describe_probes_needed",
    "power_table",
]

Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE"]
#: verdict codes of :func:`decide_counts` (index into this tuple)
CODES: tuple[Verdict, Verdict, Verdict] = ("INCONCLUSIVE", "PASS", "FAIL")
INCONCLUSIVE, PASS, FAIL = 0, 1, 2


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


def one_sided_z(confidence: float) -> float:
    """One-sided standard normal quantile: ``z`` with ``P(Z <= z) = confidence``."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(confidence)


def bonferroni(confidence: float, comparisons: int) -> float:
    """Per-comparison confidence ``1 - (1 - confidence) / comparisons`` (family-wise level kept)."""
    _check_confidence(confidence)
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1; got {comparisons}")
    return 1.0 - (1.0 - confidence) / comparisons


# --------------------------------------------------------------------------- intervals on arrays
def _wilson(k, n, z):
    """Wilson bounds of ``k`` of ``n`` at quantile ``z`` (arrays; ``n`` may be fractional)."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.clip(k / n, 0.0, 1.0)
        z2 = z * z
        half = z * np.sqrt(z2 + 4.0 * n * p * (1.0 - p))
        denom = 2.0 * (n + z2)
        low = np.where(p <= 0.0, 0.0, np.maximum(0.0, (2 * n * p + z2 - half) / denom))
        high = np.where(p >= 1.0, 1.0, np.minimum(1.0, (2 * n * p + z2 + half) / denom))
    return p, low, high


def _phi(a, b, c, d):
    """Newcombe's (1998c) continuity-corrected phi of a paired 2x2 table (arrays)."""
    n = a + b + c + d
    num = a * d - b * c
    num = np.where(num > n / 2, num - n / 2, np.where(num >= 0, 0.0, num))
    den = (a + b) * (c + d) * (a + c) * (b + d)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)


def _bounds(counts, paired, z):
    """``(d, low, high)`` of ``d = p1 - p2`` per comparison, each bound at quantile ``z``.

    ``counts[..., 4]``: a paired row is ``(a, b, c, d)`` (Newcombe 1998c, method 10), an
    independent row ``(k1, n1, k2, n2)`` (Newcombe 1998b, method 10); ``paired`` says which
    (broadcast against ``counts[..., 0]``); ``z`` broadcasts too.
    """
    x = np.asarray(counts, dtype=float)
    x0, x1, x2, x3 = x[..., 0], x[..., 1], x[..., 2], x[..., 3]
    paired = np.asarray(paired, dtype=bool)
    n = x0 + x1 + x2 + x3
    k1 = np.where(paired, x0 + x1, x0)
    n1 = np.where(paired, n, x1)
    k2 = np.where(paired, x0 + x2, x2)
    n2 = np.where(paired, n, x3)
    z = np.asarray(z, dtype=float)
    p1, l1, u1 = _wilson(k1, n1, z)
    p2, l2, u2 = _wilson(k2, n2, z)
    phi = np.where(paired, _phi(x0, x1, x2, x3), 0.0)
    d = p1 - p2
    lo1, hi2, hi1, lo2 = p1 - l1, u2 - p2, u1 - p1, p2 - l2
    low = d - np.sqrt(np.maximum(0.0, lo1**2 - 2 * phi * lo1 * hi2 + hi2**2))
    high = d + np.sqrt(np.maximum(0.0, hi1**2 - 2 * phi * hi1 * lo2 + lo2**2))
    return d, np.maximum(-1.0, low), np.minimum(1.0, high)


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
    _, lo, hi = _wilson(k, n, z_value(confidence))
    return float(lo), float(hi)


def difference_interval(
    k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for ``p1 - p2`` of independent samples.

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
    _, lo, hi = _bounds([k1, n1, k2, n2], False, z_value(confidence))
    return float(lo), float(hi)


def paired_difference_interval(
    a: int, b: int, c: int, d: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe's hybrid score interval (1998c, method 10) for a difference of paired proportions.

    Args:
        a: pairs right (positive) in both.
        b: pairs right in the first only.
        c: pairs right in the second only.
        d: pairs wrong in both.
        confidence: two-sided confidence level in (0, 1).

    Returns:
        ``(low, high)`` of ``(b - c) / n`` within ``[-1, 1]`` (formula in the module docstring).
    """
    if min(a, b, c, d) < 0:
        raise ValueError(f"paired counts must not be negative; got a={a}, b={b}, c={c}, d={d}")
    if a + b + c + d <= 0:
        raise ValueError(
            "paired counts: n = a + b + c + d must be positive (no pairs, no difference)"
        )
    _, lo, hi = _bounds([a, b, c, d], True, z_value(confidence))
    return float(lo), float(hi)


# --------------------------------------------------------------------------- the decision rule
def _check_thresholds(fail_gap: float, pass_gap: float) -> None:
    if not 0.0 <= pass_gap < fail_gap <= 1.0:
        raise ValueError(
            f"need 0 <= pass_gap < fail_gap <= 1; got pass_gap={pass_gap}, fail_gap={fail_gap} "
            f"(e.g. pass_gap=0.05, fail_gap=0.15)"
        )


@dataclass(frozen=True)
class RuleResult:
    """What :func:`decide_counts` found, as arrays over the leading (replicate) axes.

    Attributes:
        verdict: verdict code (:data:`CODES`) ``[...]``.
        classes: verdict code per class ``[..., K]`` (INCONCLUSIVE for a class without comparisons).
        diff: ``d = p1 - p2`` per comparison ``[..., M]``.
        low: one-sided ``confidence`` lower bound of ``d`` (the PASS test) ``[..., M]``.
        high: one-sided ``confidence`` upper bound of ``d`` (the PASS test) ``[..., M]``.
        passes: ``-fail < low`` and ``high < fail`` ``[..., M]``.
        lower: lower confidence bound of ``|d|`` at the Holm level below ``[..., M]``.
        level: the Holm level ``alpha_j`` of ``lower`` (the last one the comparison was tested at).
        shown: Holm rejected ``|d| <= pass`` for the comparison ``[..., M]``.
    """

    verdict: np.ndarray
    classes: np.ndarray
    diff: np.ndarray
    low: np.ndarray
    high: np.ndarray
    passes: np.ndarray
    lower: np.ndarray
    level: np.ndarray
    shown: np.ndarray


def _holm(
    lower_at: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, ...],
    alpha: float,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Holm's step-down procedure over the last axis of ``shape`` (M hypotheses ``value <= threshold``).

    ``lower_at(r)`` gives every hypothesis's lower confidence bound at Holm's level
    ``alpha / (M - r)``, where ``r`` (shape ``[..., 1]``) is how many of its row are
    already rejected. Rounds reject every hypothesis whose bound is above ``threshold``
    until none is. Returns ``(shown, lower, level)``: rejected, the bound each was last
    tested with, and that level.
    """
    m = shape[-1]
    levels = alpha / (m - np.arange(m))
    shown = np.zeros(shape, dtype=bool)
    lower, level = np.zeros(shape), np.zeros(shape)
    for _ in range(m):
        r = np.minimum(shown.sum(axis=-1, keepdims=True), m - 1)
        lo = lower_at(r)
        lower = np.where(shown, lower, lo)
        level = np.where(shown, level, levels[r])
        new = ~shown & (lo > threshold)
        if not new.any():
            break
        shown |= new
    return shown, lower, level


def decide_counts(
    counts,
    paired,
    classes,
    fail_gap: float = 0.15,
    pass_gap: float = 0.05,
    confidence: float = 0.95,
) -> RuleResult:
    """The verdict of the context-gap rule (module docstring) from counts, vectorised.

    Args:
        counts: ``[..., M, 4]``: per comparison ``(a, b, c, d)`` when paired, else
            ``(k1, n1, k2, n2)``; leading axes are replicates (simulation) or absent.
        paired: ``[M]`` bools.
        classes: ``[M]`` class index (0..K-1) of each comparison.
        fail_gap: a gap this large must be ruled out for PASS.
        pass_gap: a gap shown above this FAILs.
        confidence: ``1 - alpha``.

    Returns:
        :class:`RuleResult`.
    """
    _check_confidence(confidence)
    _check_thresholds(fail_gap, pass_gap)
    counts = np.asarray(counts, dtype=float)
    paired = np.asarray(paired, dtype=bool)
    classes = np.asarray(classes, dtype=int)
    m = counts.shape[-2]
    if m == 0 or counts.shape[-1] != 4 or paired.shape != (m,) or classes.shape != (m,):
        raise ValueError(
            f"need counts [..., M, 4] with M >= 1 and paired, classes of shape [M]; got "
            f"{counts.shape}, {paired.shape}, {classes.shape}"
        )
    alpha = 1.0 - confidence
    diff, low, high = _bounds(counts, paired, one_sided_z(confidence))
    passes = (high < fail_gap) & (low > -fail_gap)

    # Holm step-down over the M comparisons: H_j: |d_j| <= pass, tested at alpha / (M - r)
    zs = np.array([NormalDist().inv_cdf(1.0 - alpha / (m - r) / 2.0) for r in range(m)])

    def abs_lower(
        r: np.ndarray,
    ) -> np.ndarray:  # lower bound of |d| at the two-sided level alpha / (M - r)
        _, lo, hi = _bounds(counts, paired, zs[r])
        return np.where(lo > 0, lo, np.where(hi < 0, -hi, 0.0))

    shown, lower, level = _holm(abs_lower, diff.shape, alpha, pass_gap)

    k = int(classes.max()) + 1
    member = classes[:, None] == np.arange(k)[None, :]  # [M, K]
    present = member.any(axis=0)
    cls_shown = (shown[..., :, None] & member).any(axis=-2)
    cls_pass = (passes[..., :, None] | ~member).all(axis=-2) & present
    cls = np.where(cls_shown, FAIL, np.where(cls_pass, PASS, INCONCLUSIVE))
    verdict = np.where(
        cls_shown.any(axis=-1),
        FAIL,
        np.where((cls_pass | ~present).all(axis=-1), PASS, INCONCLUSIVE),
    )
    return RuleResult(verdict, cls, diff, low, high, passes, lower, level, shown)


@dataclass(frozen=True)
class Comparison:
    """One pair of contexts of one class, as counts.

    Attributes:
        cls: the class.
        first: group name of the first context (``"<class>|<context>"``).
        second: group name of the second context.
        counts: paired: ``(a, b, c, d)`` = pairs right in both, in the first only, in the
            second only, in neither; independent: ``(k1, n1, k2, n2)``.
        paired: which of the two.
    """

    cls: str
    first: str
    second: str
    counts: tuple[int, int, int, int]
    paired: bool = False

    @property
    def accuracies(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((correct, n) first, (correct, n) second)`` on the rows compared."""
        x0, x1, x2, x3 = self.counts
        if self.paired:
            n = x0 + x1 + x2 + x3
            return (x0 + x1, n), (x0 + x2, n)
        return (x0, x1), (x2, x3)

    @property
    def diff(self) -> float:
        (k1, n1), (k2, n2) = self.accuracies
        return k1 / n1 - k2 / n2

    @property
    def size(self) -> str:
        """``"24 pairs"`` or ``"48 + 48 probes"``."""
        (_, n1), (_, n2) = self.accuracies
        return f"{n1} pairs" if self.paired else f"{n1} + {n2} probes"


@dataclass(frozen=True)
class ComparisonResult:
    """A :class:`Comparison` judged by :func:`decide_counts` (fields as in :class:`RuleResult`)."""

    comparison: Comparison
    diff: float
    low: float
    high: float
    passes: bool
    lower: float
    level: float
    shown: bool

    @property
    def upper(self) -> float:
        """The larger of the two one-sided bounds of ``|d|`` (``max(high, -low)``)."""
        return max(self.high, -self.low)


@dataclass(frozen=True)
class GapDecision:
    """The context-gap verdict, per class, and every comparison behind it."""

    verdict: Verdict
    classes: dict[str, Verdict]
    results: list[ComparisonResult]
    fail_gap: float
    pass_gap: float
    confidence: float

    def of(self, cls: str) -> list[ComparisonResult]:
        return [r for r in self.results if r.comparison.cls == cls]

    def deciding(self, cls: str) -> ComparisonResult:
        """The comparison behind a class's verdict: for FAIL the one shown with the largest
        lower bound, otherwise the one with the largest upper bound (the one PASS hinges on)."""
        mine = self.of(cls)
        shown = [r for r in mine if r.shown]
        if shown:
            return max(shown, key=lambda r: r.lower)
        return max(mine, key=lambda r: r.upper)


def decide_comparisons(
    comparisons: Sequence[Comparison],
    fail_gap: float = 0.15,
    pass_gap: float = 0.05,
    confidence: float = 0.95,
) -> GapDecision:
    """:func:`decide_counts` on a list of comparisons (what :func:`audit.pipeline.decide` calls)."""
    if not comparisons:
        raise ValueError("no comparisons: a context gap needs a class seen in two or more contexts")
    names: list[str] = []
    for c in comparisons:
        if c.cls not in names:
            names.append(c.cls)
        if c.paired:
            if min(c.counts) < 0 or sum(c.counts) <= 0:
                raise ValueError(f"{c.first} vs {c.second}: bad paired counts {c.counts}")
        else:
            _check_counts(c.counts[0], c.counts[1], f"{c.first}")
            _check_counts(c.counts[2], c.counts[3], f"{c.second}")
    res = decide_counts(
        [c.counts for c in comparisons],
        [c.paired for c in comparisons],
        [names.index(c.cls) for c in comparisons],
        fail_gap,
        pass_gap,
        confidence,
    )
    results = [
        ComparisonResult(
            c,
            float(res.diff[j]),
            float(res.low[j]),
            float(res.high[j]),
            bool(res.passes[j]),
            float(res.lower[j]),
            float(res.level[j]),
            bool(res.shown[j]),
        )
        for j, c in enumerate(comparisons)
    ]
    return GapDecision(
        CODES[int(res.verdict)],
        {name: CODES[int(res.classes[i])] for i, name in enumerate(names)},
        results,
        fail_gap,
        pass_gap,
        confidence,
    )


def decide_rate(
    k, n, fail_rate: float = 0.15, pass_rate: float = 0.05, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rate that is never negative (the flip rate): ``(verdict code, low, high)``, vectorised.

    One comparison, one direction: PASS when the one-sided ``confidence`` Wilson upper
    bound is below ``fail_rate``; FAIL when the one-sided lower bound is above ``pass_rate``
    (FAIL wins when both hold).
    """
    _check_confidence(confidence)
    _check_thresholds(fail_rate, pass_rate)
    _, lo, hi = _wilson(k, n, one_sided_z(confidence))
    v = np.where(lo > pass_rate, FAIL, np.where(hi < fail_rate, PASS, INCONCLUSIVE))
    return v, lo, hi


@dataclass(frozen=True)
class RateDecision:
    """What :func:`decide_rates` found, one entry per class (lists in the order given).

    Attributes:
        verdict: the overall verdict.
        classes: verdict per class.
        rate: ``k / n`` per class.
        low: one-sided ``confidence`` lower bound per class (Wilson, no correction).
        high: one-sided ``confidence`` upper bound per class (Wilson; the PASS test).
        lower: one-sided lower bound at the class's Holm level (the FAIL test).
        level: that Holm level ``alpha / (K - r)`` (the last one the class was tested at).
        shown: Holm rejected ``rate <= pass_rate`` for the class.
    """

    verdict: Verdict
    classes: list[Verdict]
    rate: list[float]
    low: list[float]
    high: list[float]
    lower: list[float]
    level: list[float]
    shown: list[bool]


def decide_rates(
    k: Sequence[int],
    n: Sequence[int],
    fail_rate: float = 0.15,
    pass_rate: float = 0.05,
    confidence: float = 0.95,
) -> RateDecision:
    """One non-negative rate per class (flip rates): PASS, FAIL or INCONCLUSIVE, with Holm for FAIL.

    Class ``j`` has ``k[j]`` events (flips) in ``n[j]`` independent trials (objects).

    * A class PASSes when its one-sided ``confidence`` Wilson upper bound is below
      ``fail_rate``; the verdict PASSes when every class does (an intersection-union
      test, Berger 1982: no multiplicity correction).
    * A class FAILs when Holm's step-down procedure shows ``rate > pass_rate``: with ``r``
      classes already shown, each remaining class is tested at ``alpha / (K - r)`` (its
      one-sided Wilson lower bound at that level above ``pass_rate``), until no new class
      is shown. The verdict FAILs when some class does (a FAIL beats a PASS).
    * INCONCLUSIVE otherwise.

    Guarantees (``alpha = 1 - confidence``; nominal, as the Wilson bounds are score
    approximations): if some class's true rate is ``fail_rate`` or more, P(PASS) <= alpha;
    whatever the other rates, the probability that some class whose true rate is at most
    ``pass_rate`` is reported FAIL is at most alpha (Holm 1979, strong family-wise
    control). They rest on independent trials within and across classes.

    Args:
        k: events per class.
        n: trials per class (each > 0).
        fail_rate: a rate this large must be ruled out for PASS.
        pass_rate: a rate shown above this FAILs.
        confidence: ``1 - alpha``.

    Returns:
        :class:`RateDecision`.
    """
    _check_confidence(confidence)
    _check_thresholds(fail_rate, pass_rate)
    if len(k) != len(n) or not len(k):
        raise ValueError(
            f"need one count and one size per class, at least one class; got {len(k)} and {len(n)}"
        )
    for kj, nj in zip(k, n, strict=True):
        _check_counts(int(kj), int(nj))
    m = len(k)
    alpha = 1.0 - confidence
    rate, low, high = _wilson(k, n, one_sided_z(confidence))
    # Holm step-down over the classes: H_j: rate_j <= pass_rate, tested at alpha / (K - r)
    shown, lower, level = _holm(
        lambda r: _wilson(k, n, one_sided_z(1.0 - alpha / (m - int(r[0]))))[1],
        (m,),
        alpha,
        pass_rate,
    )
    passes = high < fail_rate
    classes: list[Verdict] = [
        CODES[FAIL] if s else CODES[PASS] if p else CODES[INCONCLUSIVE]
        for s, p in zip(shown, passes, strict=True)
    ]
    verdict: Verdict = "FAIL" if shown.any() else "PASS" if passes.all() else "INCONCLUSIVE"
    return RateDecision(
        verdict,
        classes,
        [float(x) for x in rate],
        [float(x) for x in low],
        [float(x) for x in high],
        [float(x) for x in lower],
        [float(x) for x in level],
        [bool(x) for x in shown],
    )


def min_objects_for_rate(
    rate: float,
    fail_rate: float = 0.15,
    pass_rate: float = 0.05,
    confidence: float = 0.95,
    power: float = 0.9,
    comparisons: int = 1,
) -> int:
    """Trials (objects) one class needs for :func:`decide_rates` to decide a true ``rate``.

    A rate above ``pass_rate`` should FAIL (judged at Holm's first level
    ``alpha / comparisons``), one at or below it should PASS (at ``alpha``). As in
    :func:`min_probes_for`, an unlucky but plausible outcome is plugged into the real
    bounds: the observed rate is off by ``z_power * sqrt(rate (1 - rate) / n)`` towards
    the other verdict. An approximation for one class, to size a probe set.
    """
    _check_confidence(confidence)
    _check_thresholds(fail_rate, pass_rate)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie strictly between 0 and 1 (e.g. 0.9); got {power}")
    if not 0.0 <= rate <= 1.0 or comparisons < 1:
        raise ValueError(
            f"need 0 <= rate <= 1 and comparisons >= 1; got rate={rate}, comparisons={comparisons}"
        )
    alpha = 1.0 - confidence
    zp = NormalDist().inv_cdf(power)
    fail = rate > pass_rate
    z = one_sided_z(1.0 - alpha / comparisons) if fail else one_sided_z(confidence)

    def decided(n: int) -> bool:
        shift = zp * math.sqrt(rate * (1.0 - rate) / n)
        seen = min(1.0, max(0.0, rate - shift if fail else rate + shift))
        _, lo, hi = _wilson(seen * n, n, z)
        return bool(lo > pass_rate) if fail else bool(hi < fail_rate)

    return _smallest(decided, "object count", "rate")


def _smallest(decided, what: str, of: str) -> int:
    """The smallest ``n >= 1`` with ``decided(n)`` (doubling, then bisection; ``decided`` monotone in ``n``)."""
    hi = 1
    while not decided(hi):
        hi *= 2
        if hi > 10_000_000:
            raise ValueError(f"no {what} up to 10 million decides this {of}; check the thresholds")
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if decided(mid):
            hi = mid
        else:
            lo = mid
    return hi


def combine_verdicts(verdicts: Iterable[Verdict]) -> Verdict:
    """FAIL if any is FAIL; PASS if all (at least one) are PASS; INCONCLUSIVE otherwise."""
    seen = list(verdicts)
    if not seen:
        return "INCONCLUSIVE"
    if "FAIL" in seen:
        return "FAIL"
    return "PASS" if all(v == "PASS" for v in seen) else "INCONCLUSIVE"


def comparisons_for(contexts_per_class: Iterable[int]) -> int:
    """Number of comparisons: ``sum m (m - 1) / 2`` over classes with ``m >= 2`` contexts (at least 1)."""
    return max(1, sum(m * (m - 1) // 2 for m in contexts_per_class if m >= 2))


# --------------------------------------------------------------------------- how many probes would decide
def min_probes_for(
    gap: float,
    fail_gap: float = 0.15,
    pass_gap: float = 0.05,
    best_accuracy: float = 0.95,
    confidence: float = 0.95,
    power: float = 0.9,
    comparisons: int = 1,
    discordant: float | None = None,
) -> int:
    """Probes per group (unpaired) or pairs (``discordant`` given) to decide a true ``gap``.

    A gap above ``pass_gap`` should FAIL, one at or below it should PASS. The search plugs
    an unlucky but plausible outcome into the real bounds of :func:`decide_counts`: the
    observed gap is off by ``z * sigma`` (``z = z_power`` towards PASS for a FAIL,
    ``z = z_{(1 + power) / 2}`` towards FAIL for a PASS, as the best context is picked after
    the fact), with ``sigma^2 = (p_b q_b + p_w q_w) / n`` unpaired and
    ``sigma^2 = (psi - gap^2) / n`` paired (``psi`` the share of discordant pairs, at least
    ``gap``). A FAIL is judged at Holm's first level ``alpha / comparisons``, a PASS at
    ``alpha`` (intersection-union: no correction). It is an approximation of one
    comparison; the simulations in the tests and :func:`power_table` check it.

    Args:
        gap: the true gap to decide.
        fail_gap: the smallest gap that counts as leaning on the context.
        pass_gap: the largest gap that is tolerated.
        best_accuracy: expected accuracy in the best context.
        confidence: ``1 - alpha``.
        power: wanted probability of the right decision.
        comparisons: the number of comparisons (Holm's first divisor).
        discordant: expected share of discordant pairs for the paired design; None: unpaired.

    Returns:
        Probes per group, or pairs.
    """
    _check_confidence(confidence)
    _check_thresholds(fail_gap, pass_gap)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie strictly between 0 and 1 (e.g. 0.9); got {power}")
    if not 0.0 <= gap <= best_accuracy <= 1.0:
        raise ValueError(
            f"need 0 <= gap <= best_accuracy <= 1; got gap={gap}, best_accuracy={best_accuracy}"
        )
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1; got {comparisons}")
    alpha = 1.0 - confidence
    p_b, p_w = best_accuracy, best_accuracy - gap
    if discordant is None:
        var = p_b * (1 - p_b) + p_w * (1 - p_w)
    else:
        psi = min(1.0, max(float(discordant), gap))
        var = max(0.0, psi - gap * gap)
    if gap > pass_gap:
        shift, z, want = (
            -NormalDist().inv_cdf(power),
            NormalDist().inv_cdf(1 - alpha / comparisons / 2),
            "FAIL",
        )
    else:
        shift, z, want = NormalDist().inv_cdf(0.5 + power / 2), one_sided_z(confidence), "PASS"

    def decided(n: int) -> bool:
        g = gap + shift * math.sqrt(var / n)
        ob = min(1.0, max(0.0, p_b + (g - gap) / 2))
        ow = min(1.0, max(0.0, p_w - (g - gap) / 2))
        g = ob - ow
        if discordant is None:
            row, paired = [ob * n, n, ow * n, n], False
        else:
            q = min(1.0, max(psi, abs(g)))
            b, c = (q + g) / 2, (q - g) / 2
            a = max(0.0, ob - b)
            d = max(0.0, 1.0 - a - b - c)
            row, paired = [a * n, b * n, c * n, d * n], True
        _, lo, hi = _bounds(row, paired, z)
        if want == "FAIL":
            return bool(lo > pass_gap)
        return bool(hi < fail_gap and lo > -fail_gap)

    return _smallest(decided, "probe count", "gap")


def describe_probes_needed(result: ComparisonResult, decision: GapDecision) -> str:
    """A sentence for an INCONCLUSIVE comparison: its bounds and the probes (or pairs) that would decide."""
    c = result.comparison
    (k1, n1), (k2, n2) = c.accuracies
    best_acc = max(k1 / n1, k2 / n2)
    gap = min(abs(result.diff), best_acc)
    pct = round(100 * decision.confidence)
    m = len(decision.results)
    if c.paired:
        a, b, cc, _ = c.counts
        need = min_probes_for(
            gap,
            decision.fail_gap,
            decision.pass_gap,
            best_acc,
            decision.confidence,
            comparisons=m,
            discordant=(b + cc) / n1,
        )
        unit, now = "pairs", f"{n1} pairs ({b + cc} discordant)"
    else:
        need = min_probes_for(
            gap, decision.fail_gap, decision.pass_gap, best_acc, decision.confidence, comparisons=m
        )
        unit, now = "probes per group", f"{c.size}"
    return (
        f"context gap {abs(result.diff):.2f} on {now}: its {pct}% one-sided bounds {result.low:+.2f} to "
        f"{result.high:+.2f} do not rule out a gap of {decision.fail_gap:.2f}, and its lower bound "
        f"{result.lower:.2f} (Holm) does not show one above {decision.pass_gap:.2f}; about {need} {unit} "
        f"would decide a gap of {gap:.2f} with 90% probability"
    )


# --------------------------------------------------------------------------- power of the rule
def _pattern_probs(p: Sequence[float], rho: float) -> np.ndarray:
    """Probabilities of the ``2^m`` right/wrong patterns of one object over ``m`` contexts.

    Mixture model: with probability ``rho`` one uniform draw decides every context
    (right where ``U < p_j``), otherwise each context draws its own. Marginals are ``p``;
    for equal accuracies the correlation of two contexts is ``rho``.
    """
    m = len(p)
    pats = np.array([[(i >> j) & 1 for j in range(m)] for i in range(2**m)], dtype=bool)
    pv = np.asarray(p, dtype=float)
    indep = np.prod(np.where(pats, pv, 1 - pv), axis=1)
    edges = np.unique(np.concatenate([[0.0, 1.0], pv]))
    shared = np.zeros(2**m)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        u = (lo + hi) / 2
        idx = sum(1 << j for j in range(m) if u < pv[j])
        shared[idx] += hi - lo
    return (1 - rho) * indep + rho * shared


def simulate_class(
    rng: np.random.Generator, accuracies: Sequence[float], n: int, reps: int, rho: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(counts [reps, M, 4], paired [M])`` for one class over all pairs of its contexts.

    ``rho=None``: independent groups of ``n`` probes each; else ``n`` pairs (objects seen
    in every context) from :func:`_pattern_probs`.
    """
    m = len(accuracies)
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    if rho is None:
        k = rng.binomial(n, accuracies, size=(reps, m))
        counts = np.stack(
            [
                np.stack([k[:, i], np.full(reps, n), k[:, j], np.full(reps, n)], -1)
                for i, j in pairs
            ],
            1,
        )
        return counts, np.zeros(len(pairs), dtype=bool)
    probs = _pattern_probs(accuracies, rho)
    pats = rng.multinomial(n, probs, size=reps)  # [reps, 2^m]
    bits = np.array([[(i >> j) & 1 for j in range(m)] for i in range(2**m)], dtype=bool)
    rows = []
    for i, j in pairs:
        cells = [
            bits[:, i] & bits[:, j],
            bits[:, i] & ~bits[:, j],
            ~bits[:, i] & bits[:, j],
            ~bits[:, i] & ~bits[:, j],
        ]
        rows.append(np.stack([pats[:, cell].sum(axis=1) for cell in cells], -1))
    return np.stack(rows, 1), np.ones(len(pairs), dtype=bool)


def pass_probability(
    n: int,
    classes: int,
    contexts: int,
    rho: float | None,
    accuracy: float = 0.95,
    fail_gap: float = 0.15,
    pass_gap: float = 0.05,
    confidence: float = 0.95,
    reps: int = 20_000,
    seed: int = 0,
) -> float:
    """P(PASS) of a clean model (``accuracy`` in every context) with ``n`` probes per group
    (``rho=None``) or ``n`` pairs per class, by simulation through :func:`decide_counts`.

    Classes are independent and alike, and PASS needs every class to pass, so
    ``P(PASS) = P(one class passes) ** classes``; one class is simulated (with the
    comparisons of all classes counted for Holm, which only matters for FAIL).
    """
    rng = np.random.default_rng(seed)
    counts, paired = simulate_class(rng, [accuracy] * contexts, n, reps, rho)
    res = decide_counts(
        counts, paired, np.zeros(paired.shape, dtype=int), fail_gap, pass_gap, confidence
    )
    return float((res.classes[..., 0] == PASS).mean()) ** classes


def power_table(
    powers: Sequence[float] = (0.8, 0.9),
    designs: Sequence[tuple[int, int]] = ((2, 2), (2, 3), (10, 2), (10, 3)),
    rhos: Sequence[float | None] = (None, 0.5, 0.9),
    reps: int = 20_000,
) -> str:
    """Markdown: probes per group (unpaired) and pairs per class (paired, correlation ``rho``)
    a clean model (accuracy 0.95 everywhere, gap 0) needs to PASS with each probability
    at the default thresholds, by simulation (``reps`` per size; bisection on the size)."""
    head = ["classes", "contexts"]
    for rho in rhos:
        what = (
            "probes per group (unpaired)" if rho is None else f"pairs per class (paired, rho={rho})"
        )
        head += [f"{what}, {round(100 * p)}% PASS" for p in powers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, m in designs:
        cells = [str(k), str(m)]
        for rho in rhos:
            for target in powers:
                lo, hi = 1, 8
                while pass_probability(hi, k, m, rho, reps=reps) < target:
                    lo, hi = hi, hi * 2
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if pass_probability(mid, k, m, rho, reps=reps) >= target:
                        hi = mid
                    else:
                        lo = mid
                cells.append(str(hi))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["power"]:
        print("usage: python -m audit.engine.stats power", file=sys.stderr)
        return 2
    print(power_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
