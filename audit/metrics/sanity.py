"""Model-randomization sanity check (Adebayo et al., 2018, "Sanity Checks for Saliency Maps").

An explanation that is meant to describe *the model* must change when the model's
weights are destroyed. :func:`randomization_sanity` randomizes the layers of a deep
copy of the model in cascade, from the logits down (step ``i`` randomizes
``layers[: i + 1]``), explains the same inputs after every step and reports the
Spearman rank correlation between the original and the randomized maps.

* Two variants per step, as in the paper: on the signed maps and on their absolute
  values. Signed maps can flip sign under randomization (a low signed correlation
  that says nothing about independence); the absolute variant catches maps whose
  *magnitude* pattern survives (e.g. edges of the input). The summary
  :attr:`RandomizationResult.similarity` is the larger of the two after all layers
  are randomized: a method passes only if both are low.
* Randomization: every parameter tensor of a layer is replaced by i.i.d. Gaussian
  values with the *same mean and standard deviation* (population) as the tensor it
  replaces, drawn on the CPU from a private ``torch.Generator`` seeded with ``seed``.
  This destroys the learned structure while keeping each tensor's scale, so
  activations stay in range for any layer type. A constant tensor (e.g. an untrained
  BatchNorm weight of ones, or a single-value parameter) stays constant; buffers
  (BatchNorm running statistics) are kept.
* Spearman's rho with average ranks for ties, computed in torch in float64 for a
  whole batch at once. It is NaN for an image whose map is constant (the correlation
  is undefined); per-layer means skip NaN (``torch.nanmean``).

The caller's model is never modified: everything happens on ``copy.deepcopy(model)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from audit._model import (
    AttributionError,
    check_finite,
    prepare_inputs,
    preserved,
    resolve_layer,
    resolve_target,
)

__all__ = ["RandomizationResult", "randomization_sanity", "spearman", "cascade_layers"]

Explainer = Callable[..., torch.Tensor]


@dataclass(frozen=True, eq=False)
class RandomizationResult:
    """Outcome of :func:`randomization_sanity`.

    Attributes:
        method: the method's registered name, or the callable's ``__name__``.
        layers: the cascade order; step ``i`` has ``layers[: i + 1]`` randomized.
        spearman: float32 ``[len(layers), N]``, signed maps, per step and image.
        spearman_abs: float32 ``[len(layers), N]``, absolute-value maps.
    """

    method: str
    layers: list[str]
    spearman: torch.Tensor
    spearman_abs: torch.Tensor

    @property
    def mean(self) -> list[float]:
        """Mean signed Spearman per step (NaN images skipped)."""
        return [float(v) for v in torch.nanmean(self.spearman, dim=1)]

    @property
    def mean_abs(self) -> list[float]:
        """Mean absolute-value Spearman per step (NaN images skipped)."""
        return [float(v) for v in torch.nanmean(self.spearman_abs, dim=1)]

    @property
    def final(self) -> float:
        """Mean signed Spearman with every layer randomized."""
        return self.mean[-1]

    @property
    def final_abs(self) -> float:
        """Mean absolute-value Spearman with every layer randomized."""
        return self.mean_abs[-1]

    @property
    def similarity(self) -> float:
        """The summary: ``max(final, final_abs)``; low means the map depends on the weights.

        A NaN variant is left out; NaN when both are (every map of the fully
        randomized model constant).
        """
        defined = [v for v in (self.final, self.final_abs) if not math.isnan(v)]
        return max(defined) if defined else math.nan

    def passes(self, threshold: float) -> bool:
        """True when :attr:`similarity` is below ``threshold`` (NaN never passes)."""
        return bool(self.similarity < threshold)

    def to_dict(self) -> dict[str, float]:
        """Flat numbers for logging: the summary and the per-layer means."""
        out = {"similarity": self.similarity, "final": self.final, "final_abs": self.final_abs}
        for name, v, va in zip(self.layers, self.mean, self.mean_abs, strict=True):
            out[f"spearman/{name}"] = v
            out[f"spearman_abs/{name}"] = va
        return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation per row of two batches ``[N, ...]`` (flattened), ``[N]`` float32.

    Ties get average ranks (as ``scipy.stats.spearmanr``). NaN where either row is
    constant.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise AttributionError(
            f"spearman needs two batches [N, ...] of the same shape; got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    ra = _average_ranks(a.detach().flatten(1))
    rb = _average_ranks(b.detach().flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = torch.sqrt((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1))
    rho = (ra * rb).sum(dim=1) / den
    return torch.where(den > 0, rho, torch.full_like(rho, float("nan"))).clamp(-1.0, 1.0).float()


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 0..D-1 of each row ``[N, D]``, ties replaced by their mean rank (float64)."""
    n, d = v.shape
    sorted_v, order = v.double().sort(dim=1)
    new_run = torch.ones_like(sorted_v, dtype=torch.bool)
    new_run[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    run = new_run.cumsum(dim=1) - 1 + torch.arange(n, device=v.device)[:, None] * d  # global run id
    pos = torch.arange(d, dtype=torch.float64, device=v.device).expand(n, d)
    sums = torch.zeros(n * d, dtype=torch.float64, device=v.device)
    counts = torch.zeros(n * d, dtype=torch.float64, device=v.device)
    sums.scatter_add_(0, run.flatten(), pos.flatten())
    counts.scatter_add_(0, run.flatten(), torch.ones(n * d, dtype=torch.float64, device=v.device))
    avg = (sums / counts.clamp(min=1))[run]
    return torch.empty_like(avg).scatter_(1, order, avg)


def cascade_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Modules that own parameters, in reverse order of first use (logits first).

    Found with one forward pass on ``x[:1]`` under ``no_grad`` with temporary hooks
    (removed on exit). Modules never called in the forward pass are left out, and so
    are parameters held directly by the root module.
    """
    named = [(name, m) for name, m in model.named_modules() if name]
    owners = [(name, m) for name, m in named if next(m.parameters(recurse=False), None) is not None]
    seen: dict[str, None] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, _inputs: object) -> None:
            seen.setdefault(name, None)

        return fn

    try:
        for name, m in owners:
            handles.append(m.register_forward_pre_hook(hook(name)))
        with preserved(model, grad=False):
            model(prepare_inputs(model, x)[:1])
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise AttributionError(
            "the model has no submodule with parameters used in its forward pass; "
            "there is nothing to randomize"
        )
    return list(reversed(seen))


def randomization_sanity(
    method: str | Explainer,
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor | list | None = None,
    layers: Sequence[str | nn.Module] | None = None,
    seed: int = 0,
    **options: object,
) -> RandomizationResult:
    """Cascading model-randomization test of an explainer (Adebayo et al., 2018).

    Args:
        method: a registered explainer name (passed to ``audit.methods.explain``) or a
            callable ``(model, x, target, **options) -> maps [N, ...]``.
        model: the classifier; never modified (a deep copy is randomized).
        x: inputs ``[N, C, H, W]``.
        target: class index, one per image, or None for the class the *original*
            model predicts; the same targets are explained at every step.
        layers: names or modules of ``model`` to randomize, in cascade order (top
            first); a container randomizes all its parameters at once, e.g.
            ``["fc", "layer4", "layer3", "layer2", "layer1"]`` for a ResNet. None: every
            module owning parameters, from the logits down (:func:`cascade_layers`).
        seed: seed of the private generator used for the random weights.
        **options: passed to the explainer.

    Returns:
        A :class:`RandomizationResult`.

    Raises:
        AttributionError: a bad method, layer, target or input, an explainer output of
            the wrong shape or with NaN/Inf, or a model that cannot be deep-copied.
    """
    explainer, name = _explainer(method)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AttributionError(f"seed must be an integer; got {seed!r}")
    with torch.inference_mode(False):
        try:
            work = copy.deepcopy(model)
        except (TypeError, RuntimeError, copy.Error) as err:
            raise AttributionError(
                f"randomization_sanity works on a deep copy of the model, and copying failed "
                f"({err}); make the model deep-copyable (no open handles or lambdas in attributes)"
            ) from err
        xs = prepare_inputs(work, x)
        order = _layer_names(model, work, xs, layers)
        with preserved(work, grad=False):
            logits = work(xs)
            check_finite(logits)
            t = resolve_target(target, logits)
        gen = torch.Generator().manual_seed(seed)
        with preserved(work, grad=True):
            original = _maps(explainer, work, xs, t, options, "the original model")
            rho, rho_abs = [], []
            for name_i in order:
                _randomize(work.get_submodule(name_i), gen)
                maps = _maps(
                    explainer, work, xs, t, options, f"the model randomized down to '{name_i}'"
                )
                if maps.shape != original.shape:
                    raise AttributionError(
                        f"the explainer returned maps of shape {tuple(maps.shape)} after randomizing "
                        f"'{name_i}' but {tuple(original.shape)} before; the map shape must not depend on the weights"
                    )
                rho.append(spearman(original, maps))
                rho_abs.append(spearman(original.abs(), maps.abs()))
    return RandomizationResult(
        method=name,
        layers=list(order),
        spearman=torch.stack(rho).cpu(),
        spearman_abs=torch.stack(rho_abs).cpu(),
    )


def _explainer(method: str | Explainer) -> tuple[Explainer, str]:
    if isinstance(method, str):
        try:
            from audit.methods import explain
        except ImportError as err:
            raise AttributionError(
                f"method {method!r} needs audit.methods.explain, which failed to import ({err}); "
                "pass a callable (model, x, target) -> maps instead"
            ) from err

        def call(
            model: nn.Module, x: torch.Tensor, target: torch.Tensor, **options: object
        ) -> torch.Tensor:
            return explain(method, model, x, target, **options)

        return call, method
    if callable(method):
        return method, getattr(method, "__name__", type(method).__name__)
    raise AttributionError(
        f"method must be a registered explainer name (e.g. 'saliency', 'gradcam') or a callable "
        f"(model, x, target) -> maps; got {type(method).__name__}"
    )


def _layer_names(
    model: nn.Module, work: nn.Module, x: torch.Tensor, layers: Sequence[str | nn.Module] | None
) -> list[str]:
    if layers is None:
        return cascade_layers(work, x)
    if isinstance(layers, str | nn.Module):
        layers = [layers]
    names: list[str] = []
    for layer in layers:
        name, module = resolve_layer(model, layer)
        if next(module.parameters(), None) is None:
            owners = [
                n
                for n, m in model.named_modules()
                if n and next(m.parameters(recurse=False), None) is not None
            ]
            raise AttributionError(
                f"layer '{name}' has no parameters to randomize; modules with parameters are: "
                f"{', '.join(owners)}"
            )
        if name in names:
            raise AttributionError(
                f"layer '{name}' is listed twice in layers={list(map(str, names))}"
            )
        names.append(name)
    if not names:
        raise AttributionError(
            "layers is empty; pass None for every layer or at least one layer name"
        )
    return names


@torch.no_grad()
def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Replace every parameter of ``module`` by Gaussian noise with the tensor's mean and std."""
    for p in module.parameters():
        ref = p.detach().double()
        std = ref.std(correction=0) if p.numel() > 1 else ref.new_zeros(())
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.copy_((noise * std.cpu() + ref.mean().cpu()).to(p))


def _maps(
    explainer: Explainer,
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    options: dict[str, object],
    when: str,
) -> torch.Tensor:
    maps = explainer(model, x.clone(), target, **options)
    if not isinstance(maps, torch.Tensor) or maps.ndim < 2 or maps.shape[0] != x.shape[0]:
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise AttributionError(
            f"the explainer must return maps [N, ...] with N = {x.shape[0]}; got {got} for {when}"
        )
    maps = maps.detach()
    if not torch.isfinite(maps).all():
        rows = (~torch.isfinite(maps)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise AttributionError(
            f"the explainer returned NaN or Inf for {when} in row(s) {rows[:10]}"
        )
    return maps
