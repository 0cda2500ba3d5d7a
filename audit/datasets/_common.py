"""What the synthetic benchmarks share: balanced labels with a correlated spurious context."""

from __future__ import annotations

import torch

from audit.probes import ProbeSet
from audit.probes.probe_set import pixels_problem

__all__ = [
    "MIN_SIZE",
    "check_pixels",
    "correlated_context",
    "grouped_probe_set",
    "paired_probe_set",
]

#: The smallest image side the benchmarks draw their scenes at.
MIN_SIZE = 24


def check_pixels(n_images: int, size: int) -> None:
    """Refuse, before anything is allocated, ``n_images`` of ``size x size`` above the probe
    folder's limits (:func:`audit.probes.probe_set.pixels_problem`).

    Raises:
        ValueError: naming the count, the size, the limit and the fix.
    """
    problem = pixels_problem(int(n_images), int(size), int(size))
    if problem:
        raise ValueError(f"{problem}; ask for fewer or smaller images")


def correlated_context(
    n: int, correlation: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
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


def grouped_probe_set(
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    context: torch.Tensor,
    class_names: list[str],
    group_names: list[str],
    pairs: torch.Tensor | None = None,
) -> ProbeSet:
    """A benchmark's probe set: two classes in two contexts, group ``2 * label + context``."""
    return ProbeSet(
        images=images,
        labels=labels,
        class_names=list(class_names),
        masks=masks,
        groups=2 * labels + context,
        group_names=list(group_names),
        pairs=pairs,
    )


def paired_probe_set(
    images: torch.Tensor,
    masks: torch.Tensor,
    scene_labels: torch.Tensor,
    class_names: list[str],
    group_names: list[str],
) -> ProbeSet:
    """The balanced probe set of scenes shown in both contexts.

    ``images`` and ``masks`` hold rows ``2k`` (context 0) and ``2k + 1`` (context 1) of
    scene ``k``, whose class is ``scene_labels[k]``; the two rows share ``pair = k``.
    """
    n_scenes = scene_labels.shape[0]
    context = torch.tensor([0, 1]).repeat(n_scenes)
    pairs = torch.arange(n_scenes).repeat_interleave(2)
    return grouped_probe_set(
        images, masks, scene_labels.repeat_interleave(2), context, class_names, group_names, pairs
    )
