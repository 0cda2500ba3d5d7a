"""``ActivationMaximizationCallback``: what the units of one layer respond to, epoch by epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from audit.callbacks._base import AuditCallback
from audit.engine.model import (
    AttributionError,
    last_feature_map,
    layer_outputs,
    model_device,
    preserved,
    resolve_layer,
)
from audit.gate.tracking import Record, metric_key
from audit.methods import activation_maximization
from audit.report import pictures

__all__ = ["ActivationMaximizationCallback"]


class ActivationMaximizationCallback(AuditCallback):
    """Every N epochs, synthesize one image per unit of ``layer`` and log them as a grid.

    Logged with the epoch (or global step) as the step: the image series
    ``<prefix>/<layer>`` (one tile per unit, captioned with the activation it
    reached) and the metrics ``<prefix>/<layer>/unit_<u>`` (that activation).

    The images come from :func:`audit.methods.activation_maximization` with a fixed
    seed, so a change between epochs is a change of the model. The work is small
    and runs on global rank zero only; the other ranks skip it.

    Args:
        layer: module name inside the audited module (e.g. ``"features.9"``, ``"layer4"``),
            ``"logits"`` for the class outputs, or None: the last module whose output
            is a channels-first feature map (``[N, C, h, w]``, ``h*w > 1``), found at fit
            start with one forward pass of a blank image (``layer4`` for torchvision's
            ResNets, ``features`` for SmallCNN); ``"logits"`` when there is none or
            transformer tokens follow it (a ViT: its token outputs have no channels
            axis, and its one map is the patch embedding).
        units: channel (or class) indices to visualize; None: the first four (all
            when the layer has fewer), counted at fit start.
        every_n_epochs: a fixed cadence, every N epochs (None: by the time budget,
            ``max_overhead``; see :class:`~callbacks._base.AuditCallback`).
        every_n_steps: a fixed cadence, every N optimizer steps as well.
        steps: gradient-ascent steps.
        size: side of the synthesized images in pixels.
        seed: seed of the private generator (initial noise, jitter).
        options: further keyword options of ``activation_maximization`` (``lr``,
            ``jitter``, ``blur_every``, ...).
        prefix: first part of every key.
        **kwargs: options of :class:`~callbacks._base.AuditCallback`.
    """

    kind = "actmax"

    def __init__(
        self,
        layer: str | None = None,
        units: Sequence[int] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        *,
        steps: int = 32,
        size: int = 64,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
        prefix: str = "audit/actmax",
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, **kwargs)
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ValueError(
                f"layer must be a module name such as 'features.9', 'logits' or None (found at fit start); got {layer!r}"
            )
        if units is not None:
            if isinstance(units, (int, str)) or not units:
                raise ValueError(
                    f"units must be a non-empty list of channel indices or None; got {units!r}"
                )
            bad = [u for u in units if isinstance(u, bool) or not isinstance(u, int) or u < 0]
            if bad:
                raise ValueError(f"units must be non-negative integers; got {list(units)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an integer >= 8 (pixels); got {size!r}")
        reserved = {"model", "layer", "units", "steps", "size", "seed"} & set(options or {})
        if reserved:
            raise ValueError(
                f"options must not set {sorted(reserved)}; they are arguments of the callback"
            )
        self._layer_arg = layer  # as given: the state key, the same before and after fit start
        self.layer = layer  # resolved at fit start when None
        self._units_arg = None if units is None else [int(u) for u in units]
        self.units = (
            [] if units is None else list(self._units_arg)
        )  # the first four at fit start when None
        self.steps = steps
        self.size = size
        self.seed = int(seed)
        self.options = dict(options or {})
        self.prefix = prefix

    def _state_key_fields(self) -> dict[str, Any]:
        return {**super()._state_key_fields(), "layer": self._layer_arg, "units": self._units_arg}

    def _check_model(self, model: nn.Module) -> None:
        if self._layer_arg is None:
            self.layer = self._default_layer(model)
        if self.layer != "logits":
            try:
                resolve_layer(model, self.layer)
            except AttributionError as err:
                raise ValueError(f"ActivationMaximizationCallback: {err}") from None
        if self._units_arg is None:
            self.units = list(range(min(4, self._channels(model))))

    def _default_layer(self, model: nn.Module) -> str:
        """The last channels-first feature map of a blank image's forward pass, else ``"logits"``.

        ``"logits"`` too when transformer tokens come after that map: there it is only the
        patch embedding (a ViT's ``conv_proj``), and the classes say more.
        """
        name = last_feature_map(
            model, self._blank(model)
        )  # no_grad, the model's state kept (BatchNorm too)
        return "logits" if name is None else name

    def _blank(self, model: nn.Module) -> torch.Tensor:
        channels = int(self.options.get("channels", 3))
        return torch.zeros(1, channels, self.size, self.size, device=model_device(model))

    def _channels(self, model: nn.Module) -> int:
        """Channels of ``self.layer`` (classes for ``"logits"``) on a blank image."""
        blank = self._blank(model)
        if self.layer == "logits":
            with preserved(model, grad=False):
                return int(model(blank).shape[1])
        name = resolve_layer(model, self.layer)[0]
        shapes = [o.shape for o in layer_outputs(model, blank) if o.name == name]
        if not shapes or len(shapes[-1]) < 2:
            raise ValueError(
                f"ActivationMaximizationCallback: layer {self.layer!r} gives no [N, channels, ...] output; "
                "name another layer or give units=[...]"
            )
        return int(shapes[-1][1])

    def _describe_pass(self) -> str:
        return f"{len(self.units)} units of {self.layer}, {self.steps} steps"

    def _compute(self, trainer: Any, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not trainer.is_global_zero:
            return None
        layer = None if self.layer == "logits" else self.layer
        images, acts = activation_maximization(
            model,
            layer,
            self.units,
            steps=self.steps,
            size=self.size,
            seed=self.seed,
            **self.options,
        )
        return images.detach().cpu(), acts.detach().cpu()

    def _merge(self, parts: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return parts[0]

    def _record(self, trainer: Any, result: tuple[torch.Tensor, torch.Tensor], step: int) -> Record:
        images, acts = result
        metrics = {
            metric_key(self.prefix, self.layer, f"unit_{u}"): float(a)
            for u, a in zip(self.units, acts, strict=True)
        }
        captions = [f"unit {u}: {float(a):.2f}" for u, a in zip(self.units, acts, strict=True)]
        what = "step" if self._uses_steps() else "epoch"
        key = metric_key(self.prefix, self.layer)
        title = f"{self.layer}, {what} {step}"
        array = images.numpy()

        def draw() -> dict[str, Any]:
            return {
                key: pictures.image_grid(array, captions, ncols=min(8, len(captions)), title=title)
            }

        return Record(step=step, metrics=metrics, render=draw)
