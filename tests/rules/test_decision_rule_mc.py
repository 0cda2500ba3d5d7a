"""Monte Carlo check of the stated error rates of the gate's decision rule (audit.engine.stats).

The counts are simulated here (independently of audit.engine.stats' own power simulation) and
judged by :func:`audit.engine.stats.decide_counts`, the function :func:`audit.pipeline.decide` uses
(through :func:`audit.engine.stats.decide_comparisons`). Guarantees under test, alpha = 0.05:

* some true context gap >= fail  ->  P(PASS) <= alpha
* every true context gap <= pass ->  P(FAIL) <= alpha

each checked as rate <= alpha + 3 Monte Carlo standard errors, for 2 and 10 classes,
2 and 3 contexts, independent groups and pairs (the same object in every context, its
correctness correlated across contexts).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from audit.engine.stats import FAIL, PASS, decide_counts

ALPHA, FAIL_GAP, PASS_GAP = 0.05, 0.15, 0.05
REPS = 4000
RHO = 0.5  # correlation of one object's correctness across contexts (paired design)


def _patterns(p: list[float], rho: float) -> np.ndarray:
    """P(right/wrong pattern over the contexts) of one object: with probability rho the
    contexts share one uniform draw U (right where U < p_j), else each draws its own."""
    m = len(p)
    out = np.zeros(2**m)
    for bits in itertools.product([0, 1], repeat=m):
        idx = sum(b << j for j, b in enumerate(bits))
        out[idx] += (1 - rho) * math.prod(
            pj if b else 1 - pj for pj, b in zip(p, bits, strict=True)
        )
        # shared draw: right exactly where p_j > U, i.e. U below every right context's p
        # and at or above every wrong context's p
        top = min([pj for pj, b in zip(p, bits, strict=True) if b], default=1.0)
        bottom = max([pj for pj, b in zip(p, bits, strict=True) if not b], default=0.0)
        out[idx] += rho * max(0.0, top - bottom)
    return out


def simulate(rng, accuracies: list[list[float]], n: int, paired: bool):
    """Counts [REPS, M, 4], paired flags [M], class index [M] for the given per-class accuracies."""
    rows, flags, classes = [], [], []
    for ci, p in enumerate(accuracies):
        m = len(p)
        if paired:
            pats = rng.multinomial(n, _patterns(p, RHO), size=REPS)
            right = np.array([[(i >> j) & 1 for j in range(m)] for i in range(2**m)], dtype=bool)
        else:
            k = rng.binomial(n, p, size=(REPS, m))
        for i, j in itertools.combinations(range(m), 2):
            if paired:
                cells = [
                    right[:, i] & right[:, j],
                    right[:, i] & ~right[:, j],
                    ~right[:, i] & right[:, j],
                    ~right[:, i] & ~right[:, j],
                ]
                rows.append(np.stack([pats[:, c].sum(1) for c in cells], -1))
            else:
                rows.append(np.stack([k[:, i], np.full(REPS, n), k[:, j], np.full(REPS, n)], -1))
            flags.append(paired)
            classes.append(ci)
    return np.stack(rows, 1), np.array(flags), np.array(classes)


def _rate(verdicts: np.ndarray, code: int) -> tuple[float, float]:
    rate = float((verdicts == code).mean())
    return rate, math.sqrt(ALPHA * (1 - ALPHA) / REPS)


# sizes at which a clean model usually PASSes (see `python -m audit.engine.stats power`), so the
# PASS error is not trivially 0
SIZES = {False: 120, True: 80}
DESIGNS = list(itertools.product([2, 10], [2, 3], [False, True]))


def _clean(m: int) -> list[float]:
    return [0.95] * m


def _at_fail(m: int) -> list[float]:
    return [0.95, 0.80] if m == 2 else [0.95, 0.875, 0.80]  # best - worst = 0.15 = fail


def _at_pass(m: int) -> list[float]:
    return [0.95, 0.90] if m == 2 else [0.95, 0.95, 0.90]  # best - worst = 0.05 = pass


@pytest.mark.parametrize("classes, contexts, paired", DESIGNS)
def test_pass_rate_when_gaps_equal_fail(classes, contexts, paired):
    rng = np.random.default_rng(1000 + 10 * classes + contexts + paired)
    n = SIZES[paired]
    # every class's gap at `fail`
    counts, flags, cls = simulate(rng, [_at_fail(contexts)] * classes, n, paired)
    res = decide_counts(counts, flags, cls, FAIL_GAP, PASS_GAP, 1 - ALPHA)
    rate, se = _rate(res.verdict, PASS)
    assert rate <= ALPHA + 3 * se, (rate, se)
    # the least favourable case: one class at `fail`, the others clean (they PASS, so the
    # verdict hinges on the one test); its rate is close to alpha, not alpha ** classes
    counts, flags, cls = simulate(
        rng, [_at_fail(contexts)] + [_clean(contexts)] * (classes - 1), n, paired
    )
    res = decide_counts(counts, flags, cls, FAIL_GAP, PASS_GAP, 1 - ALPHA)
    rate, se = _rate(res.verdict, PASS)
    assert rate <= ALPHA + 3 * se, (rate, se)
    one_class = float((res.classes[:, 0] == PASS).mean())
    assert one_class <= ALPHA + 3 * se, one_class


@pytest.mark.parametrize("classes, contexts, paired", DESIGNS)
def test_fail_rate_when_one_gap_equals_pass(classes, contexts, paired):
    rng = np.random.default_rng(2000 + 10 * classes + contexts + paired)
    n = SIZES[paired]
    counts, flags, cls = simulate(
        rng, [_at_pass(contexts)] + [_clean(contexts)] * (classes - 1), n, paired
    )
    res = decide_counts(counts, flags, cls, FAIL_GAP, PASS_GAP, 1 - ALPHA)
    rate, se = _rate(res.verdict, FAIL)
    assert rate <= ALPHA + 3 * se, (rate, se)


@pytest.mark.parametrize("paired", [False, True])
def test_the_rule_has_power_at_these_sizes(paired):
    """Not vacuous: at the sizes above a clean model mostly PASSes and a 0.30 gap FAILs."""
    rng = np.random.default_rng(3000 + paired)
    n = SIZES[paired]
    counts, flags, cls = simulate(rng, [_clean(2)] * 2, n, paired)
    assert (decide_counts(counts, flags, cls).verdict == PASS).mean() >= 0.8
    counts, flags, cls = simulate(rng, [[0.95, 0.65], _clean(2)], n, paired)
    assert (decide_counts(counts, flags, cls).verdict == FAIL).mean() >= 0.9


def test_pattern_model_has_the_asked_marginals_and_correlation():
    probs = _patterns([0.95, 0.95], RHO)
    assert probs.sum() == pytest.approx(1.0)
    p_right_0 = probs[1] + probs[3]
    both = probs[3]
    assert p_right_0 == pytest.approx(0.95)
    corr = (both - 0.95**2) / (0.95 * 0.05)
    assert corr == pytest.approx(RHO)
