"""``AttributionCallback``: explain a fixed probe set during training and log the evidence."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn

from audit.callbacks._base import (
    AuditCallback,
    check_outputs,
    check_probes_arg,
    load_probes,
    shard,
)
from audit.defaults import engine_defaults
from audit.engine.rows import pick_rows
from audit.evidence.attribution import (
    DEFAULT_METHODS,
    MASK_METRICS,
    RANDOM,
    Evidence,
    check_names,
    collect,
    summarize,
)
from audit.gate.tracking import Record, metric_key
from audit.metrics import BASELINES
from audit.probes import ProbeSet
from audit.report import pictures

__all__ = ["AttributionCallback", "CALLBACK_METRICS"]

#: What a pass measures by default: the gate's two curves (their SRG is the gate's faithfulness
#: statistic) and the relevance mass. Insertion is left out: the gate never reads it, and on the
#: benchmark it was 35% of a pass (3 methods, 64 probes: 5.1 s with it, 3.4 s without).
CALLBACK_METRICS = ("deletion", "lerf", "relevance_mass")


class AttributionCallback(AuditCallback):
    """Every N epochs (or steps), explain the probe set and log maps, metrics and curves.

    Logged to the MLflow run, with the epoch (or global step) as the step:

    * ``<prefix>/<method>``: an image series, the heatmaps of ``render`` probes over
      their images, captioned with the true and predicted class;
    * ``<prefix>/curves``: an image series, the mean deletion and insertion curves
      of every method;
    * metrics ``<prefix>/<method>/deletion_auc`` (MoRF), ``lerf_auc``, ``srg``
      (``AUC(LeRF) - AUC(MoRF)``, the faithfulness statistic the audit gate judges),
      ``insertion_auc``, ``relevance_mass``, ``outside_mask`` (as requested),
      ``<prefix>/probes/accuracy``, ``<prefix>/probes/count`` (how many probes the
      pass explained), ``<prefix>/probes/left_out`` (how many of those it planned the
      budget cut) and ``<prefix>/probes/outside_area`` (share of the image off
      the masks);
    * tags ``audit.attribution.probe_digest``, ``audit.attribution.methods`` and
      ``audit.attribution.curves`` (``baseline=blur steps=16``), and per layer-based
      method the layer its maps come from, ``audit.attribution.gradcam.layer``
      (Grad-CAM's default resolved, e.g. ``layer4``).

    One definition per number: the numbers are those of :func:`audit.evidence.attribution.collect`
    and :func:`audit.evidence.attribution.summarize`, the functions the audit job uses, and
    ``steps`` and ``baseline`` default to the audit engine's
    (``conf/engine/default.yaml``), so ``audit/lrp/srg`` of a training run is the
    ``lrp/srg`` of an audit run on the same weights and probes. Curves measured with
    other steps or another baseline get a suffix on every curve-derived name
    (``audit/lrp/deletion_auc.zero.s8``, :func:`audit.evidence.attribution.curve_suffix`), so they
    never pass for the gate's numbers. Under DDP each rank explains every
    ``world_size``-th probe; results are gathered and global rank zero logs.

    Args:
        probes: a :class:`~audit.probes.ProbeSet` or a probe folder path.
        methods: explainer names (``audit.methods.METHODS``).
        every_n_epochs: a fixed cadence, every N epochs (None: by the time budget,
            ``max_overhead``; see :class:`~callbacks._base.AuditCallback`).
        every_n_steps: a fixed cadence, every N optimizer steps as well.
        metrics: names from :data:`audit.evidence.attribution.METRICS`.
        target: ``"label"`` explains the true class, ``"predicted"`` the model's.
        steps: curve steps; None: the audit engine's (``conf/engine/default.yaml``).
        baseline: curve baseline (``"zero"``, ``"mean"``, ``"blur"``); None: the audit
            engine's. Either one differing from the engine's suffixes the curve names.
        method_options: per method options for ``explain``, e.g.
            ``{"gradcam": {"layer": "net.features"}}``.
        pass_probes: how many probes a pass explains when it is not the last one (spread
            over the groups, the same ones every pass, so the series compares like with
            like); the pass of the final weights explains every probe, so its numbers
            are the gate's on the whole probe set, unless the budget is spent: by budget,
            the first and final passes stop early (a probe per group at a time, at least
            one such chunk) when explaining all would overrun their share of the budget
            (see ``AuditCallback._pass_allowance``); a final pass cut so says it in a log
            line. None: every probe in every pass. Each pass logs
            ``<prefix>/probes/count``, the number it explained, and
            ``<prefix>/probes/left_out``, the number the budget cut (0: the pass was whole).
        render: how many probes the overlay grids show (spread over the groups; taken
            from the pass's probes).
        max_batch: most images per forward pass.
        prefix: first part of every metric and image key.
        **kwargs: scheduling, module, tracking and fault options of
            :class:`~callbacks._base.AuditCallback`.
    """

    kind = "attribution"

    def __init__(
        self,
        probes: ProbeSet | str | PathLike,
        methods: Sequence[str] = DEFAULT_METHODS,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        metrics: Sequence[str] = CALLBACK_METRICS,
        *,
        pass_probes: int | None = 16,
        target: str = "label",
        steps: int | None = None,
        baseline: str | None = None,
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        render: int = 16,
        max_batch: int = 32,
        prefix: str = "audit",
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, **kwargs)
        check_probes_arg(probes)
        self.methods, self.metrics = check_names(methods, metrics, target)
        if not self.methods:
            raise ValueError("methods is empty; name at least one explainer, e.g. ['gradcam']")
        defaults = engine_defaults()
        steps = defaults["steps"] if steps is None else steps
        baseline = defaults["baseline"] if baseline is None else baseline
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if baseline not in BASELINES:
            raise ValueError(
                f"baseline must be one of {list(BASELINES)} or None (the audit engine's); got {baseline!r}"
            )
        if isinstance(render, bool) or not isinstance(render, int) or render < 0:
            raise ValueError(f"render must be a number of probes >= 0; got {render!r}")
        if pass_probes is not None and (
            isinstance(pass_probes, bool) or not isinstance(pass_probes, int) or pass_probes < 1
        ):
            raise ValueError(
                f"pass_probes must be a positive integer or None (every probe); got {pass_probes!r}"
            )
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer; got {max_batch!r}")
        unknown = set(method_options or {}) - set(self.methods)
        if unknown:
            raise ValueError(
                f"method_options for {sorted(unknown)}, which are not in methods {list(self.methods)}"
            )
        self.probes_arg = probes
        self.probes: ProbeSet | None = probes if isinstance(probes, ProbeSet) else None
        self.target = target
        self.steps = steps
        self.baseline = baseline
        self.method_options = {k: dict(v) for k, v in (method_options or {}).items()}
        self.pass_probes = pass_probes
        self.render = render
        self.max_batch = max_batch
        self.prefix = prefix
        self._rows: list[int] = []  # rendered
        self._pass_rows: list[int] | None = None  # explained by a pass that is not the final one

    def _state_key_fields(self) -> dict[str, Any]:
        return {**super()._state_key_fields(), "methods": self.methods, "prefix": self.prefix}

    # ------------------------------------------------------------------ setup
    def _setup(self, trainer: Any, pl_module: Any) -> None:
        if self.probes is None:
            self.probes = load_probes(self.probes_arg)
        ps = self.probes
        if ps.masks is None:
            wanted = [m for m in self.metrics if m in MASK_METRICS]
            if wanted:
                raise ValueError(
                    f"AttributionCallback: metrics {wanted} need object masks and the probe set "
                    f"({ps!r}) has none; drop them from metrics or use probes with masks"
                )
        self._pass_rows = None
        if self.pass_probes is not None and self.pass_probes < len(ps):
            self._pass_rows = pick_rows(len(ps), self.pass_probes, ps.groups)
        among = self._pass_rows if self._pass_rows is not None else list(range(len(ps)))
        groups = ps.groups[among] if ps.groups is not None else None
        self._rows = [among[i] for i in pick_rows(len(among), self.render, groups)]

    def _check_model(self, model: nn.Module) -> None:
        check_outputs(model, self.probes, type(self).__name__)

    def _tags(self) -> dict[str, str]:
        return {
            "audit.attribution.probe_digest": self.probes.digest,
            "audit.attribution.methods": ",".join(self.methods),
            "audit.attribution.curves": f"baseline={self.baseline} steps={self.steps}",
        }

    def _describe_pass(self) -> str:
        n = len(self._explained())
        within = " within its share of the budget" if math.isfinite(self._allowance) else ""
        return f"{'up to ' if within else ''}{n} probes{within}, {', '.join(self.methods)}"

    def _rows_of(self, final: bool) -> list[int]:
        """The probe rows a pass explains: a fixed subset, or every probe for the final weights."""
        if self._pass_rows is None or final:
            return list(range(len(self.probes)))
        return self._pass_rows

    def _units(self, final: bool) -> int:
        return len(self._rows_of(final))

    def _explained(self) -> list[int]:
        """The probe rows of the pass under way."""
        return self._rows_of(self._final_pass)

    # ------------------------------------------------------------------ one pass
    def _collect(self, model: nn.Module, rows: Sequence[int]) -> Evidence:
        return collect(
            model,
            self.probes,
            self.methods,
            self.metrics,
            target=self.target,
            steps=self.steps,
            baseline=self.baseline,
            method_options=self.method_options,
            max_batch=self.max_batch,
            rows=list(rows),
            on_error="record",
        )

    def _compute(self, trainer: Any, model: nn.Module) -> Evidence:
        rows = self._explained()
        if not math.isfinite(self._allowance):
            ev = self._collect(model, [rows[i] for i in shard(len(rows), trainer)])
            return ev.keep_maps(self._rows).cpu()
        # A pass that always happens, with a time allowance: explain the probes a few at a
        # time (one per group), in an order whose every prefix is spread over the groups
        # and holds the rendered ones first, and stop before the allowance would be
        # overrun. At least one chunk; the probes explained are logged (<prefix>/probes).
        order = self._balanced(rows)
        size = len(torch.unique(self.probes.groups)) if self.probes.groups is not None else 4
        parts, t0 = [], time.perf_counter()
        for start in range(0, len(order), size):
            parts.append(self._collect(model, sorted(order[start : start + size])))
            spent = time.perf_counter() - t0
            if spent + spent / len(parts) > self._allowance:
                break
        self._done_units = sum(len(p.index) for p in parts)
        return Evidence.cat(parts).keep_maps(self._rows).cpu()

    def _balanced(self, rows: Sequence[int]) -> list[int]:
        """``rows`` reordered: the rendered rows first, each part round robin over the groups."""
        shown = set(self._rows)
        groups = self.probes.groups

        def interleave(part: list[int]) -> list[int]:
            if groups is None:
                return part
            buckets: dict[int, list[int]] = {}
            for r in part:
                buckets.setdefault(int(groups[r]), []).append(r)
            return [
                r
                for layer in itertools.zip_longest(*buckets.values())
                for r in layer
                if r is not None
            ]

        return interleave([r for r in rows if r in shown]) + interleave(
            [r for r in rows if r not in shown]
        )

    def _merge(self, parts: Sequence[Evidence]) -> Evidence:
        return Evidence.cat(parts)

    def _left_out(self, result: Evidence) -> int:
        """Probes of the pass under way that the budget cut (0 when it explained all it planned)."""
        return len(self._explained()) - len(result.index)

    def _decide(self, trainer: Any, result: Evidence | None, step: int) -> None:
        if result is None or not trainer.is_global_zero:
            return
        if self._final_pass and self._left_out(result) > 0:
            self._say_final_pass_cut(result)
        for method, err in result.errors.items():
            self._warn(
                f"method:{method}",
                f"AttributionCallback: method '{method}' failed ({err}); its evidence is skipped and "
                "it is tried again at the next audit; training continues",
            )

    def _say_final_pass_cut(self, result: Evidence) -> None:
        """The log line of a final weights' pass that the budget cut short."""
        n, total = len(result.index), len(self._explained())
        b = self._budget
        rank_zero_info(
            f"AttributionCallback: the final weights' pass explained {n} of {total} probes, not all: the "
            f"budget (max_overhead={self.max_overhead:g}) had about {self._allowance:.1f} s left for it and "
            f"the audit callbacks had taken {b.used:.1f} s of the training's {b.training_seconds():.0f} s. "
            f"Its numbers are on those {n} probes, not the gate's on the whole probe set "
            f"({metric_key(self.prefix, 'probes', 'left_out')} = {total - n}). For every probe: raise "
            "max_overhead, name fewer methods, or audit the final checkpoint with model-audit."
        )

    def _record(self, trainer: Any, result: Evidence, step: int) -> Record:
        ps = self.probes
        summary = summarize(result, ps)
        metrics = {
            metric_key(self.prefix, "probes", "accuracy"): summary["accuracy"],
            metric_key(self.prefix, "probes", "count"): float(len(result.index)),
            metric_key(self.prefix, "probes", "left_out"): float(self._left_out(result)),
        }
        if "outside_area" in summary:
            metrics[metric_key(self.prefix, "probes", "outside_area")] = summary["outside_area"]
        for key, value in summary.items():
            if "/" in key and key.split("/")[0] in (*self.methods, RANDOM):
                metrics[metric_key(self.prefix, *key.split("/"))] = value
        # the layer Grad-CAM explained at (its default resolved): a tag, current as of the last pass
        tags = {f"audit.attribution.{m}.layer": name for m, name in result.layers.items()}
        return Record(step=step, metrics=metrics, tags=tags, render=self._renderer(result, step))

    def _renderer(self, result: Evidence, step: int):
        """A closure over numpy arrays that draws the images on the logging thread."""
        ps = self.probes
        rows = result.map_index.tolist()
        names = ps.class_names
        images = ps.images[rows].numpy()
        labels = [names[int(i)] for i in ps.labels[rows]]
        pos = torch.searchsorted(result.index, result.map_index)
        preds = [names[int(i)] for i in result.predictions[pos]]
        notes = [ps.group_names[int(g)] for g in ps.groups[rows]] if ps.groups is not None else None
        maps = {m: a.numpy() for m, a in result.maps.items()}
        curves = {
            m: {k: c.mean(dim=0).numpy() for k, c in per.items()}
            for m, per in result.curves.items()
        }
        what = "step" if self._uses_steps() else "epoch"
        prefix = self.prefix

        def draw() -> dict[str, Any]:
            # The image keys sit directly under the prefix and every scalar one level
            # deeper: MLflow's Model metrics tab (3.17) groups cards by the key's folder,
            # sorts the groups by name and puts a group's charts before its images, so the
            # first group, ``audit``, holds only the images and they open the tab.
            out: dict[str, Any] = {}
            if rows:
                for m, a in maps.items():
                    out[f"{prefix}/{m}"] = pictures.overlay_grid(
                        images, a, labels, preds, notes, title=f"{m}, {what} {step}"
                    )
            if curves:
                out[f"{prefix}/curves"] = pictures.curve_plot(curves, title=f"{what} {step}")
            return out

        return draw
