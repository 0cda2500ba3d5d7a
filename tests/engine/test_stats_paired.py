"""Paired context gaps: Newcombe's paired interval, the paired tables, and the gate on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from audit.engine.stats import (
    Comparison,
    decide_comparisons,
    decide_counts,
    min_probes_for,
    one_sided_z,
    paired_difference_interval,
)
from audit.pipeline import behaviour_raw, decide, default_config, recheck
from audit.probes import ProbeSet
from audit.rules.behaviour import comparisons as _gap_comparisons

GATE = default_config()["gate"]

# R. G. Newcombe (1998c), "Improved confidence intervals for the difference between binomial
# proportions based on paired data", Statistics in Medicine 17, 2635-2650: the method-10 rows
# (hybrid score interval, phi with the continuity correction) of the table of worked examples,
# 95%, cells (a, b, c, d) = (both positive, first only, second only, neither), printed to 4
# decimals. The example of the text is (36, 12, 2, 0): difference 0.2, interval 0.0569 to 0.3404.
NEWCOMBE_1998C_METHOD_10 = {
    (36, 12, 2, 0): (0.0569, 0.3404),
    (20, 12, 2, 16): (0.0562, 0.3292),
    (18, 12, 2, 18): (0.0562, 0.3290),
    (36, 14, 0, 0): (0.1528, 0.4167),
    (35, 14, 0, 1): (0.1461, 0.4175),
    (18, 14, 0, 18): (0.1441, 0.3963),
    (2, 97, 1, 0): (0.8721, 0.9854),
    (1, 97, 1, 1): (0.8736, 0.9850),
    (0, 29, 1, 0): (0.6666, 0.9882),
    (2, 98, 0, 0): (0.9178, 0.9945),
    (1, 98, 0, 1): (0.9171, 0.9916),
    (0, 30, 0, 0): (0.8395, 1.0),
    (54, 0, 0, 0): (-0.0664, 0.0664),
    (53, 0, 0, 1): (-0.0729, 0.0729),
    (30, 0, 0, 24): (-0.0358, 0.0358),
    (29, 0, 0, 25): (-0.0354, 0.0354),
    (28, 0, 0, 26): (-0.0352, 0.0352),
    (27, 0, 0, 27): (-0.0351, 0.0351),
}


@pytest.mark.parametrize("cells, published", sorted(NEWCOMBE_1998C_METHOD_10.items()))
def test_paired_interval_reproduces_newcombe_1998c(cells, published):
    lo, hi = paired_difference_interval(*cells)
    # within one unit of the 4th printed decimal; all but (1, 97, 1, 1) (0.87367, printed
    # 0.8736) agree after rounding
    assert lo == pytest.approx(published[0], abs=1e-4)
    assert hi == pytest.approx(published[1], abs=1e-4)


def test_the_worked_example_to_the_printed_digits():
    lo, hi = paired_difference_interval(36, 12, 2, 0)
    assert (round(lo, 4), round(hi, 4)) == (0.0569, 0.3404)


def test_paired_interval_properties():
    # antisymmetric in the two contexts, contains the estimate, narrower than independent
    lo, hi = paired_difference_interval(20, 5, 1, 14)
    lo2, hi2 = paired_difference_interval(20, 1, 5, 14)
    assert lo == pytest.approx(-hi2) and hi == pytest.approx(-lo2)
    assert lo < 4 / 40 < hi
    from audit.engine.stats import difference_interval

    ulo, uhi = difference_interval(25, 40, 21, 40)
    assert hi - lo < uhi - ulo
    with pytest.raises(ValueError, match="negative"):
        paired_difference_interval(1, -1, 0, 0)
    with pytest.raises(ValueError, match="positive"):
        paired_difference_interval(0, 0, 0, 0)


# ------------------------------------------------------------------ the examples, on counts
def test_24_pairs_per_class_no_flip_passes():
    # 2 classes, 24 pairs each, 0 of 48 pairs flipped, every probe right: the old gate said
    # INCONCLUSIVE ("about 113 probes per group would decide")
    z = one_sided_z(0.95)
    res = decide_counts([[24, 0, 0, 0], [24, 0, 0, 0]], [True, True], [0, 1])
    assert res.verdict == 1  # PASS
    # one-sided 95% upper bound with 0 discordant of 24: z^2 / (24 + z^2) = 0.101 < 0.15
    assert res.high[0] == pytest.approx(z * z / (24 + z * z)) and 0.100 < res.high[0] < 0.102
    groups = {
        f"{c}|{x}": {"correct": 24, "n": 24} for c in ("wolf", "husky") for x in ("snow", "grass")
    }
    paired = [
        {"groups": [f"{c}|snow", f"{c}|grass"], "a": 24, "b": 0, "c": 0, "d": 0}
        for c in ("wolf", "husky")
    ]
    verdict, checks = decide(
        {"behaviour": {"groups": groups, "paired": paired, "pairs": {"flipped": 0, "total": 48}}},
        GATE,
    )
    assert verdict == "PASS"
    wolf = next(c for c in checks if c.name == "context_gap/wolf")
    assert (
        "context gap 0.00 on 24 pairs (0 discordant; 95% one-sided bounds -0.10 and +0.10"
        in wolf.finding
    )
    assert "rules out a gap of 0.15" in wolf.finding and wolf.numbers["paired"] is True


def test_ten_classes_40_pairs_two_flips_passes():
    # ~40 pairs per class, 2 of 397 pairs flipped, accuracy ~0.97
    comps = []
    for i in range(10):
        n = 37 if i == 9 else 40
        flips = 1 if i < 2 else 0
        comps.append(
            Comparison(f"c{i}", f"c{i}|x", f"c{i}|y", (n - 1 - flips, flips, 0, 1), paired=True)
        )
    assert sum(sum(c.counts) for c in comps) == 397
    dec = decide_comparisons(comps)
    assert dec.verdict == "PASS" and set(dec.classes.values()) == {"PASS"}
    assert max(r.upper for r in dec.results) < 0.15


def test_paired_rows_decide_where_independent_rows_would_not():
    # 60 pairs, 3 discordant in opposite directions at accuracy 0.9: the paired test rules out
    # 0.15, the same marginals taken as independent groups do not
    paired = decide_comparisons([Comparison("w", "w|a", "w|b", (52, 2, 1, 5), paired=True)])
    indep = decide_comparisons([Comparison("w", "w|a", "w|b", (54, 60, 53, 60))])
    assert paired.verdict == "PASS" and paired.results[0].upper < indep.results[0].upper


# ------------------------------------------------------------------ the paired tables from a probe set
def _probe_set(rows):
    """rows: (pair, group index, label); group names w|snow, w|grass, w|sand, h|snow, h|grass."""
    names = ["w|snow", "w|grass", "w|sand", "h|snow", "h|grass"]
    pairs, groups, labels = zip(*rows, strict=True)
    n = len(rows)
    return ProbeSet(
        images=torch.zeros(n, 3, 8, 8),
        labels=torch.tensor(labels),
        class_names=["w", "h"],
        groups=torch.tensor(groups),
        group_names=names,
        pairs=torch.tensor(pairs),
    )


def test_paired_tables_cover_context_pairs_and_first_rows():
    rows = [
        (0, 0, 0),
        (0, 1, 0),
        (0, 2, 0),  # pair 0 in all three wolf contexts
        (1, 0, 0),
        (1, 1, 0),  # pair 1 in snow and grass
        (2, 1, 0),
        (2, 2, 0),
        (2, 2, 0),  # pair 2 twice in sand: its first sand row counts
        (3, 3, 1),
        (3, 4, 1),
        (4, 3, 1),  # no partner
    ]
    ps = _probe_set(rows)
    # predictions: right (0 for wolves, 1 for huskies) except row 1 (pair 0, grass) and row 7
    pred = torch.tensor([0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    raw = behaviour_raw(ps, pred)
    tables = {tuple(t["groups"]): (t["a"], t["b"], t["c"], t["d"]) for t in raw["paired"]}
    assert tables == {
        ("w|snow", "w|grass"): (
            1,
            1,
            0,
            0,
        ),  # pair 0: right on snow, wrong on grass; pair 1 right in both
        ("w|snow", "w|sand"): (1, 0, 0, 0),
        ("w|grass", "w|sand"): (
            1,
            0,
            1,
            0,
        ),  # pair 0: wrong on grass, right on sand; pair 2 right (first row)
        ("h|snow", "h|grass"): (1, 0, 0, 0),
    }
    doc = json.loads(json.dumps(raw))  # what the report holds is enough to judge again
    comps = {(c.first, c.second): c for c in _gap_comparisons(doc)}
    assert comps[("w|snow", "w|grass")].paired  # 2 pairs cover the 2 rows of each group
    assert not comps[("w|snow", "w|sand")].paired  # 1 pair, 3 sand rows: independent groups
    assert comps[("w|snow", "w|sand")].counts == (2, 2, 2, 3)
    assert comps[
        ("h|snow", "h|grass")
    ].paired  # 1 pair, 2 snow rows: 2 * 1 >= 2 (the rule: 2 * pairs >= max(n_A, n_B))


def test_recheck_rederives_a_paired_verdict():
    groups = {"w|snow": {"correct": 24, "n": 24}, "w|grass": {"correct": 24, "n": 24}}
    evidence = {
        "behaviour": {
            "groups": groups,
            "paired": [{"groups": ["w|snow", "w|grass"], "a": 24, "b": 0, "c": 0, "d": 0}],
        }
    }
    report = {
        "schema": "model-audit/report",
        "schema_version": 1,
        "evidence": evidence,
        "config": {"engine": {}, "gate": GATE},
    }
    assert recheck(report) == "PASS"
    strict = {**GATE, "context_gap": {"fail": 0.05, "pass": 0.01}}
    assert recheck(report, strict) == "INCONCLUSIVE"


def test_min_probes_for_paired_is_calibrated():
    # a clean model with 2% discordant pairs: the pairs min_probes_for asks for PASS ~90% of the time
    n = min_probes_for(0.0, discordant=0.02, power=0.9)
    assert n < min_probes_for(0.0, power=0.9)  # pairs need fewer than independent probes per group
    rng = np.random.default_rng(5)
    b = rng.binomial(n, 0.01, 4000)
    c = rng.binomial(n - b, 0.01 / 0.99)
    d = rng.binomial(n - b - c, 0.04 / 0.98)
    counts = np.stack([n - b - c - d, b, c, d], -1)[:, None, :]
    assert (decide_counts(counts, [True], [0]).verdict == 1).mean() >= 0.85
