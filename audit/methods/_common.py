"""Helpers shared by the explainers: targets resolved per chunk, chunked evaluation, memory budget.

Memory is bounded by default. When the caller sets no ``max_batch``, the number of
images per forward+backward pass comes from a memory budget (``explain``'s option
``memory_budget``, else :data:`DEFAULT_MEMORY_BUDGET`) divided by the measured cost
of one image: the bytes autograd saves for the backward pass in one forward of one
image (plus its output), counted with ``torch.autograd.graph.saved_tensors_hooks``
and cached per model, input shape, dtype and device (see :func:`rows_per_pass`).
Work that expands a batch (integrated gradients: images x steps; SmoothGrad: one
pass per noise sample) is chunked by the same rule, and so is a plain batch in
:func:`map_chunks` inside ``explain``. An explicit ``max_batch`` always wins.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from audit.engine.model import AttributionError, check_finite, chunks, resolve_target

__all__ = [
    "TargetLike",
    "Targets",
    "map_chunks",
    "deferred_checks",
    "target_scores",
    "target_indices",
    "fixed_targets",
    "DEFAULT_MEMORY_BUDGET",
    "memory_budget",
    "check_memory_budget",
    "activation_bytes",
    "rows_per_pass",
]

DEFAULT_MEMORY_BUDGET: int = 1 << 30
"""Bytes of activations autograd may hold in one forward+backward pass (1 GiB) when the
caller sets neither ``max_batch`` nor ``memory_budget``.

The budget counts what autograd saves for the backward pass (the activations), not the
model's weights; the backward pass adds transient gradients on top. Measured on CPU
with 4 images at 224 px and no options, peak resident memory above the loaded model
for integrated gradients: 1.40 GiB on ViT-B/16 (12 of the 128 path points per pass;
all 128 in one pass, as before the budget: about 10 GiB) and 1.34 GiB on MaxViT-T (4
per pass; about 34 GiB in one). Read at call time, so assigning
``audit.methods._common.DEFAULT_MEMORY_BUDGET`` changes the default for the process;
``explain(..., memory_budget=...)`` changes it for one call. A large GPU runs faster
with a larger budget (fewer, fuller passes).
"""

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
        self._device_target: torch.Tensor | None = None
        # (finite?, targets in range?, logits, indices, rows) of CUDA chunks, checked once at the end
        self.pending: list[
            tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, slice]
        ] = []

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

    def _on_device(self, logits: torch.Tensor) -> torch.Tensor:
        if self._device_target is None or self._device_target.device != logits.device:
            t = torch.as_tensor(self.target, device=logits.device)
            if t.is_floating_point() or t.dtype == torch.bool:
                raise AttributionError(
                    f"target must hold class indices (integers); got dtype {t.dtype}"
                )
            self._device_target = t.long().expand(self.n) if t.ndim == 0 else t.long()
        return self._device_target

    def verify(self) -> None:
        """Raise for the deferred CUDA checks (NaN/Inf logits, targets out of range): one sync."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([torch.stack([ok, good]) for ok, good, *_ in pending]).cpu()
        for (_ok, _good, logits, t, rows), (ok, good) in zip(pending, flags.tolist(), strict=True):
            if not ok:
                check_finite(logits)  # raises with the rows
            if not good:
                k = logits.shape[1]
                bad = ((t < 0) | (t >= k)).nonzero().flatten().tolist()
                i = rows.start + bad[0]
                raise AttributionError(
                    f"target {int(t[bad[0]])} (row {i}) is not a class index; the model has {k} outputs (0..{k - 1})"
                )


def target_scores(
    logits: torch.Tensor, targets: Targets, rows: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the logits and return ``(sum of target logits, target indices)`` for a chunk."""
    t = target_indices(logits, targets, rows)
    return logits.gather(1, t[:, None]).sum(), t


def target_indices(logits: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
    """Check the logits and return the target class index per row of the chunk.

    On CUDA the checks are deferred to :meth:`Targets.verify` (called by
    :func:`map_chunks` after the last chunk): checking here would synchronize between
    the forward and the backward pass, and the GPU would idle while the backward is
    launched (+30% on a ResNet-50 at batch 8). Out-of-range indices are clamped for the
    gather meanwhile, so the device never sees an invalid index.
    """
    if logits.device.type != "cuda" or logits.ndim != 2:
        check_finite(logits)
        return targets.resolve(logits, rows)
    k = logits.shape[1]
    if targets.target is None:
        raw = t = logits.detach().argmax(dim=1)
        good = torch.ones((), dtype=torch.bool, device=logits.device)
    else:
        raw = targets._on_device(logits)[rows]
        good = ((raw >= 0) & (raw < k)).all()
        t = raw.clamp(0, k - 1)
    targets.pending.append(
        (torch.isfinite(logits.detach()).all(), good, logits.detach(), raw, rows)
    )
    return t


def fixed_targets(
    model: nn.Module, inputs: torch.Tensor, target: TargetLike, max_batch: int | None
) -> torch.Tensor:
    """Class indices resolved once on the clean inputs, checked (finite logits, valid indices).

    For explainers that run the model on altered copies (noise, masks, perturbations):
    every copy must explain the class of its clean input, not its own argmax.
    """
    with torch.no_grad():
        return map_chunks(
            inputs, target, max_batch, lambda x, t, rows: _checked_targets(model(x), t, rows)
        )


def _checked_targets(logits: torch.Tensor, targets: Targets, rows: slice) -> torch.Tensor:
    check_finite(logits)
    return targets.resolve(logits, rows)


def map_chunks(
    inputs: torch.Tensor,
    target: TargetLike,
    max_batch: int | None,
    fn: Callable[[torch.Tensor, Targets, slice], torch.Tensor],
) -> torch.Tensor:
    """Run ``fn(inputs[rows], targets, rows)`` over chunks of at most ``max_batch`` rows and concatenate.

    ``max_batch=None`` inside ``explain``: chunks of as many rows as the memory budget
    allows for the model being explained (one chunk when the batch fits; see
    :func:`rows_per_pass`); outside ``explain``: one chunk. The per-image cost is only
    looked up here, never measured (``explain`` measures it before the explainer runs,
    so that no forward pass runs while an explainer has patched or hooked the model).
    """
    _check_max_batch(max_batch)
    if max_batch is None:
        scope = _BUDGET.get()
        if scope is not None:
            max_batch = _limit(scope.model, inputs, inputs.shape[0], scope.nbytes, measure=False)
    targets = Targets(target, inputs.shape[0])
    out = torch.cat(
        [fn(inputs[rows], targets, rows) for rows in chunks(inputs.shape[0], max_batch)]
    )
    later = _DEFERRED.get()
    if later is None:
        targets.verify()
    else:
        later.append(targets)
    return out


#: inside :func:`deferred_checks`: where :func:`map_chunks` leaves its target and
#: finiteness checks instead of running them (None: run them at once)
_DEFERRED: contextvars.ContextVar[list[Targets] | None] = contextvars.ContextVar(
    "audit_deferred_checks", default=None
)


@contextmanager
def deferred_checks() -> Iterator[list[Targets]]:
    """Collect the checks of every :func:`map_chunks` inside; the caller runs them after the block.

    ``explain`` runs them after the model is restored: the checks wait for the device
    (one sync), and restoring the model's state takes ~0.1-0.5 ms of host time that
    then overlaps the device's last kernels instead of following them.
    """
    pending: list[Targets] = []
    token = _DEFERRED.set(pending)
    try:
        yield pending
    finally:
        _DEFERRED.reset(token)


# ------------------------------------------------------------------ memory budget
def _check_max_batch(max_batch: object) -> None:
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
    ):
        raise AttributionError(
            f"max_batch must be a positive integer (images per forward pass) or None "
            f"(chosen from the memory budget); got {max_batch!r}"
        )


def check_memory_budget(budget: object) -> int | None:
    """``budget`` as whole bytes (None stays None: the default budget), or an :class:`AttributionError`."""
    if budget is None:
        return None
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not budget >= 1
        or budget == float("inf")
    ):
        raise AttributionError(
            f"memory_budget must be a positive number of bytes (e.g. 2**30 for 1 GiB) or None "
            f"for the default ({DEFAULT_MEMORY_BUDGET} bytes); got {budget!r}"
        )
    return int(budget)


class _Budget:
    """The model ``explain`` is explaining and the budget it runs under (``_BUDGET``'s value)."""

    __slots__ = ("model", "nbytes")

    def __init__(self, model: nn.Module, nbytes: int) -> None:
        self.model = model
        self.nbytes = nbytes


#: inside :func:`memory_budget`: the model being explained and its budget (None: outside explain)
_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "audit_memory_budget", default=None
)


@contextmanager
def memory_budget(
    model: nn.Module, inputs: torch.Tensor, budget: int | None, *, measure: bool
) -> Iterator[None]:
    """Run a block under ``budget`` bytes (None: :data:`DEFAULT_MEMORY_BUDGET`) for ``model``.

    With ``measure`` and more than one input row, the per-image cost is measured now
    (once per model and input shape, then cached): before the explainer runs, so that
    :func:`map_chunks` finds it even inside an explainer that patches the model.
    """
    nbytes = DEFAULT_MEMORY_BUDGET if budget is None else budget
    if measure and inputs.shape[0] > 1:
        activation_bytes(model, inputs)
    token = _BUDGET.set(_Budget(model, nbytes))
    try:
        yield
    finally:
        _BUDGET.reset(token)


#: measured bytes per image: model -> {(input shape [C, H, W], dtype, device, training): bytes}
_COSTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def _cost_key(model: nn.Module, inputs: torch.Tensor) -> tuple:
    # not whether the weights require grad: an explainer may switch that on inside (zennit's
    # canonizers do) and must still find the figure explain measured before it ran
    return (tuple(inputs.shape[1:]), inputs.dtype, inputs.device, model.training)


def activation_bytes(model: nn.Module, inputs: torch.Tensor, *, measure: bool = True) -> int | None:
    """Bytes one image of ``inputs`` costs in a forward+backward pass of ``model`` (cached).

    Measured by one forward pass of ``inputs[:1]`` with gradients on (the input
    requires grad, as in the explainers) under ``saved_tensors_hooks``: the sum of
    the storages autograd saves for the backward pass, each counted once, leaving out
    the model's parameters and buffers, plus the output. ``explain`` measures in the
    state it runs explainers in (eval mode, weights frozen). The figure depends on the
    architecture and the input shape, not on the weights, and is cached per model
    (weakly referenced), input shape, dtype, device and train/eval mode.

    Returns None if the forward pass fails (the explainer then runs as if unbounded and
    reports the model's error itself) or, with ``measure=False``, if not measured yet.
    """
    key = _cost_key(model, inputs)
    per_model = _COSTS.get(model)
    if per_model is not None and key in per_model:
        return per_model[key]
    if not measure:
        return None
    try:
        cost = _measure(model, inputs[:1])
    except Exception:  # noqa: BLE001  the explainer's own pass reports the model's error
        return None
    _COSTS.setdefault(model, {})[key] = cost
    return cost


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the memory behind ``t`` (views of one storage share the address)."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return id(t), t.numel() * t.element_size()


def _measure(model: nn.Module, example: torch.Tensor) -> int:
    owned = {_storage(t)[0] for t in (*model.parameters(), *model.buffers())}
    # address -> (the tensor first saved there, weakly, and the storage's bytes). The graph
    # gets None instead of the tensors, so the measuring pass holds no activations (its
    # peak is that of a forward without grad); an address is counted again only once the
    # tensor saved there is gone (a view saved after its base died counts twice: safe side)
    seen: dict[int, tuple[weakref.ref, int]] = {}

    def pack(t: torch.Tensor) -> None:
        ptr, size = _storage(t)
        if ptr in owned or size <= 0:
            return
        old = seen.get(ptr)
        if old is None or old[0]() is None:
            seen[ptr] = (weakref.ref(t), size)
            sizes.append(size)

    def unpack(_packed: None) -> torch.Tensor:
        raise RuntimeError("internal error: the measuring pass of the memory budget ran backward")

    sizes: list[int] = []
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, unpack),
    ):
        x = example.detach().clone().requires_grad_(True)
        out = model(x)
    if isinstance(out, torch.Tensor):
        sizes.append(_storage(out)[1])
    return sum(sizes)


def _limit(
    model: nn.Module, inputs: torch.Tensor, rows: int, budget: int, *, measure: bool
) -> int | None:
    if rows <= 1:
        return None
    cost = activation_bytes(model, inputs, measure=measure)
    if not cost:
        return None  # not measured (or nothing saved): one pass, as asked
    limit = max(1, budget // cost)
    return None if limit >= rows else limit


def rows_per_pass(
    model: nn.Module, inputs: torch.Tensor, max_batch: int | None, rows: int | None = None
) -> int | None:
    """Most images per forward+backward pass for work of ``rows`` images like ``inputs`` (None: all).

    The rule, for every explainer: an explicit ``max_batch`` wins. Otherwise the
    budget (``explain``'s ``memory_budget``, else :data:`DEFAULT_MEMORY_BUDGET`)
    divided by :func:`activation_bytes` of one image, at least 1; None when all
    ``rows`` fit (one pass, as without a budget) or the cost cannot be measured.

    Args:
        model: the model the explainer runs.
        inputs: the explainer's inputs ``[N, C, H, W]`` (one image is measured).
        max_batch: the caller's ``max_batch`` option.
        rows: images the work runs through the model, e.g. ``N * steps`` for
            integrated gradients (default ``N``).
    """
    _check_max_batch(max_batch)
    if max_batch is not None:
        return max_batch
    scope = _BUDGET.get()
    budget = scope.nbytes if scope is not None and scope.model is model else DEFAULT_MEMORY_BUDGET
    return _limit(model, inputs, inputs.shape[0] if rows is None else rows, budget, measure=True)
