"""Machinery every stage shares: the model guard, row selection, distribution, progress, statistics."""
