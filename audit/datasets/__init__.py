"""Benchmarks with a known answer: which model leans on a spurious feature."""

from audit.datasets import snow_wolf

__all__ = ["snow_wolf"]
