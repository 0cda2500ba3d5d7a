"""The evidence engine: one probe set, one model -> maps, metrics, curves, behaviour.

The training-time callbacks and the audit job both call :func:`collect` and
:func:`summarize`, so for the same weights and probe set they report the same
numbers. Nothing here talks to MLflow, draws from a global RNG or leaves anything
on the model (see :func:`audit.engine.model.preserved`).

* :func:`collect` returns an :class:`Evidence` of per-probe tensors for some rows
  of a probe set (all rows, or one rank's shard under DDP).
* :meth:`Evidence.cat` joins shards back together, in probe order.
* :func:`summarize` turns evidence into a flat ``dict[str, float]``: per method
  ``<method>/deletion_auc``, ``<method>/lerf_auc``, ``<method>/srg`` (the symmetric
  relevance gain, the faithfulness statistic the gate judges),
  ``<method>/insertion_auc``, ``<method>/relevance_mass``, ``<method>/outside_mask``
  ..., and the behaviour numbers ``accuracy``, ``acc/<group>``,
  ``context_gap/<class>``, ``context_gap``, ``flip_rate``.

One definition per number: the curves' steps and baseline default to the audit
engine's (``conf/engine/default.yaml``, :func:`audit.defaults.engine_defaults`), so a training
run's ``audit/lrp/srg`` and an audit run's ``lrp/srg`` are the same quantity.
Curves measured with other steps or another baseline carry a suffix in every name
derived from them (:func:`curve_suffix`: ``lrp/srg.zero.s8``), so they never pass
for the gate's numbers.

Cost: the deletion, LeRF and insertion curves dominate (``steps + 1`` forward
passes per probe, method and curve). They run for all methods, every kind and the
random reference in one batched call (:func:`audit.metrics.curve_set`, which evaluates the
unperturbed and the all-baseline image of a probe once for all of them), on a
forward-only copy of the model whose BatchNorm layers are folded into the
convolution before them and, on CPU, in channels-last layout (about 1.3x faster
on the project's CNNs). The copy is checked against the model on the clean probes
before use; if it disagrees the model itself is used (``Evidence.fast`` says which).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from audit.defaults import engine_defaults, engine_steps_and_baseline
from audit.engine.model import AttributionError, chunks, model_device, preserved
from audit.engine.progress import task
from audit.evidence.behaviour import context_gaps, flip_rate, group_accuracy
from audit.methods import METHODS, explain
from audit.methods.gradcam import gradcam_layer
from audit.metrics import (
    curve_set,
    pointing_game,
    random_attribution,
    relevance_mass,
    relevance_rank,
)
from audit.probes import ProbeSet

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_METRICS",
    "METRICS",
    "CURVES",
    "MASK_METRICS",
    "TARGETS",
    "Evidence",
    "collect",
    "summarize",
    "check_names",
    "curve_suffix",
    "inference_copy",
]

DEFAULT_METHODS = ("gradcam", "input_x_gradient", "lrp")  # as conf/engine/default.yaml
#: ``lerf`` with ``deletion`` gives ``<method>/srg``, the faithfulness statistic of the gate
DEFAULT_METRICS = ("deletion", "lerf", "insertion", "relevance_mass")
#: ``lerf``: the deletion curve of the ascending ranking (least relevant first)
CURVES = ("deletion", "insertion", "lerf")
#: the gate's faithfulness statistic, ``AUC(LeRF) - AUC(MoRF)`` per probe (needs both curves)
SRG = "srg"
MASK_METRICS = ("relevance_mass", "relevance_rank", "pointing_game")
#: ``random_reference``: the deletion (and insertion) curve of a random pixel ranking,
#: the chance level a method's AUC is judged against (one extra curve per probe).
METRICS = (*CURVES, *MASK_METRICS, "random_reference")
TARGETS = ("label", "predicted")
RANDOM = "random"  # the pseudo-method name under which the random reference is stored


@dataclass
class Evidence:
    """Per-probe evidence for the rows ``index`` of a probe set (CPU or model device).

    Attributes:
        index: int64 ``[n]``, the probe rows this evidence covers, ascending.
        logits: ``[n, classes]`` on the clean probes (eval mode).
        targets: int64 ``[n]``, the class each map explains.
        maps: method -> ``[m, 1, H, W]`` attribution maps of the rows ``map_index``.
        map_index: int64 ``[m]``, the rows whose maps are kept (all rows unless trimmed).
        scores: method -> metric -> ``[n]`` (``deletion``/``insertion`` hold the AUC).
        curves: method -> ``"deletion"``/``"insertion"`` -> ``[n, steps + 1]``; the
            random reference is stored under the method name ``"random"``.
        errors: method -> ``"ExceptionType: message"`` for methods that failed
            (only with ``on_error="record"``); a failed method has no maps, scores
            or curves.
        fast: whether the curves ran on the folded inference copy.
        steps: the curves' steps (None: the engine's).
        baseline: the curves' baseline (``"tensor"`` for a tensor baseline; None: the engine's).
        layers: method -> the layer its maps come from, for methods that explain a
            layer (Grad-CAM: its default for the model and probe size, e.g.
            ``layer4`` or ``encoder.layers.encoder_layer_11.ln_1``, or the
            ``method_options`` layer), so reports and runs can name it.
    """

    index: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    map_index: torch.Tensor | None = None
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    curves: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    fast: bool = False
    steps: int | None = None
    baseline: str | None = None
    layers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.map_index is None:
            self.map_index = self.index

    @property
    def predictions(self) -> torch.Tensor:
        """Predicted class per probe ``[n]``."""
        return self.logits.argmax(dim=1)

    @property
    def methods(self) -> list[str]:
        """Methods that produced evidence (failed ones excluded), in call order."""
        return [m for m in self.scores if m != RANDOM]

    def cpu(self) -> Evidence:
        """A copy with every tensor on the CPU (for gathering and logging)."""

        def mv(d: Mapping[str, Any]) -> dict[str, Any]:
            return {k: mv(v) if isinstance(v, Mapping) else v.detach().cpu() for k, v in d.items()}

        return replace(
            self,
            index=self.index.cpu(),
            logits=self.logits.detach().cpu(),
            targets=self.targets.cpu(),
            maps=mv(self.maps),
            map_index=self.map_index.cpu(),
            scores=mv(self.scores),
            curves=mv(self.curves),
            errors=dict(self.errors),
            layers=dict(self.layers),
        )

    def keep_maps(self, rows: Sequence[int] | torch.Tensor) -> Evidence:
        """A copy that keeps only the maps of the probe rows ``rows`` (others dropped)."""
        wanted = torch.as_tensor(rows, dtype=torch.long, device=self.map_index.device)
        sel = torch.isin(self.map_index, wanted)
        return replace(
            self,
            maps={m: a[sel.to(a.device)] for m, a in self.maps.items()},
            map_index=self.map_index[sel],
        )

    @staticmethod
    def cat(parts: Sequence[Evidence]) -> Evidence:
        """Join shards (e.g. one per rank) into one evidence in ascending probe order.

        A method that failed in any shard is reported as failed overall (its error
        message is the first one seen) and dropped from maps, scores and curves.
        """
        parts = [p for p in parts if p is not None]
        if not parts:
            raise ValueError("Evidence.cat needs at least one part")
        errors: dict[str, str] = {}
        for p in parts:
            for m, e in p.errors.items():
                errors.setdefault(m, e)
        index = torch.cat([p.index for p in parts])
        order = torch.argsort(index)
        map_index = torch.cat([p.map_index for p in parts])
        map_order = torch.argsort(map_index)

        def join(get, by_rows: torch.Tensor) -> torch.Tensor:
            return torch.cat([get(p) for p in parts])[by_rows]

        first = parts[0]
        methods = [m for m in first.scores if m not in errors and all(m in p.scores for p in parts)]
        layers: dict[str, str] = {}
        for p in parts:  # an empty shard resolved no layer: the others did
            for m, name in p.layers.items():
                if m not in errors:
                    layers.setdefault(m, name)
        return Evidence(
            index=index[order],
            logits=join(lambda p: p.logits, order),
            targets=join(lambda p: p.targets, order),
            maps={
                m: join(lambda p, m=m: p.maps[m], map_order)
                for m in first.maps
                if m not in errors and all(m in p.maps for p in parts)
            },
            map_index=map_index[map_order],
            scores={
                m: {k: join(lambda p, m=m, k=k: p.scores[m][k], order) for k in first.scores[m]}
                for m in methods
            },
            curves={
                m: {k: join(lambda p, m=m, k=k: p.curves[m][k], order) for k in first.curves[m]}
                for m in first.curves
                if m not in errors and all(m in p.curves for p in parts)
            },
            errors=errors,
            fast=all(p.fast for p in parts),
            steps=first.steps,
            baseline=first.baseline,
            layers=layers,
        )


def check_names(
    methods: Sequence[str], metrics: Sequence[str] = (), target: str = "label"
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Validate method and metric names early; returns them as tuples.

    Raises:
        ValueError: an unknown or repeated name, naming the valid choices.
    """
    if isinstance(methods, str) or isinstance(metrics, str):
        raise ValueError(
            f"methods and metrics must be lists of names, e.g. ['gradcam']; got "
            f"methods={methods!r}, metrics={metrics!r}"
        )
    methods, metrics = tuple(methods), tuple(metrics)
    for kind, names, valid in (
        ("method", methods, sorted(METHODS)),
        ("metric", metrics, list(METRICS)),
    ):
        for n in names:
            if n not in valid:
                raise ValueError(f"unknown {kind} {n!r}; valid {kind}s are: {', '.join(valid)}")
        if len(set(names)) != len(names):
            raise ValueError(f"{kind}s must not repeat; got {list(names)}")
    if RANDOM in methods:
        raise ValueError(
            f"'{RANDOM}' is reserved for the random reference; register the method under another name"
        )
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}; got {target!r}")
    return methods, metrics


def curve_suffix(steps: int | None, baseline: str | torch.Tensor | None) -> str:
    """The suffix of curve-derived metric names: ``""`` at the engine's defaults, else ``".<baseline>.s<steps>"``.

    E.g. ``".zero.s8"`` for zero-baseline curves of 8 steps; a tensor baseline is
    ``"tensor"``; None stands for the engine's value. :func:`summarize` appends it to ``deletion_auc``, ``lerf_auc``,
    ``insertion_auc`` and ``srg``, so a number measured another way has another name.
    """
    default_steps, default_baseline = engine_steps_and_baseline()
    steps = default_steps if steps is None else steps
    name = (
        default_baseline
        if baseline is None
        else "tensor"
        if isinstance(baseline, torch.Tensor)
        else str(baseline)
    )
    return "" if (steps, name) == (default_steps, default_baseline) else f".{name}.s{steps}"


def collect(
    model: nn.Module,
    probes: ProbeSet,
    methods: Sequence[str] = DEFAULT_METHODS,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    target: str = "label",
    steps: int | None = None,
    baseline: str | torch.Tensor | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    max_batch: int = 64,
    rows: Sequence[int] | torch.Tensor | None = None,
    fast: bool = True,
    on_error: str = "raise",
) -> Evidence:
    """Explain ``probes`` (or the rows ``rows`` of it) and measure the maps.

    Deterministic for given weights and probes: no global RNG is drawn, and the
    model's state (training flags, ``requires_grad``, ``.grad``, BatchNorm statistics,
    hooks, grad mode) is restored. Works under ``torch.inference_mode()``.

    Args:
        model: classifier returning logits ``[N, classes]`` for display-space images.
        probes: the probe set.
        methods: explainer names (``audit.methods.METHODS``).
        metrics: names from :data:`METRICS`. Mask metrics need ``probes.masks``.
        target: ``"label"`` explains the true class, ``"predicted"`` the model's.
        steps: curve steps; None: the engine's (``conf/engine/default.yaml``, 16).
        baseline: curve baseline (see :func:`audit.metrics.deletion_curve`); None: the
            engine's (``blur``).
        method_options: per method keyword options for :func:`audit.methods.explain`,
            e.g. ``{"gradcam": {"layer": "features"}}``.
        max_batch: most images per forward pass.
        rows: probe rows to cover (e.g. one rank's shard); None = all.
        fast: run the curves on the folded inference copy (see the module docstring).
        on_error: ``"raise"``, or ``"record"`` to note a failing method in
            ``Evidence.errors`` and go on with the others.

    Returns:
        The :class:`Evidence` of the rows, on the model's device.

    Raises:
        ValueError: unknown names, mask metrics without masks, a bad ``on_error``.
        AttributionError: from the explainers and metrics (with ``on_error="raise"``).
    """
    defaults = engine_defaults()
    steps = defaults["steps"] if steps is None else steps
    baseline = defaults["baseline"] if baseline is None else baseline
    with torch.inference_mode(False):  # plain tensors even when called from validation
        return _collect(
            model,
            probes,
            methods,
            metrics,
            target,
            steps,
            baseline,
            method_options,
            max_batch,
            rows,
            fast,
            on_error,
        )


def _collect(
    model: nn.Module,
    probes: ProbeSet,
    methods: Sequence[str],
    metrics: Sequence[str],
    target: str,
    steps: int,
    baseline: str | torch.Tensor,
    method_options: Mapping[str, Mapping[str, Any]] | None,
    max_batch: int,
    rows: Sequence[int] | torch.Tensor | None,
    fast: bool,
    on_error: str,
) -> Evidence:
    methods, metrics = check_names(methods, metrics, target)
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record'; got {on_error!r}")
    if probes.masks is None and any(m in MASK_METRICS for m in metrics):
        raise ValueError(
            f"metrics {[m for m in metrics if m in MASK_METRICS]} need object masks, and the probe "
            "set has none; drop them from metrics or use probes with masks"
        )
    options = {m: dict((method_options or {}).get(m, {})) for m in methods}
    unknown = set(method_options or {}) - set(methods)
    if unknown:
        raise ValueError(
            f"method_options for {sorted(unknown)}, which are not in methods {list(methods)}"
        )
    index = (
        torch.arange(len(probes))
        if rows is None
        else torch.as_tensor(rows, dtype=torch.long).sort().values
    )
    device = model_device(model)
    images = probes.images[index].to(device)
    n = images.shape[0]
    how = {
        "steps": steps,
        "baseline": "tensor" if isinstance(baseline, torch.Tensor) else str(baseline),
    }
    if n == 0:  # an empty shard (more ranks than probes): empty tensors, same methods
        empty = torch.empty(0, device=device)
        return Evidence(
            index=index,
            logits=torch.empty(0, len(probes.class_names), device=device),
            targets=torch.empty(0, dtype=torch.long, device=device),
            maps={m: torch.empty(0, 1, *probes.size, device=device) for m in methods},
            scores={
                m: {k: empty for k in metrics if k in MASK_METRICS or k in CURVES} for m in methods
            },
            curves={
                m: {k: torch.empty(0, steps + 1, device=device) for k in CURVES if k in metrics}
                for m in methods
            },
            **how,
        )
    logits = _logits(model, images, max_batch)
    targets = probes.labels[index].to(device) if target == "label" else logits.argmax(dim=1)
    ev = Evidence(index=index, logits=logits, targets=targets, **how)

    for m in methods:
        try:
            # chunked: an explainer's backward holds the activations of its whole batch
            # (512 ResNet-50 probes at 224x224 in one call need ~50 GiB)
            parts = []
            with task(f"{m} maps", n) as t:
                for sl in chunks(n, max_batch):
                    parts.append(explain(m, model, images[sl], targets[sl], **options[m]))
                    t.advance(sl.stop - sl.start)
            maps = torch.cat(parts)
            if not torch.isfinite(maps).all():
                raise AttributionError(f"method '{m}' returned NaN or Inf maps")
            layer = _layer_of(m, model, images[:1], options[m])  # cached by the explainer: no pass
        except Exception as err:  # noqa: BLE001 - recorded and reported by the caller
            if on_error == "raise":
                raise
            ev.errors[m] = f"{type(err).__name__}: {err}"
            continue
        ev.maps[m] = maps
        if layer is not None:
            ev.layers[m] = layer
        ev.scores[m] = {}

    done = list(ev.maps)
    if probes.masks is not None:
        masks = probes.masks[index].to(device)
        has_object = masks.flatten(1).any(dim=1)
        for m in done:
            for k in metrics:
                if k in MASK_METRICS:
                    ev.scores[m][k] = _mask_metric(k, ev.maps[m], masks, has_object)

    kinds = [k for k in CURVES if k in metrics]
    if done and (kinds or "random_reference" in metrics):
        curve_model = inference_copy(model, images, logits) if fast else None
        ev.fast = curve_model is not None
        fwd = curve_model if curve_model is not None else model
        # one pass for every method, every kind and the random reference: the unperturbed
        # and all-baseline images are shared by all of them (see metrics.curve_set)
        names = list(done) if kinds else []
        maps = [ev.maps[m] for m in names]
        if "random_reference" in metrics:
            names.append(RANDOM)
            maps.append(random_attribution(images, seed=0))
            ev.scores[RANDOM] = {}
        out = curve_set(
            fwd,
            images,
            targets,
            torch.cat(maps),
            tuple(kinds) or ("deletion",),
            steps=steps,
            baseline=baseline,
            max_batch=max_batch,
        )
        for kind, (curves, auc) in out.items():
            for i, m in enumerate(names):
                ev.curves.setdefault(m, {})[kind] = curves[i * n : (i + 1) * n]
                ev.scores[m][kind] = auc[i * n : (i + 1) * n]
    return ev


def summarize(evidence: Evidence, probes: ProbeSet) -> dict[str, float]:
    """Flat numbers from (gathered) evidence; keys as in the module docstring.

    Per method and metric the mean over probes (NaN-skipping for the mask metrics,
    whose value is undefined for a map without positive relevance); with deletion and
    LeRF curves ``srg``, the mean of ``AUC(LeRF) - AUC(MoRF)``. Curve names carry
    :func:`curve_suffix` when the evidence was not measured at the engine's steps
    and baseline. ``outside_mask``
    is ``1 - relevance_mass``: the share of positive relevance off the object;
    ``outside_area`` is the share expected from the masks' area alone. Behaviour
    numbers come from the predictions on the clean probes: ``accuracy``, and with
    groups ``acc/<group>``, ``context_gap/<class>`` (best minus worst context of one
    class) and ``context_gap`` (the largest); with pairs ``flip_rate``.
    """
    ps = probes if len(evidence.index) == len(probes) else probes.subset(evidence.index)
    pred = evidence.predictions.cpu()
    out: dict[str, float] = {"accuracy": float((pred == ps.labels).float().mean())}
    if ps.groups is not None:
        accs = group_accuracy(ps, pred)
        for g, a in accs.items():
            out[f"acc/{g}"] = a.accuracy
        gaps = {
            c: best.accuracy - worst.accuracy for c, (worst, best) in context_gaps(accs).items()
        }
        for c, gap in gaps.items():
            out[f"context_gap/{c}"] = gap
        if gaps:
            out["context_gap"] = max(gaps.values())
    if ps.pairs is not None:
        flipped, pairs = flip_rate(ps, pred)
        if pairs:
            out["flip_rate"] = flipped / pairs
    if ps.masks is not None:
        out["outside_area"] = 1.0 - float(ps.masks.float().mean())
    suffix = curve_suffix(evidence.steps, evidence.baseline)
    for m, per in evidence.scores.items():
        for k, v in per.items():
            name = f"{k}_auc{suffix}" if k in CURVES else k
            value = float(torch.nanmean(v.float())) if v.numel() else math.nan
            out[f"{m}/{name}"] = value
            if k == "relevance_mass":
                out[f"{m}/outside_mask"] = 1.0 - value
        if "deletion" in per and "lerf" in per:
            gain = (per["lerf"] - per["deletion"]).float()
            out[f"{m}/{SRG}{suffix}"] = float(gain.mean()) if gain.numel() else math.nan
    return out


# ----------------------------------------------------------------------- helpers
#: methods that explain at a layer -> ``fn(model, inputs, layer option) -> the layer's name``
_LAYER_OF = {"gradcam": gradcam_layer}


def _layer_of(
    method: str, model: nn.Module, example: torch.Tensor, options: Mapping[str, Any]
) -> str | None:
    """The layer ``method``'s maps come from (its default resolved), or None for methods without one."""
    fn = _LAYER_OF.get(method)
    if fn is None:
        return None
    return fn(model, example, options.get("layer"))


def _logits(model: nn.Module, images: torch.Tensor, max_batch: int) -> torch.Tensor:
    with preserved(model, grad=False):
        return torch.cat(
            [model(images[sl]).detach() for sl in chunks(images.shape[0], max_batch)]
        ).float()


def _mask_metric(
    name: str, maps: torch.Tensor, masks: torch.Tensor, has_object: torch.Tensor
) -> torch.Tensor:
    """The mask metric per probe; NaN where the mask is empty (undefined there)."""
    fn = {
        "relevance_mass": relevance_mass,
        "relevance_rank": relevance_rank,
        "pointing_game": pointing_game,
    }[name]
    out = torch.full((maps.shape[0],), math.nan, device=maps.device)
    if has_object.any():
        out[has_object] = fn(maps[has_object], masks[has_object]).to(out)
    return out


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def inference_copy(
    model: nn.Module, example: torch.Tensor | None = None, expected: torch.Tensor | None = None
) -> nn.Module | None:
    """A forward-only copy of ``model`` with BatchNorm folded in, or None if it would differ.

    The copy has its own tensors (the model is never touched): every module object
    is copied shallowly with fresh parameter and buffer tensors, and in each
    ``nn.Sequential`` an eval-mode BatchNorm right after a Conv2d/Linear is folded
    into it (the BatchNorm becomes ``nn.Identity``). On CPU the copy and its inputs
    use the channels-last layout, which oneDNN runs faster. With ``example`` and
    ``expected`` (the model's logits on it) the copy is checked first; a copy whose
    logits differ by more than float rounding is refused (None).
    """
    try:
        with torch.inference_mode(False), torch.no_grad():
            return _checked_copy(model, example, expected)
    except (RuntimeError, TypeError, ValueError, AttributeError):
        # A model the copy cannot handle (an unusual module, a shape it rejects) is
        # simply evaluated as it is: the copy is only a speed-up.
        return None


def _checked_copy(
    model: nn.Module, example: torch.Tensor | None, expected: torch.Tensor | None
) -> nn.Module | None:
    clone = _clone(model)
    _fold(clone)
    clone.eval()
    channels_last = model_device(model).type == "cpu"
    if channels_last:
        clone = clone.to(memory_format=torch.channels_last)
    fast = _ChannelsLast(clone) if channels_last else clone
    if example is not None and expected is not None:
        got = torch.cat([fast(example[sl]) for sl in chunks(example.shape[0], 64)]).float()
        scale = max(1.0, float(expected.abs().max()))
        if got.shape != expected.shape or not torch.allclose(
            got, expected, rtol=1e-3, atol=1e-4 * scale
        ):
            return None
    return fast


class _ChannelsLast(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def _clone(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """Copy the module tree (module objects and tensors), sharing every other attribute."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = copy.copy(module)
    memo[id(module)] = new
    new._parameters = {
        k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=False)
        for k, p in module._parameters.items()
    }
    new._buffers = {
        k: None if b is None else b.detach().clone() for k, b in module._buffers.items()
    }
    new._modules = {k: None if c is None else _clone(c, memo) for k, c in module._modules.items()}
    return new


def _fold(module: nn.Module) -> None:
    for child in module.children():
        _fold(child)
    if type(module) is not nn.Sequential:  # subclasses may override forward
        return
    names = list(module._modules)
    for a, b in zip(names, names[1:], strict=False):
        lin, bn = module._modules[a], module._modules[b]
        if not isinstance(bn, _BN) or bn.running_mean is None or bn.running_var is None:
            continue
        if type(lin) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
            module._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(lin.eval(), bn.eval())
        elif type(lin) is nn.Linear and isinstance(bn, nn.BatchNorm1d):
            module._modules[a] = torch.nn.utils.fusion.fuse_linear_bn_eval(lin.eval(), bn.eval())
        else:
            continue
        module._modules[b] = nn.Identity()
