"""``SpuriousFeatureCallback``: an early-warning series for shortcut learning."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from os import PathLike
from typing import Any

from torch import nn

from audit.evidence import Evidence, check_names, collect, summarize
from audit.probes import ProbeSet
from audit.tracking import Record, metric_key
from callbacks._base import (
    AuditCallback,
    AuditWarning,
    _check_probes_arg,
    check_outputs,
    load_probes,
    shard,
)

__all__ = ["SpuriousFeatureCallback", "MONITORS"]

#: what ``warn_threshold`` and ``stop_threshold`` compare against (higher = worse)
MONITORS = ("context_gap", "flip_rate", "outside_mask")


class SpuriousFeatureCallback(AuditCallback):
    """Every N epochs, measure how much the model leans on the spurious context.

    Logged as step series (the epoch, or the global step with ``every_n_steps``):

    * ``<prefix>/acc/<group>``: accuracy per probe group (``wolf|snow`` -> ``wolf_snow``);
    * ``<prefix>/context_gap/<class>``: within one class, accuracy in its best
      context minus its worst (a class that is simply harder is not a shortcut),
      and ``<prefix>/context_gap``, the largest;
    * ``<prefix>/flip_rate``: share of counterfactual pairs (same object, other
      context) whose predictions disagree (needs ``probes.pairs``);
    * ``<prefix>/outside_mask/<method>``: share of positive relevance outside the
      object masks, next to ``<prefix>/outside_area``, the share expected from the
      masks' area alone (needs ``probes.masks``).

    It only warns (an :class:`~callbacks._base.AuditWarning`) when ``monitor``
    exceeds ``warn_threshold``, and stops training only when asked: ``stop_threshold``
    exceeded in ``patience`` consecutive audits sets ``trainer.should_stop`` on every
    rank (the decision is broadcast from rank zero).

    Args:
        probes: a :class:`~audit.probes.ProbeSet` (with groups; masks and pairs add
            evidence) or a probe folder path.
        every_n_epochs: audit every N epochs.
        every_n_steps: audit every N optimizer steps as well.
        method: the explainer for the relevance share (cheap ``gradcam`` by default);
            None skips the attribution part.
        monitor: one of :data:`MONITORS`; ``outside_mask`` is the method's share.
        warn_threshold: warn when the monitored value exceeds it (None: never).
        stop_threshold: stop training when it is exceeded (None: never stop).
        patience: consecutive audits above ``stop_threshold`` before stopping.
        target: class the maps explain, ``"label"`` or ``"predicted"``.
        prefix: first part of every metric key.
        **kwargs: options of :class:`~callbacks._base.AuditCallback`.
    """

    kind = "spurious"

    def __init__(
        self,
        probes: ProbeSet | str | PathLike,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        *,
        method: str | None = "gradcam",
        monitor: str = "context_gap",
        warn_threshold: float | None = None,
        stop_threshold: float | None = None,
        patience: int = 1,
        target: str = "label",
        prefix: str = "audit/spurious",
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, **kwargs)
        _check_probes_arg(probes)
        check_names([method] if method else [], [], target)
        if monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {list(MONITORS)}; got {monitor!r}")
        if monitor == "outside_mask" and not method:
            raise ValueError("monitor='outside_mask' needs a method (e.g. method='gradcam')")
        for name, value in (("warn_threshold", warn_threshold), ("stop_threshold", stop_threshold)):
            if value is not None and (isinstance(value, bool) or not 0.0 <= float(value) <= 1.0):
                raise ValueError(f"{name} is a share in [0, 1] or None; got {value!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer; got {patience!r}")
        self.probes_arg = probes
        self.probes: ProbeSet | None = probes if isinstance(probes, ProbeSet) else None
        self.method = method
        self.monitor = monitor
        self.warn_threshold = None if warn_threshold is None else float(warn_threshold)
        self.stop_threshold = None if stop_threshold is None else float(stop_threshold)
        self.patience = patience
        self.target = target
        self.prefix = prefix
        self._over = 0  # consecutive audits above stop_threshold
        self._history: list[tuple[int, float]] = []

    def _state_key_fields(self) -> dict[str, Any]:
        return {**super()._state_key_fields(), "monitor": self.monitor, "prefix": self.prefix}

    # ------------------------------------------------------------------ setup
    def _setup(self, trainer: Any, pl_module: Any) -> None:
        if self.probes is None:
            self.probes = load_probes(self.probes_arg)
        ps = self.probes
        if ps.groups is None:
            raise ValueError(
                f"SpuriousFeatureCallback needs probe groups ('<class>|<context>'), and {ps!r} has "
                "none; add a group column to the probe manifest"
            )
        if self.monitor == "flip_rate" and ps.pairs is None:
            raise ValueError("monitor='flip_rate' needs counterfactual pairs; the probe set has none")
        if self.monitor == "outside_mask" and ps.masks is None:
            raise ValueError("monitor='outside_mask' needs object masks; the probe set has none")

    def _check_model(self, model: nn.Module) -> None:
        check_outputs(model, self.probes, type(self).__name__)

    def _tags(self) -> dict[str, str]:
        return {"audit.spurious.probe_digest": self.probes.digest}

    def _describe_pass(self) -> str:
        return f"{len(self.probes)} probes" + (f", {self.method}" if self.method else "")

    # ------------------------------------------------------------------ one pass
    def _compute(self, trainer: Any, model: nn.Module) -> Evidence:
        use_maps = self.method is not None and self.probes.masks is not None
        ev = collect(
            model,
            self.probes,
            [self.method] if use_maps else [],
            ["relevance_mass"] if use_maps else [],
            target=self.target,
            rows=shard(len(self.probes), trainer),
            on_error="record",
        )
        return ev.keep_maps([]).cpu()

    def _merge(self, parts: Sequence[Evidence]) -> dict[str, float]:
        ev = Evidence.cat(parts)
        summary = summarize(ev, self.probes)
        if ev.errors:
            summary["_error"] = math.nan  # a failed method: no relevance share this time
        return summary

    def _value(self, summary: dict[str, float]) -> float:
        key = f"{self.method}/outside_mask" if self.monitor == "outside_mask" else self.monitor
        return float(summary.get(key, math.nan))

    def _decide(self, trainer: Any, result: dict[str, float] | None, step: int) -> None:
        if result is None:
            return
        value = self._value(result)
        self._history.append((step, value))
        if math.isnan(value):
            return
        what = "step" if self._uses_steps() else "epoch"
        if self.warn_threshold is not None and value > self.warn_threshold:
            self._warn_now(f"{what} {step}: {self._explain(result, value)} > warn_threshold {self.warn_threshold}")
        if self.stop_threshold is None:
            return
        self._over = self._over + 1 if value > self.stop_threshold else 0
        stop = self._over >= self.patience
        stop = bool(trainer.strategy.broadcast(stop, src=0))
        if stop:
            trainer.should_stop = True
            self._warn_now(
                f"{what} {step}: {self._explain(result, value)} > stop_threshold {self.stop_threshold} "
                f"in {self._over} consecutive audit(s); stopping training"
            )

    def _explain(self, summary: dict[str, float], value: float) -> str:
        if self.monitor == "context_gap":
            worst = max(
                ((k.split("/", 1)[1], v) for k, v in summary.items() if k.startswith("context_gap/")),
                key=lambda kv: kv[1],
                default=("?", value),
            )
            accs = {k[4:]: v for k, v in summary.items() if k.startswith(f"acc/{worst[0]}|")}
            detail = ", ".join(f"{g} {a:.2f}" for g, a in sorted(accs.items(), key=lambda kv: kv[1]))
            return f"context gap of class '{worst[0]}' is {value:.2f} ({detail})"
        if self.monitor == "flip_rate":
            return f"counterfactual flip rate is {value:.2f}"
        area = summary.get("outside_area", math.nan)
        return f"{value:.2f} of {self.method} relevance lies outside the object masks (their area off the object: {area:.2f})"

    def _warn_now(self, text: str) -> None:
        """A warning every time (not once): each one is a new reading of the series."""
        if self._rank_zero:
            warnings.warn(
                f"SpuriousFeatureCallback: {text}; the model may lean on a spurious feature",
                AuditWarning,
                stacklevel=3,
            )

    def _record(self, trainer: Any, result: dict[str, float], step: int) -> Record:
        metrics = {}
        for key, value in result.items():
            if key.startswith("_") or key == "accuracy":
                continue
            parts = key.split("/")
            if len(parts) == 2 and parts[0] == self.method:  # gradcam/outside_mask -> outside_mask/gradcam
                if parts[1] != "outside_mask":
                    continue
                parts = [parts[1], parts[0]]
            metrics[metric_key(self.prefix, *parts)] = value
        metrics[metric_key(self.prefix, "accuracy")] = result["accuracy"]
        return Record(step=step, metrics=metrics)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "over": self._over, "history": [list(h) for h in self._history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._over = int(state_dict.get("over", 0))
        self._history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
