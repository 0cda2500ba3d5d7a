"""Behavioural evidence: predictions, accuracy per group, context gaps, counterfactual flips.

Groups follow the convention ``"<class>|<context>"`` (e.g. ``"wolf|snow"``). The
*context gap* of a class is its accuracy in its best context minus its accuracy in
its worst context: one class being harder than another is not a spurious feature,
but one class being right on snow and wrong on grass is.

:func:`predict` is the one forward pass over every probe. With ``finite=True`` it also
checks the logits: a model that returns NaN or Inf for any probe is broken (the
argmax of an all-NaN row is class 0, so such a model would otherwise look like a
constant predictor with no context gap), and :class:`NonFiniteLogits` counts the
probes concerned. A forward that raises is reported as :class:`ForwardError` with
the batch it raised on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from audit.engine.model import chunks, model_device, preserved
from audit.engine.progress import task
from audit.errors import AuditError
from audit.probes import ProbeSet

__all__ = [
    "GroupAccuracy",
    "NonFiniteLogits",
    "ForwardError",
    "predict",
    "predict_batches",
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


class NonFiniteLogits(AuditError, ValueError):
    """The model returned NaN or Inf logits for ``bad`` of ``n`` images, the first at row ``first``."""

    def __init__(self, bad: int, n: int, first: int) -> None:
        self.bad, self.n, self.first = bad, n, first
        super().__init__(f"NaN/Inf logits for {bad} of {n} images (first: row {first})")


class ForwardError(AuditError, RuntimeError):
    """The model's forward raised on the rows ``start:stop`` (a batch of ``stop - start``).

    ``error`` (also the ``__cause__``) is the exception the forward raised.
    """

    def __init__(self, start: int, stop: int, error: BaseException) -> None:
        self.start, self.stop, self.error = start, stop, error
        super().__init__(
            f"the forward raised {type(error).__name__} on rows {start}:{stop}: {error}"
        )

    @property
    def batch(self) -> int:
        return self.stop - self.start


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, max_batch: int = 256, *, finite: bool = False
) -> torch.Tensor:
    """Predicted class per image (eval mode, model state restored), on CPU.

    Args:
        model: a classifier returning logits ``[N, classes]``.
        images: ``[N, C, H, W]``.
        max_batch: most images per forward pass.
        finite: check every row of logits; raise :class:`NonFiniteLogits` (after the
            whole pass, with the count) if any holds NaN or Inf.

    Raises:
        ForwardError: the forward raised (names the batch; the original is ``error``).
        NonFiniteLogits: with ``finite=True``, NaN or Inf logits.
    """
    n = images.shape[0]
    batches = ((torch.arange(sl.start, sl.stop), images[sl]) for sl in chunks(n, max_batch))
    return predict_batches(model, batches, n, finite=finite)


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    *,
    finite: bool = False,
) -> torch.Tensor:
    """:func:`predict` over ``(rows, images)`` batches (e.g. streamed from a probe folder).

    Args:
        model: a classifier returning logits ``[N, classes]``.
        batches: pairs of probe row indices ``[B]`` and their images ``[B, C, H, W]``.
        n: the number of rows the batches cover (for progress lines and the count of
            :class:`NonFiniteLogits`).
        finite: as for :func:`predict`.

    Returns:
        The predicted classes ``[n]`` on CPU, in the order the batches gave the rows.

    Raises:
        ForwardError: the forward raised; ``start``/``stop`` name the batch by probe rows
            (its first row, and that row plus the batch size).
        NonFiniteLogits: with ``finite=True``, NaN or Inf logits; ``first`` is a probe row.
    """
    out, bad, seen = [], [], []
    device = model_device(model)
    with preserved(model, grad=False), task("predictions", n) as ticker:
        for rows, images in batches:
            ticker.advance(int(rows.numel()))
            try:
                logits = model(images.to(device))
            except Exception as err:  # noqa: BLE001 - re-raised with the batch it ran on
                start = int(rows[0]) if rows.numel() else 0
                raise ForwardError(start, start + int(rows.numel()), err) from err
            out.append(logits.argmax(dim=1).cpu())
            seen.append(rows.cpu())
            if finite:
                bad.append((~torch.isfinite(logits).all(dim=1)).cpu())
    if bad:
        where = torch.cat(bad).nonzero().flatten()
        if where.numel():
            raise NonFiniteLogits(int(where.numel()), n, int(torch.cat(seen)[where[0]]))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def group_accuracy(probes: ProbeSet, predictions: torch.Tensor) -> dict[str, GroupAccuracy]:
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


def context_gaps(
    accuracies: dict[str, GroupAccuracy],
) -> dict[str, tuple[GroupAccuracy, GroupAccuracy]]:
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
