"""Behavioural evidence: predictions, accuracy per group, context gaps, counterfactual flips.

Groups follow the convention ``"<class>|<context>"`` (e.g. ``"wolf|snow"``). The
*context gap* of a class is its accuracy in its best context minus its accuracy in
its worst context: one class being harder than another is not a spurious feature,
but one class being right on snow and wrong on grass is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from audit._model import chunks, model_device, preserved
from audit.probes import ProbeSet

__all__ = [
    "GroupAccuracy",
    "predict",
    "group_accuracy",
    "context_gaps",
    "flip_rate",
    "split_group",
]


@dataclass(frozen=True)
class GroupAccuracy:
    """Accuracy of one group: ``correct`` of ``n`` probes."""

    group: str
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def split_group(name: str) -> tuple[str, str]:
    """``"wolf|snow"`` -> ``("wolf", "snow")``; a name without ``|`` has context ``""``."""
    cls, sep, ctx = name.partition("|")
    return cls, ctx if sep else ""


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, max_batch: int = 256) -> torch.Tensor:
    """Predicted class per image (eval mode, model state restored), on CPU."""
    out = []
    device = model_device(model)
    with preserved(model, grad=False):
        for sl in chunks(images.shape[0], max_batch):
            out.append(model(images[sl].to(device)).argmax(dim=1).cpu())
    return torch.cat(out)


def group_accuracy(
    probes: ProbeSet, predictions: torch.Tensor
) -> dict[str, GroupAccuracy]:
    """Accuracy per group name (requires ``probes.groups``)."""
    if probes.groups is None:
        raise ValueError("the probe set has no groups; group accuracy needs a group per probe")
    correct = predictions.cpu() == probes.labels
    result = {}
    for gi, name in enumerate(probes.group_names):
        sel = probes.groups == gi
        n = int(sel.sum())
        if n:
            result[name] = GroupAccuracy(name, int(correct[sel].sum()), n)
    return result


def context_gaps(accuracies: dict[str, GroupAccuracy]) -> dict[str, tuple[GroupAccuracy, GroupAccuracy]]:
    """Per class with two or more contexts: ``(worst, best)`` group by accuracy."""
    by_class: dict[str, list[GroupAccuracy]] = {}
    for name, acc in accuracies.items():
        by_class.setdefault(split_group(name)[0], []).append(acc)
    gaps = {}
    for cls, accs in by_class.items():
        if len(accs) >= 2:
            ordered = sorted(accs, key=lambda a: a.accuracy)
            gaps[cls] = (ordered[0], ordered[-1])
    return gaps


def flip_rate(probes: ProbeSet, predictions: torch.Tensor) -> tuple[int, int]:
    """``(flipped, pairs)``: pairs whose members do not all get the same prediction."""
    if probes.pairs is None:
        raise ValueError("the probe set has no pairs; the flip rate needs pair ids")
    pairs = probes.pairs
    pred = predictions.cpu()
    ids, inverse = torch.unique(pairs, return_inverse=True)
    lo = torch.full((len(ids),), torch.iinfo(torch.long).max).scatter_reduce(
        0, inverse, pred, reduce="amin"
    )
    hi = torch.full((len(ids),), torch.iinfo(torch.long).min).scatter_reduce(
        0, inverse, pred, reduce="amax"
    )
    size = torch.bincount(inverse)
    real = size >= 2
    return int(((lo != hi) & real).sum()), int(real.sum())
