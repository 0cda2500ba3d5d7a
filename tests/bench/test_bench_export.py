"""The bench row for LRP on an exported program: one run gives both timings and their ratio."""

from __future__ import annotations

import math

import pytest

from audit.bench import export


@pytest.mark.slow  # exports a ResNet-50: ~15 s on 2 shared cores
def test_the_export_rows_time_lrp_against_one_forward_backward_of_the_same_program() -> None:
    rows = export.rows(batch=2, size=32, rounds=1)
    assert [what for what, _, _ in rows] == [
        "lrp, eager ResNet-50",
        "lrp, exported ResNet-50 (ep.module())",
    ]
    for _, seconds, ratio in rows:
        assert seconds > 0 and math.isfinite(ratio) and ratio > 0
