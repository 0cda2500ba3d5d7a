"""``SpuriousFeatureCallback``: an early-warning series for shortcut learning."""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from typing import Any

from torch import nn

from audit.callbacks._base import (
    AuditCallback,
    check_outputs,
    check_probes_arg,
    load_probes,
    shard,
)
from audit.engine import stats
from audit.evidence.attribution import Evidence, check_names, collect, summarize
from audit.gate.tracking import Record, metric_key
from audit.pipeline import behaviour_raw
from audit.probes import ProbeSet
from audit.rules.base import mean_ci
from audit.rules.behaviour import comparisons

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

    It judges the monitored value the way the audit gate does, by its interval, not
    by the point estimate (a few probes of 16 swing a raw gap by 0.1): it warns (an
    :class:`~callbacks._base.AuditWarning`, once per class or monitor) when the value is
    *shown* above ``warn_threshold`` at ``confidence``. For ``context_gap`` that is
    the gate's FAIL rule with ``warn_threshold`` as the tolerated gap: some comparison
    of two contexts of a class has its lower bound above it (paired score interval
    where the probes have pairs, Holm over every comparison; :mod:`audit.engine.stats`). For
    ``flip_rate`` the one-sided Wilson lower bound, for ``outside_mask`` the lower
    bound of the mean share over the probes. It also logs
    ``<prefix>/context_gap_low``, the largest of those lower bounds. It stops training
    only when asked: ``stop_threshold`` shown exceeded in ``patience`` consecutive
    audits sets ``trainer.should_stop`` on every rank (the decision is broadcast from
    rank zero).

    Args:
        probes: a :class:`~audit.probes.ProbeSet` (with groups; masks and pairs add
            evidence) or a probe folder path.
        every_n_epochs: a fixed cadence, every N epochs (None: by the time budget,
            see :class:`~callbacks._base.AuditCallback`).
        every_n_steps: a fixed cadence, every N optimizer steps as well.
        method: the explainer for the relevance share (cheap ``gradcam`` by default);
            None skips the attribution part.
        monitor: one of :data:`MONITORS`; ``outside_mask`` is the method's share.
        warn_threshold: warn when the monitored value is shown above it (None: never);
            the gate's own tolerance for a context gap is ``gate.context_gap.pass``, 0.05.
        stop_threshold: stop training when it is shown exceeded (None: never stop).
        patience: consecutive audits above ``stop_threshold`` before stopping.
        confidence: of the one-sided bounds (family-wise over the comparisons).
        target: class the maps explain, ``"label"`` or ``"predicted"``.
        prefix: first part of every metric key.
        **kwargs: options of :class:`~callbacks._base.AuditCallback`.
    """

    kind = "spurious"

    def __init__(
        self,
        probes: ProbeSet | str | PathLike,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        *,
        method: str | None = "gradcam",
        monitor: str = "context_gap",
        warn_threshold: float | None = None,
        stop_threshold: float | None = None,
        patience: int = 1,
        confidence: float = 0.95,
        target: str = "label",
        prefix: str = "audit/spurious",
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, **kwargs)
        check_probes_arg(probes)
        check_names([method] if method else [], [], target)
        if monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {list(MONITORS)}; got {monitor!r}")
        if monitor == "outside_mask" and not method:
            raise ValueError("monitor='outside_mask' needs a method (e.g. method='gradcam')")
        for name, value in (("warn_threshold", warn_threshold), ("stop_threshold", stop_threshold)):
            if value is not None and (isinstance(value, bool) or not 0.0 <= float(value) <= 1.0):
                raise ValueError(f"{name} is a share in [0, 1] or None; got {value!r}")
        if isinstance(confidence, bool) or not 0.5 < float(confidence) < 1.0:
            raise ValueError(f"confidence must lie in (0.5, 1), e.g. 0.95; got {confidence!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer; got {patience!r}")
        self.probes_arg = probes
        self.probes: ProbeSet | None = probes if isinstance(probes, ProbeSet) else None
        self.method = method
        self.monitor = monitor
        self.warn_threshold = None if warn_threshold is None else float(warn_threshold)
        self.stop_threshold = None if stop_threshold is None else float(stop_threshold)
        self.patience = patience
        self.confidence = float(confidence)
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
            raise ValueError(
                "monitor='flip_rate' needs counterfactual pairs; the probe set has none"
            )
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

    def _merge(self, parts: Sequence[Evidence]) -> dict[str, Any]:
        ev = Evidence.cat(parts)
        summary: dict[str, Any] = summarize(ev, self.probes)
        if ev.errors:
            summary["_error"] = math.nan  # a failed method: no relevance share this time
        # what the intervals need: the counts per group and pair, the per-probe shares
        summary["_behaviour"] = behaviour_raw(self.probes.subset(ev.index.tolist()), ev.predictions)
        mass = ev.scores.get(self.method or "", {}).get("relevance_mass")
        if mass is not None:
            summary["_outside"] = (1.0 - mass.double()).tolist()
        low = self._context_gap_low(summary)
        if low is not None:
            summary["context_gap_low"] = low
        return summary

    def _value(self, summary: dict[str, Any]) -> float:
        key = f"{self.method}/outside_mask" if self.monitor == "outside_mask" else self.monitor
        return float(summary.get(key, math.nan))

    def _gaps(self, summary: dict[str, Any], threshold: float) -> stats.GapDecision | None:
        comps = comparisons(summary["_behaviour"]) if summary["_behaviour"].get("groups") else []
        return stats.decide_comparisons(comps, 1.0, threshold, self.confidence) if comps else None

    def _context_gap_low(self, summary: dict[str, Any]) -> float | None:
        dec = self._gaps(summary, 0.0)
        return None if dec is None else max(r.lower for r in dec.results)

    def _shown_above(self, summary: dict[str, Any], threshold: float) -> tuple[str, str] | None:
        """``(kind, sentence)`` when the monitored value is shown above ``threshold``, else None."""
        pct = round(100 * self.confidence)
        if threshold >= 1.0:  # no share is shown above 1
            return None
        if self.monitor == "context_gap":
            dec = self._gaps(summary, threshold)
            failing = [c for c, v in dec.classes.items() if v == "FAIL"] if dec is not None else []
            if not failing:
                return None
            cls = max(failing, key=lambda c: dec.deciding(c).lower)
            r = dec.deciding(cls)
            (k1, n1), (k2, n2) = r.comparison.accuracies
            (worse, aw), (better, ab) = sorted(
                [(r.comparison.first, k1 / n1), (r.comparison.second, k2 / n2)], key=lambda x: x[1]
            )
            m = len(dec.results)
            return cls, (
                f"class '{cls}' is right {aw:.2f} of the time in {worse} against {ab:.2f} in {better} "
                f"(context gap {abs(r.diff):.2f} on {r.comparison.size}); its lower bound {r.lower:.2f} "
                f"at family-wise {pct}% (Holm over {m}) is above {threshold:g}"
            )
        if self.monitor == "flip_rate":
            pairs = summary["_behaviour"].get("pairs") or {}
            k, n = int(pairs.get("flipped", 0)), int(pairs.get("total", 0))
            if n == 0:
                return None
            _, low, _ = stats.decide_rate(k, n, 1.0, threshold, self.confidence)
            if float(low) <= threshold:
                return None
            return "flip_rate", (
                f"changing only the context flips {k} of {n} counterfactual pairs (rate {k / n:.2f}; "
                f"one-sided {pct}% lower bound {float(low):.2f}, Wilson, is above {threshold:g})"
            )
        ci = mean_ci(summary.get("_outside", []), 2 * self.confidence - 1)  # one-sided
        if ci is None or ci[1] <= threshold:
            return None
        area = summary.get("outside_area", math.nan)
        return "outside_mask", (
            f"{ci[0]:.2f} of {self.method} relevance lies outside the object masks (one-sided {pct}% lower "
            f"bound {ci[1]:.2f} over {ci[3]} probes is above {threshold:g}; the masks leave {area:.2f} of "
            "the image off the object)"
        )

    def _decide(self, trainer: Any, result: dict[str, Any] | None, step: int) -> None:
        if result is None:
            return
        value = self._value(result)
        self._history.append((step, value))
        what = "step" if self._uses_steps() else "epoch"
        if self.warn_threshold is not None:
            shown = self._shown_above(result, self.warn_threshold)
            if shown is not None:
                self._warn(
                    f"spurious:{self.monitor}:{shown[0]}",
                    f"SpuriousFeatureCallback: {what} {step}: {shown[1]}; the model may lean on a spurious "
                    "feature (warned once; the series goes on in MLflow)",
                )
        if self.stop_threshold is None:
            return
        shown = self._shown_above(result, self.stop_threshold)
        self._over = self._over + 1 if shown is not None else 0
        stop = self._over >= self.patience
        stop = bool(trainer.strategy.broadcast(stop, src=0))
        if stop:
            trainer.should_stop = True
            self._warn(
                "spurious:stop",
                f"SpuriousFeatureCallback: {what} {step}: {shown[1] if shown else self.monitor + ' above stop_threshold'} "
                f"in {self._over} consecutive audit(s), above stop_threshold {self.stop_threshold:g}; "
                "stopping training",
            )

    def _record(self, trainer: Any, result: dict[str, float], step: int) -> Record:
        metrics = {}
        for key, value in result.items():
            if key.startswith("_") or key == "accuracy":
                continue
            parts = key.split("/")
            if (
                len(parts) == 2 and parts[0] == self.method
            ):  # gradcam/outside_mask -> outside_mask/gradcam
                if parts[1] != "outside_mask":
                    continue
                parts = [parts[1], parts[0]]
            metrics[metric_key(self.prefix, *parts)] = value
        metrics[metric_key(self.prefix, "accuracy")] = result["accuracy"]
        return Record(step=step, metrics=metrics)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "over": self._over,
            "history": [list(h) for h in self._history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._over = int(state_dict.get("over", 0))
        self._history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
