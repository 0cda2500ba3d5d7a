"""Which probe rows the engine explains and shows: deterministic, spread over the groups.

The callbacks and the audit job explain (and picture) the same few rows of a probe set
every epoch and every run, so an image series is comparable step by step.
"""

from __future__ import annotations

import torch

__all__ = ["pick_rows"]


def pick_rows(n: int, k: int, groups: torch.Tensor | None = None) -> list[int]:
    """``k`` probe rows spread over the set: round robin over groups when given, else evenly spaced.

    Deterministic (no randomness): the same rows every epoch, so the image series is
    comparable step by step.
    """
    k = max(0, min(k, n))
    if groups is None:
        return sorted({int(i * n // k) for i in range(k)}) if k else []
    buckets = [torch.nonzero(groups == g).flatten().tolist() for g in torch.unique(groups).tolist()]
    rows: list[int] = []
    depth = 0
    while len(rows) < k:
        for b in buckets:
            if depth < len(b) and len(rows) < k:
                rows.append(b[depth])
        depth += 1
    return sorted(rows)
