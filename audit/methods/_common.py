"""Helpers shared by the explainers: targets resolved per chunk, chunked evaluation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from audit._model import AttributionError, check_finite, chunks, resolve_target

__all__ = ["TargetLike", "Targets", "map_chunks", "target_scores"]

TargetLike = int | torch.Tensor | list[int] | None
"""A class index for all rows, one per row, or None (the predicted class)."""


class Targets:
    """The caller's ``target`` for a batch of ``n`` rows, resolved chunk by chunk.

    Shape errors are raised at once; index errors when the first logits reveal the
    number of classes, naming the row in the whole batch (not in the chunk).
    """

    def __init__(self, target: TargetLike, n: int) -> None:
        if target is not None and not isinstance(target, int):
            t = torch.as_tensor(target)
            if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != n):
                raise AttributionError(
                    f"target must be an int, None or one class index per input ({n}); "
                    f"got shape {tuple(t.shape)}"
                )
        self.target = target
        self.n = n

    def resolve(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Class indices ``[rows]`` for the chunk whose ``logits`` are given (None = argmax)."""
        if logits.ndim != 2:
            raise AttributionError(
                f"the model must return logits [N, classes]; got shape {tuple(logits.shape)}"
            )
        if self.target is None:
            return logits.detach().argmax(dim=1)
        full = resolve_target(self.target, logits.new_empty(self.n, logits.shape[1]))
        return full[rows]


def target_scores(
    logits: torch.Tensor, targets: Targets, rows: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the logits and return ``(sum of target logits, target indices)`` for a chunk."""
    check_finite(logits)
    t = targets.resolve(logits, rows)
    return logits.gather(1, t[:, None]).sum(), t


def map_chunks(
    inputs: torch.Tensor,
    target: TargetLike,
    max_batch: int | None,
    fn: Callable[[torch.Tensor, Targets, slice], torch.Tensor],
) -> torch.Tensor:
    """Run ``fn(inputs[rows], targets, rows)`` over chunks of at most ``max_batch`` rows and concatenate."""
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)):
        raise AttributionError(f"max_batch must be a positive integer or None; got {max_batch!r}")
    targets = Targets(target, inputs.shape[0])
    return torch.cat(
        [fn(inputs[rows], targets, rows) for rows in chunks(inputs.shape[0], max_batch)]
    )
