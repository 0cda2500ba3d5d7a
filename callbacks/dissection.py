"""``DissectionCallback``: how many units of a layer follow the context, and how much of each logit they carry, per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import Any

import torch
from torch import nn

from audit.callbacks._base import AuditCallback, check_outputs, check_probes_arg, load_probes
from audit.engine.model import AttributionError, resolve_layer
from audit.engine.rows import pick_rows
from audit.evidence.dissection import dissect, probe_contexts, to_raw
from audit.gate.tracking import Record, metric_key
from audit.methods import activation_maximization
from audit.probes import ProbeSet
from audit.report import pictures
from audit.rules import dissection as rules

__all__ = ["DissectionCallback"]


class DissectionCallback(AuditCallback):
    """Every N epochs, dissect one layer on the probes' masks (:func:`audit.evidence.dissection.dissect`).

    Logged with the epoch (or global step) as the step:

    * ``<prefix>/context_units``: units whose best concept is a context with IoU above
      ``iou_threshold`` (per named context when the probe groups name them);
    * ``<prefix>/context_share/<class>``: the share of the positive unit contributions to
      the class's logit, on its probes, that those units supply (exact for a GAP +
      linear head; see :mod:`audit.evidence.dissection`);
    * the image series ``<prefix>`` (the key itself, beside the other callbacks' images
      under ``audit``; its scalars sit one level deeper): the activation-maximization
      images of up to ``show`` context units, most aligned first, captioned with their
      concept and IoU (a fixed seed, so a change between epochs is a change of the model).

    A rise of the context units' count and share over the epochs is a shortcut being
    learned. The pass runs on global rank zero only (the other ranks skip it).

    Args:
        probes: a :class:`~audit.probes.ProbeSet` with masks (groups ``"<class>|<context>"``
            name the contexts) or a probe folder path.
        every_n_epochs: a fixed cadence, every N epochs (None: by the time budget,
            ``max_overhead``; see :class:`~callbacks._base.AuditCallback`).
        every_n_steps: a fixed cadence, every N optimizer steps as well.
        layer: module name inside the audited module; None: the last channels-first
            feature map (``features`` on SmallCNN, ``layer4`` on a ResNet), found at
            each pass (the activation-maximization callback's rule).
        quantile: a unit fires on this top share of its upsampled activations.
        iou_threshold: a context unit's best context IoU must exceed it.
        max_probes: most probes dissected (spread over the groups).
        show: context units shown with an activation-maximization image (0: none).
        steps: gradient-ascent steps of those images.
        seed: seed of their private generator.
        prefix: first part of every key.
        **kwargs: options of :class:`~callbacks._base.AuditCallback`.
    """

    kind = "dissection"

    def __init__(
        self,
        probes: ProbeSet | str | PathLike,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        *,
        layer: str | None = None,
        quantile: float = 0.2,
        iou_threshold: float = 0.2,
        max_probes: int = 64,
        show: int = 4,
        steps: int = 16,
        seed: int = 0,
        prefix: str = "audit/dissection",
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, **kwargs)
        check_probes_arg(probes)
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ValueError(
                f"layer must be a module name such as 'features' or None; got {layer!r}"
            )
        if isinstance(quantile, bool) or not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"quantile must lie in (0, 1), e.g. 0.2; got {quantile!r}")
        if isinstance(iou_threshold, bool) or not 0.0 <= float(iou_threshold) < 1.0:
            raise ValueError(f"iou_threshold must lie in [0, 1), e.g. 0.2; got {iou_threshold!r}")
        for name, value, low in (
            ("max_probes", max_probes, 1),
            ("show", show, 0),
            ("steps", steps, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        self.probes_arg = probes
        self.probes: ProbeSet | None = probes if isinstance(probes, ProbeSet) else None
        self.layer = layer
        self.quantile = float(quantile)
        self.iou_threshold = float(iou_threshold)
        self.max_probes = max_probes
        self.show = show
        self.steps = steps
        self.seed = int(seed)
        self.prefix = prefix

    def _state_key_fields(self) -> dict[str, Any]:
        return {**super()._state_key_fields(), "layer": self.layer, "prefix": self.prefix}

    def _setup(self, trainer: Any, pl_module: Any) -> None:
        if self.probes is None:
            self.probes = load_probes(self.probes_arg)
        if self.probes.masks is None:
            raise ValueError(
                f"DissectionCallback needs object masks, and {self.probes!r} has none; use probes with a mask "
                "column (docs/probes.md)"
            )
        self._sub = self.probes.subset(
            pick_rows(len(self.probes), self.max_probes, self.probes.groups)
        )

    def _check_model(self, model: nn.Module) -> None:
        check_outputs(model, self.probes, type(self).__name__)
        if self.layer is not None:
            try:
                resolve_layer(model, self.layer)
            except AttributionError as err:
                raise ValueError(f"DissectionCallback: {err}") from None

    def _describe_pass(self) -> str:
        return f"{len(self._sub)} probes, {self.layer or 'the last feature map'}"

    def _compute(self, trainer: Any, model: nn.Module) -> dict[str, Any] | None:
        if not trainer.is_global_zero:
            return None
        ps = self._sub
        ctx, names = probe_contexts(ps)
        d = dissect(
            model,
            ps.images,
            ps.masks,
            ps.labels,
            layer=self.layer,
            contexts=ctx,
            context_names=names,
            quantile=self.quantile,
            iou_threshold=self.iou_threshold,
        )
        block = to_raw(d, list(ps.class_names))
        units = rules.context_units(block)[: self.show]
        images = None
        if units and self.steps > 0:
            imgs, _ = activation_maximization(
                model, d.layer, units, steps=self.steps, size=tuple(ps.size), seed=self.seed
            )
            images = imgs.detach().cpu()
        return {"block": block, "units": units, "images": images}

    def _merge(self, parts: Sequence[Any]) -> dict[str, Any]:
        return parts[0]

    def _record(self, trainer: Any, result: dict[str, Any], step: int) -> Record:
        block = result["block"]
        units = rules.context_units(block)
        metrics = {metric_key(self.prefix, "context_units"): float(len(units))}
        for cls, v in rules.carried(block, units).items():
            metrics[metric_key(self.prefix, "context_share", cls)] = v
        images: torch.Tensor | None = result["images"]
        if images is None:
            return Record(step=step, metrics=metrics)
        best = {r["unit"]: r for r in rules.rows(block)}
        captions = [f"unit {u}: {best[u]['concept']} {best[u]['iou']:.2f}" for u in result["units"]]
        what = "step" if self._uses_steps() else "epoch"
        title = f"{block['layer']} context units, {what} {step}"
        array, key = images.numpy(), self.prefix

        def draw() -> dict[str, Any]:
            return {
                key: pictures.image_grid(array, captions, ncols=min(8, len(captions)), title=title)
            }

        return Record(step=step, metrics=metrics, render=draw)
