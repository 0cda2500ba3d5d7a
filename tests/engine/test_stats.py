"""Score intervals and the gap decision rule of audit.engine.stats (paired design: test_stats_paired.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.engine.stats import (
    Comparison,
    combine_verdicts,
    comparisons_for,
    decide_comparisons,
    decide_counts,
    describe_probes_needed,
    difference_interval,
    min_probes_for,
    wilson_interval,
)


# Newcombe (1998a), Table I, method 3 (score interval without continuity correction)
@pytest.mark.parametrize(
    "k, n, low, high",
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_published_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=6e-5)
    assert hi == pytest.approx(high, abs=6e-5)


# Newcombe (1998b), Table II, method 10 (hybrid score interval)
@pytest.mark.parametrize(
    "counts, low, high",
    [
        ((56, 70, 48, 80), 0.0524, 0.3339),
        ((9, 10, 3, 10), 0.1705, 0.8090),
        ((5, 56, 0, 29), -0.0381, 0.1926),
        ((0, 10, 0, 20), -0.1611, 0.2775),
        ((0, 10, 0, 10), -0.2775, 0.2775),
        ((10, 10, 0, 20), 0.6791, 1.0),
        ((10, 10, 0, 10), 0.6075, 1.0),
    ],
)
def test_newcombe_published_values(counts, low, high):
    lo, hi = difference_interval(*counts)
    assert lo == pytest.approx(low, abs=6e-5)
    assert hi == pytest.approx(high, abs=6e-5)


def test_edges_and_errors():
    assert wilson_interval(0, 5)[0] == 0.0
    assert wilson_interval(5, 5)[1] == 1.0
    lo, hi = difference_interval(5, 5, 0, 5)
    assert 0 < lo < 1 and hi == 1.0
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="k=6, n=5"):
        wilson_interval(6, 5)
    with pytest.raises(ValueError, match="k2/n2"):
        difference_interval(1, 2, 0, 0)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)
    with pytest.raises(ValueError, match="pass_gap"):
        decide_counts([[5, 10, 5, 10]], [False], [0], fail_gap=0.05, pass_gap=0.15)


counts = st.integers(1, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))
levels = st.floats(0.5, 0.999)


@settings(max_examples=200, deadline=None)
@given(counts, levels, levels)
def test_wilson_contains_point_and_widens_with_confidence(kn, c1, c2):
    k, n = kn
    lo, hi = wilson_interval(k, n, min(c1, c2))
    lo2, hi2 = wilson_interval(k, n, max(c1, c2))
    assert 0.0 <= lo2 <= lo <= k / n <= hi <= hi2 <= 1.0


@settings(max_examples=200, deadline=None)
@given(counts, counts, levels, levels)
def test_difference_contains_point_and_widens_with_confidence(a, b, c1, c2):
    (k1, n1), (k2, n2) = a, b
    lo, hi = difference_interval(k1, n1, k2, n2, min(c1, c2))
    lo2, hi2 = difference_interval(k1, n1, k2, n2, max(c1, c2))
    d = k1 / n1 - k2 / n2
    assert (
        -1.0 <= lo2 <= lo + 1e-12
        and lo <= d + 1e-12
        and d <= hi + 1e-12
        and hi <= hi2 + 1e-12 <= 1.0 + 1e-12
    )


@settings(max_examples=100, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(5, 200), st.integers(2, 5))
def test_intervals_shrink_as_n_grows(p1, p2, n, factor):
    k1, k2 = round(p1 * n), round(p2 * n)
    m = n * factor
    w_small = wilson_interval(k1, n)
    w_big = wilson_interval(k1 * factor, m)
    assert w_big[1] - w_big[0] <= w_small[1] - w_small[0] + 1e-12
    d_small = difference_interval(k1, n, k2, n)
    d_big = difference_interval(k1 * factor, m, k2 * factor, m)
    assert d_big[1] - d_big[0] <= d_small[1] - d_small[0] + 1e-12


def _one(k1, n1, k2, n2, **kw):
    return decide_comparisons(
        [Comparison("wolf", "wolf|snow", "wolf|grass", (k1, n1, k2, n2))], **kw
    )


def test_one_sided_bounds_holm_and_comparisons():
    one = _one(60, 64, 50, 64)
    r = one.results[0]
    # PASS bounds are one-sided at 95%: the ends of the two-sided 90% interval
    assert (r.low, r.high) == pytest.approx(difference_interval(60, 64, 50, 64, 0.90))
    # FAIL bound: two-sided at 1 - alpha / M (Holm's first level, alpha split over the two directions)
    assert r.level == pytest.approx(0.05) and r.lower == pytest.approx(
        difference_interval(60, 64, 50, 64, 0.95)[0]
    )
    four = decide_comparisons([Comparison(c, f"{c}|a", f"{c}|b", (60, 64, 50, 64)) for c in "wxyz"])
    assert all(x.level == pytest.approx(0.0125) and x.lower < r.lower for x in four.results)
    assert all(
        x.low == r.low and x.high == r.high for x in four.results
    )  # PASS needs no correction (IUT)
    assert comparisons_for([2, 2]) == 2 and comparisons_for([3]) == 3 and comparisons_for([1]) == 1
    assert combine_verdicts(["PASS", "FAIL"]) == "FAIL"
    assert combine_verdicts(["PASS", "INCONCLUSIVE"]) == "INCONCLUSIVE"
    assert combine_verdicts(["PASS", "PASS"]) == "PASS"
    assert combine_verdicts([]) == "INCONCLUSIVE"


def test_holm_steps_down():
    # two strong gaps and one borderline: Bonferroni at 0.05/3 would not show the third,
    # Holm tests it at 0.05/1 once the other two are shown
    comps = [
        Comparison("a", "a|x", "a|y", (250, 256, 20, 256)),
        Comparison("b", "b|x", "b|y", (250, 256, 20, 256)),
        Comparison("c", "c|x", "c|y", (250, 256, 226, 256)),
    ]
    dec = decide_comparisons(comps)
    c = dec.results[2]
    assert dec.classes == {"a": "FAIL", "b": "FAIL", "c": "FAIL"} and c.level == pytest.approx(0.05)
    assert difference_interval(250, 256, 226, 256, 1 - 0.05 / 3)[0] < 0.05 < c.lower


def test_decide_comparisons_per_class():
    comps = [
        Comparison("wolf", "wolf|snow", "wolf|grass", (62, 64, 20, 64)),
        Comparison("husky", "husky|snow", "husky|grass", (60, 64, 61, 64)),
    ]
    dec = decide_comparisons(comps)
    assert dec.classes == {"wolf": "FAIL", "husky": "PASS"} and dec.verdict == "FAIL"
    assert dec.deciding("wolf").comparison is comps[0]


def _simulate(p_best, p_worst, n, reps, rng):
    a = rng.binomial(n, p_best, reps)
    b = rng.binomial(n, p_worst, reps)
    counts = np.stack([a, np.full(reps, n), b, np.full(reps, n)], -1)[:, None, :]
    v = decide_counts(counts, [False], [0]).verdict
    return {
        "INCONCLUSIVE": float((v == 0).mean()),
        "PASS": float((v == 1).mean()),
        "FAIL": float((v == 2).mean()),
    }


def test_error_rates_at_64_probes_per_group():
    rng = np.random.default_rng(0)
    n, reps = 64, 4000
    no_gap = _simulate(0.95, 0.95, n, reps, rng)
    assert no_gap["FAIL"] <= 0.01 and no_gap["PASS"] >= 0.9
    small = _simulate(0.95, 0.90, n, reps, rng)  # within tolerance: must (almost) never FAIL
    assert small["FAIL"] <= 0.05
    spurious = _simulate(0.95, 0.80, n, reps, rng)  # leaning: PASS at most alpha
    assert spurious["PASS"] <= 0.05
    assert spurious["FAIL"] >= 0.25
    strong = _simulate(0.95, 0.65, n, reps, rng)
    assert strong["FAIL"] >= 0.9


@pytest.mark.parametrize(
    "gap, p_best, want", [(0.0, 0.95, "PASS"), (0.15, 0.95, "FAIL"), (0.25, 0.9, "FAIL")]
)
def test_min_probes_for_is_calibrated(gap, p_best, want):
    n = min_probes_for(gap, best_accuracy=p_best, power=0.9)
    rates = _simulate(p_best, p_best - gap, n, 4000, np.random.default_rng(1))
    assert rates[want] >= 0.85
    if want == "FAIL":
        assert min_probes_for(gap, best_accuracy=p_best, power=0.9, comparisons=4) > n


def test_describe_probes_needed_names_numbers():
    dec = _one(60, 64, 52, 64)
    assert dec.verdict == "INCONCLUSIVE"
    text = describe_probes_needed(dec.results[0], dec)
    assert "64 + 64 probes" in text and "about" in text and "probes per group would decide" in text
