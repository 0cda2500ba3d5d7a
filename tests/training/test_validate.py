"""Detection quality of the gate (`make validate`): the full grid is a slow test."""

from __future__ import annotations

import pytest

from audit.training.validate import Row, format_table, meets_requirement, truth_of, validate


def row(rho: float, gaps: dict[str, float], verdict: str) -> Row:
    return Row(
        rho=rho,
        seed=0,
        true_gaps=gaps,
        truth=truth_of(gaps),
        verdict=verdict,
        gate_gap=max(gaps.values()),
        gate_low=0.0,
        gate_high=1.0,
        accuracy=0.9,
        train_s=1.0,
        audit_s=1.0,
    )


def test_ground_truth_classes():
    assert truth_of({"wolf": 0.16, "husky": 0.0}) == "leans"
    assert truth_of({"wolf": 0.15, "husky": 0.0}) == "between"  # "more than 15 points"
    assert truth_of({"wolf": 0.05, "husky": -0.01}) == "clean"
    assert truth_of({"wolf": 0.051, "husky": 0.0}) == "between"


def test_the_requirement_and_the_table():
    rows = [
        row(1.0, {"wolf": 1.0, "husky": 1.0}, "FAIL"),
        row(0.5, {"wolf": 0.02, "husky": 0.03}, "PASS"),
        row(0.75, {"wolf": 0.1, "husky": 0.0}, "INCONCLUSIVE"),
    ]
    assert meets_requirement(rows)
    table = format_table(rows)
    assert (
        "| leans | 1 | 0 | 0 |" in table
        and "| clean | 0 | 0 | 1 |" in table
        and "| between | 0 | 1 | 0 |" in table
    )
    # INCONCLUSIVE is never false: power is printed, not required
    assert meets_requirement([row(1.0, {"wolf": 0.5, "husky": 0.0}, "INCONCLUSIVE")])
    # a clean model's PASS is counted, not required; a clean model's FAIL is a false verdict
    assert meets_requirement([row(0.5, {"wolf": 0.01, "husky": 0.0}, "INCONCLUSIVE")])
    assert not meets_requirement([row(0.5, {"wolf": 0.01, "husky": 0.0}, "FAIL")])
    assert not meets_requirement([row(1.0, {"wolf": 0.5, "husky": 0.0}, "PASS")])
    masks = row(1.0, {"wolf": 0.5, "husky": 0.0}, "FAIL")
    masks.masks_verdict = "PASS"  # a false verdict in any view audited counts
    assert not meets_requirement([masks])


@pytest.mark.slow
def test_the_gate_fails_every_leaning_model_and_passes_every_clean_one():
    rows = validate(device="cpu", progress=print)
    print(format_table(rows))
    assert len(rows) == 15
    assert meets_requirement(rows), format_table(rows)
    # at 256 probes per group the gate also has the power to FAIL every leaning model
    assert all(r.verdict == "FAIL" for r in rows if r.truth == "leans"), format_table(rows)
    assert {r.truth for r in rows if r.rho >= 0.97} == {
        "leans"
    }  # the benchmark does produce shortcuts
