"""Benchmarks with a known answer: which model leans on a spurious feature.

``snow_wolf``: wolf vs husky, spurious background (snow vs grass).
``stamps``: disc vs ring, spurious stamp beside the shape (checker vs stripes).
"""

from audit.datasets import snow_wolf, stamps
from audit.datasets._common import MIN_SIZE

__all__ = ["MIN_SIZE", "snow_wolf", "stamps"]
