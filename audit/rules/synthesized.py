"""Synthesized counterfactuals (masks only): placeholder until the measurement lands."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from audit.rules.base import Outcome

__all__ = ["judge"]


def judge(
    syn: Mapping[str, Any] | None, gate: Mapping[str, Any], methods: Mapping[str, Any], usable: Sequence[str]
) -> Outcome:
    """No synthesized evidence yet: never decides."""
    return Outcome(None)
