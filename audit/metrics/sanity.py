"""Model-randomization sanity check (Adebayo et al., 2018, "Sanity Checks for Saliency Maps").

An explanation that is meant to describe *the model* must change when the model's
weights are destroyed. :func:`randomization_sanity` randomizes the layers of a deep
copy of the model, explains the same inputs and reports the Spearman rank
correlation between the original and the randomized maps. Two modes:

* ``mode="full"`` (the efficient variant, Hedstroem et al. 2023, "Sanity checks
  revisited"): every layer is randomized at once and the maps are computed once.
  This is what the audit gate uses (``engine.sanity_mode: full``): the gate only
  reads the fully randomized model.
* ``mode="cascade"`` (the paper's cascade, the default of this function): step ``i``
  randomizes ``layers[: i + 1]``, from the logits down, and the maps are computed
  after every step (one explanation per layer: slow on deep models).

Both draw the same random weights (same layers, same order, same generator), so the
``full`` result equals the last step of the ``cascade`` one.

* Two variants, as in the paper: on the signed maps and on their absolute values.
  Signed maps can flip sign under randomization (a low signed correlation that says
  nothing about independence); the absolute variant catches maps whose *magnitude*
  pattern survives (e.g. edges of the input). The summary
  :attr:`RandomizationResult.similarity` is the larger of the two after all layers
  are randomized: a method passes only if both are low.
* Constant maps, where Spearman's rho is undefined, are not left undefined:

  - a constant map of the *randomized* model (e.g. an all-zero Grad-CAM once the
    ReLUs die) kept nothing of the original map: it counts as *changed completely*,
    similarity 0;
  - a constant map of the *original* model says nothing about that input: the
    probe is left out (NaN) in both variants, and
    :attr:`RandomizationResult.constant_original` marks it. When every probe is
    left out, :attr:`RandomizationResult.similarity` is NaN (and never passes).

* Randomization: every parameter tensor of a layer is replaced by i.i.d. Gaussian
  values with the *same mean and standard deviation* (population) as the tensor it
  replaces, drawn on the CPU from a private ``torch.Generator`` seeded with ``seed``.
  This destroys the learned structure while keeping each tensor's scale, so
  activations stay in range for any layer type. A constant tensor (e.g. an untrained
  BatchNorm weight of ones, or a single-value parameter) stays constant; buffers
  (BatchNorm running statistics) are kept.
* Spearman's rho with average ranks for ties, computed in torch in float64 for a
  whole batch at once (:func:`spearman`, NaN for a constant row); per-step means skip
  NaN (``torch.nanmean``).

The caller's model is never modified: everything happens on ``copy.deepcopy(model)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from audit.engine.model import (
    AttributionError,
    check_finite,
    prepare_inputs,
    preserved,
    resolve_layer,
    resolve_target,
)
from audit.engine.progress import task

__all__ = ["MODES", "RandomizationResult", "randomization_sanity", "spearman", "cascade_layers"]

Explainer = Callable[..., torch.Tensor]

#: ``full``: every layer randomized at once, one explanation; ``cascade``: one step per layer.
MODES = ("full", "cascade")


@dataclass(frozen=True, eq=False)
class RandomizationResult:
    """Outcome of :func:`randomization_sanity`.

    Attributes:
        method: the method's registered name, or the callable's ``__name__``.
        layers: the randomized layers in cascade order (logits first). ``cascade``:
            step ``i`` has ``layers[: i + 1]`` randomized; ``full``: one step with all
            of them randomized.
        spearman: float32 ``[steps, N]``, signed maps, per step and image (``steps`` is
            ``len(layers)`` for ``cascade``, 1 for ``full``). 0 where the randomized
            map is constant (changed completely), NaN where the original map is.
        spearman_abs: float32 ``[steps, N]``, absolute-value maps, the same rules.
        mode: ``"cascade"`` or ``"full"``.
        constant_original: bool ``[N]``, the original model's map is constant (the
            probe is left out); None for results built by hand (taken from NaN
            columns of both variants).
        constant_randomized: bool ``[steps, N]``, the randomized model's signed map is
            constant; None for results built by hand.
    """

    method: str
    layers: list[str]
    spearman: torch.Tensor
    spearman_abs: torch.Tensor
    mode: str = "cascade"
    constant_original: torch.Tensor | None = None
    constant_randomized: torch.Tensor | None = None

    @property
    def steps(self) -> list[str]:
        """One name per row of :attr:`spearman`: the layers (cascade), or ``["all"]`` (full)."""
        return list(self.layers) if self.mode == "cascade" else ["all"]

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

        A NaN variant is left out; NaN when both are, i.e. when the original map is
        constant on every probe (the method says nothing, so there is nothing to compare).
        """
        defined = [v for v in (self.final, self.final_abs) if not math.isnan(v)]
        return max(defined) if defined else math.nan

    @property
    def n_constant_original(self) -> int:
        """Probes left out because the original model's map is constant."""
        if self.constant_original is not None:
            return int(self.constant_original.sum())
        return int((self.spearman[-1].isnan() & self.spearman_abs[-1].isnan()).sum())

    @property
    def n_constant_randomized(self) -> int:
        """Probes (not left out) whose fully randomized map is constant: changed completely."""
        if self.constant_randomized is None:
            return 0
        keep = self.constant_randomized[-1]
        if self.constant_original is not None:
            keep = keep & ~self.constant_original
        return int(keep.sum())

    def passes(self, threshold: float) -> bool:
        """True when :attr:`similarity` is below ``threshold`` (NaN never passes)."""
        return bool(self.similarity < threshold)

    def to_dict(self) -> dict[str, float]:
        """Flat numbers for logging: the summary, the constant-map counts and the per-step means."""
        out = {
            "similarity": self.similarity,
            "final": self.final,
            "final_abs": self.final_abs,
            "constant_original": float(self.n_constant_original),
            "constant_randomized": float(self.n_constant_randomized),
        }
        for name, v, va in zip(self.steps, self.mean, self.mean_abs, strict=True):
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
    mode: str = "cascade",
    **options: object,
) -> RandomizationResult:
    """Model-randomization test of an explainer (Adebayo et al., 2018; see the module docstring).

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
        mode: ``"cascade"`` (explain after randomizing each layer, top-down: one
            explanation per layer) or ``"full"`` (randomize every layer at once and
            explain once; equals the last cascade step).
        **options: passed to the explainer.

    Returns:
        A :class:`RandomizationResult`.

    Raises:
        AttributionError: a bad method, mode, layer, target or input, an explainer
            output of the wrong shape or with NaN/Inf, or a model that cannot be
            deep-copied.
    """
    explainer, name = _explainer(method)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AttributionError(f"seed must be an integer; got {seed!r}")
    if mode not in MODES:
        raise AttributionError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
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
        # the same layers in the same order from the same generator: the full
        # randomization draws exactly the weights of the cascade's last step
        steps = [[n] for n in order] if mode == "cascade" else [list(order)]
        with preserved(work, grad=True):
            original = _maps(explainer, work, xs, t, options, "the original model")
            flat = original.flatten(1)
            const_o, const_o_abs = _constant(flat), _constant(flat.abs())
            rho, rho_abs, const_r = [], [], []
            ticker = task(f"sanity ({name}, {mode})", len(steps) + 1, "explanations")
            ticker.advance()  # the original model's maps
            for step in steps:
                ticker.advance()
                for layer in step:
                    _randomize(work.get_submodule(layer), gen)
                where = (
                    f"the model randomized down to '{step[-1]}'"
                    if mode == "cascade"
                    else "the model with every layer randomized"
                )
                maps = _maps(explainer, work, xs, t, options, where)
                if maps.shape != original.shape:
                    after = (
                        f"randomizing '{step[-1]}'"
                        if mode == "cascade"
                        else "randomizing every layer"
                    )
                    raise AttributionError(
                        f"the explainer returned maps of shape {tuple(maps.shape)} after {after} but "
                        f"{tuple(original.shape)} before; the map shape must not depend on the weights"
                    )
                rflat = maps.flatten(1)
                c_r, c_r_abs = _constant(rflat), _constant(rflat.abs())
                rho.append(_similarity(original, maps, const_o, c_r))
                rho_abs.append(
                    _similarity(original.abs(), maps.abs(), const_o_abs | const_o, c_r_abs)
                )
                const_r.append(c_r)
            ticker.close()
    return RandomizationResult(
        method=name,
        layers=list(order),
        spearman=torch.stack(rho).cpu(),
        spearman_abs=torch.stack(rho_abs).cpu(),
        mode=mode,
        constant_original=const_o.cpu(),
        constant_randomized=torch.stack(const_r).cpu(),
    )


def _constant(flat: torch.Tensor) -> torch.Tensor:
    """Rows ``[N, D]`` whose values are all equal, ``[N]`` bool."""
    return (flat == flat[:, :1]).all(dim=1)


def _similarity(
    original: torch.Tensor, randomized: torch.Tensor, const_o: torch.Tensor, const_r: torch.Tensor
) -> torch.Tensor:
    """Spearman per image; 0 where the randomized map is constant, NaN where the original is."""
    rho = spearman(original, randomized)
    rho = torch.where(const_r, torch.zeros_like(rho), rho)
    return torch.where(const_o, torch.full_like(rho, float("nan")), rho)


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
