"""What the synthetic benchmarks share: balanced labels with a correlated spurious context."""

from __future__ import annotations

import torch

__all__ = ["correlated_context"]


def correlated_context(n: int, correlation: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced labels (``n // 2`` of class 0, shuffled) and a context that agrees with them.

    Context ``c`` is class ``c``'s usual one: with probability ``correlation`` a row's
    context equals its label, otherwise it is the other one. Draws from ``generator``
    only (a permutation, then ``n`` uniforms), in that order.

    Raises:
        ValueError: ``correlation`` outside ``[0, 1]``.
    """
    if not 0.0 <= float(correlation) <= 1.0:
        raise ValueError(f"correlation must lie in [0, 1]; got {correlation}")
    labels = torch.zeros(n, dtype=torch.long)
    labels[n // 2 :] = 1
    labels = labels[torch.randperm(n, generator=generator)]
    agree = torch.rand(n, generator=generator) < float(correlation)
    return labels, torch.where(agree, labels, 1 - labels)
