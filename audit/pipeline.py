"""Spurious-feature assessment: the evidence of one model on one probe set -> a verdict with reasons.

:func:`run_audit` measures; :func:`audit.rules.decide` judges. The split is deliberate:
``decide`` works on plain numbers (counts and per-probe scores, the ``evidence`` block of
``report.json``) and the gate config, so anyone holding a report can re-derive its
verdict with :func:`recheck`, and the thresholds can be changed without re-running
a model. Where things live:

* :mod:`audit.config`: the config schema (defaults, merging, validation).
* this module: measuring (:func:`run_audit`) and the result types.
* :mod:`audit.rules`: one module per kind of evidence (raw numbers -> checks) and the
  combination rule (:mod:`audit.rules.combine`).

The evidence, and how each part is used (thresholds in ``conf/gate/default.yaml``):

* **Behaviour** (groups ``"<class>|<context>"``): per class, the accuracy in its best
  context minus its worst (the *context gap*). Every pair of contexts of a class is one
  comparison; when its two groups share pair ids (``probes.pairs``: the same object in
  both contexts) it is judged on those pairs, from their 2x2 table (``paired`` in the
  behaviour block: ``a`` right in both, ``b`` right in the first only, ``c`` in the
  second only, ``d`` in neither; Newcombe's paired score interval), otherwise as two
  independent groups (Newcombe's interval). Paired when the pairs hold at least half
  the rows of each group (``2 * pairs >= max(n_A, n_B)``; the remaining rows count in
  the group accuracies only), independent on all rows otherwise; a pair with several
  rows in one group contributes its first. PASS when every comparison's one-sided
  bounds rule out a gap of ``context_gap.fail`` (intersection-union test), FAIL when
  one comparison's gap is shown above ``context_gap.pass`` (Holm over all
  comparisons), INCONCLUSIVE otherwise, with the probes or pairs that would decide.
  The rule and its error guarantees are in :mod:`audit.engine.stats`. One class being harder
  than another is not a spurious feature, so gaps are only taken within a class.
* **Counterfactual flips** (pairs): the share of pairs whose prediction changes
  with the context, with one-sided Wilson bounds. Reported always; decides (PASS when
  the upper bound is below ``flip_rate.fail``, FAIL when the lower bound is above
  ``flip_rate.pass``) only when there are no groups.
* **Synthesized counterfactuals** (masks, no groups, no pairs;
  :mod:`audit.evidence.counterfactual`): each object is pasted onto the hole-filled background
  of another probe of its class and of a probe of another class (Xiao et al. 2020);
  per class, the share of objects whose prediction flips between the two, with
  one-sided Wilson bounds: PASS when every class's upper bound is below
  ``flip_rate.fail``, FAIL when some class's lower bound is above ``flip_rate.pass``
  (Holm over the classes). It outranks attribution; a cue inside the mask is not seen.
* **Attribution** (masks): per method, the per-probe share of positive relevance
  outside the object mask minus the share of the image the outside covers (the
  *excess*, scaled to -1..+1), with a normal interval over probes. Only methods that
  pass the two filters below count. It decides only when there are neither groups nor
  pairs nor synthesized counterfactuals, and then it can FAIL (clear excess) but never PASS: relevance on the object
  does not show that the context is ignored (the snow-wolf shortcut model puts most
  of its Grad-CAM and LRP relevance on the animal). With groups or pairs it
  corroborates, and (``attribution.veto``) turns a behavioural PASS into
  INCONCLUSIVE when the faithful methods clearly put the relevance off the object.
* **Faithfulness filter**: per probe the symmetric relevance gain ``AUC(LeRF) -
  AUC(MoRF)`` (the method's least relevant pixels deleted first, against its most
  relevant first; Bluecher et al. 2024). A method whose mean gain's interval over
  probes does not lie above ``faithfulness.min_gain`` is not used as evidence, and a
  finding says so (:mod:`audit.rules.faithfulness`; chance scores 0).
* **Sanity filter**: a method whose maps survive the randomization of every layer
  (Spearman similarity >= ``sanity.max_similarity``, Adebayo et al. 2018) is not used.
  Only the original against the fully randomized model is judged (all layers at once,
  ``engine.sanity_mode: full``, Hedstroem et al. 2023; ``cascade`` also records each
  layer's step). A constant map of the randomized model (an all-zero Grad-CAM) changed
  completely and counts as similarity 0; a probe whose *original* map is constant says
  nothing and is left out (the finding gives the count), and a method constant on
  every probe is not used as evidence.
* **Labels only**: the maps are clustered per class (SpRAy, :mod:`audit.evidence.clusters`) for a
  human to review, and the verdict is INCONCLUSIVE rather than a guess.
* **Competence** (check ``competence``, needs ``n``, ``correct``, ``label_counts`` and
  ``predicted_counts`` in the behaviour block): the model must beat the best constant
  predictor on these probes. *Chance* is the largest class share of the probes (what
  always answering the most frequent class scores; 1/K only for balanced probes). A
  model that predicts one class for every probe, or whose overall accuracy's interval
  (Wilson, ``confidence``) does not lie above chance, cannot PASS. The decision is
  INCONCLUSIVE, not FAIL: FAIL means "the evidence shows it leans on a spurious
  feature", and a constant or guessing model shows no such thing. Its context gaps are
  0 by construction (always 'wolf' is right on every wolf, whatever the background), so
  its per-context accuracies say nothing about what it relies on. Both verdicts exit 1
  and block promotion. The check vetoes a PASS, leads the reasons of any other
  INCONCLUSIVE, and leaves a FAIL as it is (a model at chance overall can still be
  shown to lean on the context: right on one background, wrong on the other).

Broken models and bad options never reach a verdict (:func:`run_audit` raises
:class:`AuditConfigError`, exit 2): NaN or Inf logits on any probe
(:class:`BrokenModelError`), a forward that fails on a batch but ran on one probe, and a
method option the model rejects (an unknown Grad-CAM layer, an unknown LRP composite),
found by running each method with options on one probe before the heavy work.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from audit.config import AuditConfigError, BrokenModelError, check_config, merge_config
from audit.defaults import default_config
from audit.engine.distributed import Ranks, block_rows, blocks, rows_of
from audit.engine.model import AttributionError, logits_problem, model_device, preserved
from audit.engine.progress import reporting, task
from audit.engine.rows import pick_rows
from audit.errors import first_line, user_line
from audit.evidence import counterfactual, registered_kinds
from audit.evidence.attribution import RANDOM, Evidence, collect, summarize
from audit.evidence.behaviour import (
    ForwardError,
    NonFiniteLogits,
    flip_rate,
    group_accuracy,
    predict_batches,
    split_group,
)
from audit.evidence.concepts import has_concepts, tcav_raw
from audit.evidence.dissection import dissection_pictures, dissection_raw
from audit.loaders.pt2 import fixed_batch
from audit.methods import explain
from audit.metrics import randomization_sanity
from audit.probes import ProbeFolder, ProbeSet
from audit.rules import Check, decide
from audit.rules import dissection as _dissection_rules
from audit.rules.base import max_defined as _max_defined
from audit.rules.base import plain_numbers as _plain_numbers
from audit.rules.combine import UNREGISTERED

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "AuditConfigError",
    "BrokenModelError",
    "Check",
    "AuditResult",
    "default_config",
    "merge_config",
    "check_config",
    "run_audit",
    "decide",
    "recheck",
]


SCHEMA = "model-audit/report"


SCHEMA_VERSION = 1


VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")


# --------------------------------------------------------------------------- results
@dataclass
class AuditResult:
    """The outcome of :func:`run_audit`.

    Attributes:
        verdict: ``"PASS"``, ``"FAIL"`` or ``"INCONCLUSIVE"``.
        findings: the reasons, as sentences with their numbers; deciding ones first.
        metrics: flat numbers for tracking (``acc/<group>``, ``context_gap/<class>``,
            ``context_gap/<class>/low`` ..., ``<method>/deletion_auc`` ...).
        checks: every :class:`Check`, deciding or not.
        raw: the plain evidence :func:`decide` judged (counts, per-probe scores).
        config: the full config used (``engine`` and ``gate``).
        probes: the probe set's identity (digest, size, what it carries).
        evidence: the maps and curves of the explained probes (not serialized).
        probe_set: the probe set itself (not serialized).
        explained: the probe rows that ``evidence`` covers.
        seconds: wall time of the audit.
        pictures: images made with the evidence for the report, by kind (not serialized):
            ``dissection``, the listed units' activation-maximization images.
    """

    verdict: str
    findings: list[str]
    metrics: dict[str, float]
    checks: list[Check]
    raw: dict[str, Any]
    config: dict[str, Any]
    probes: dict[str, Any]
    evidence: Evidence | None = None
    probe_set: ProbeSet | None = None
    explained: list[int] = field(default_factory=list)
    seconds: float = 0.0
    pictures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to re-check the verdict (:func:`recheck`), JSON-ready."""
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict,
            "findings": list(self.findings),
            "checks": [c.to_dict() for c in self.checks],
            "metrics": _plain_numbers(self.metrics),
            "probes": _plain_numbers(self.probes),
            "config": _plain_numbers(self.config),
            "evidence": _plain_numbers(self.raw),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON (NaN written as null)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


# --------------------------------------------------------------------------- measuring
def run_audit(
    model: nn.Module,
    probes: ProbeSet | ProbeFolder,
    config: Mapping[str, Any] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    ranks: Ranks | None = None,
) -> AuditResult | None:
    """Audit ``model`` on ``probes``: measure the evidence and decide (see the module docstring).

    Args:
        model: a classifier returning logits ``[N, classes]`` for display-space images
            (wrap input normalization with :class:`audit.models.Normalized`). Never
            modified: training flags, gradients, hooks and BatchNorm statistics are
            restored, and the sanity check randomizes a deep copy.
        probes: the probe set; output ``i`` of the model is ``probes.class_names[i]``. A
            streamed folder (:meth:`ProbeSet.open`) is read a batch at a time: every probe
            for the predictions (which also hash its digest), a bounded subset for the rest.
        config: ``{"engine": {...}, "gate": {...}}`` laid over the defaults of
            ``conf/engine/default.yaml`` and ``conf/gate/default.yaml``; None = defaults.
        progress: called with a short line at each stage (e.g. ``print``).
        ranks: this process's place in a distributed audit (:func:`audit.engine.distributed.launch`):
            each rank computes its blocks of the predictions and of the attribution
            evidence, and rank zero gathers them and does the rest; None: one process.

    Returns:
        The :class:`AuditResult`; None on a rank other than zero (after its share is gathered).

    Raises:
        AuditConfigError: a bad config (also a method option the model rejects, e.g. an
            unknown Grad-CAM layer, found on one probe before the heavy work), probes
            whose classes do not match the model, or a forward that fails on a batch.
        BrokenModelError: the model returns NaN or Inf logits for any probe.
        ShardError: (distributed) some rank failed its share; raised on every rank.
        GatherError: (distributed) the gather failed: a rank died or timed out.
    """
    t0 = time.perf_counter()
    cfg = check_config(merge_config(config))
    engine, gate = cfg["engine"], cfg["gate"]
    say = progress or (lambda _msg: None)
    _fit_fixed_batch(model, engine, say)
    device = _device(engine["device"], model)
    # long loops inside the stages report through `progress` too (audit/engine/progress.py)
    lines = reporting(progress) if progress is not None else contextlib.nullcontext()
    with torch.inference_mode(False), _on_device(model, device) as model, lines:
        _check_outputs(model, probes)
        _check_method_options(model, probes, engine)
        methods = list(engine["methods"])
        rows = (
            pick_rows(len(probes), engine["attribution_probes"], probes.groups) if methods else []
        )
        # the per-probe work, in fixed blocks of max_batch rows (audit/engine/distributed.py): one process
        # computes every block, N processes one share each, gathered here; the same numbers either way
        shard = _measure_blocks(model, probes, rows, engine, ranks, say)
        if shard is None:  # not rank zero: its share is gathered, rank zero decides and writes
            return None
        pred, evidence, other = shard
        raw: dict[str, Any] = {"behaviour": behaviour_raw(probes, pred)}
        pictures: dict[str, Any] = {}
        if (
            probes.masks is not None
            and probes.groups is None
            and probes.pairs is None
            and engine["synthesized_probes"]
        ):
            say(
                "counterfactuals: pasting each object onto backgrounds of its own class and of another class"
            )
            raw["synthesized"] = _synthesized_raw(model, probes, pred, engine)

        if methods:
            sub = probes.subset(rows)
            raw["methods"] = _methods_raw(evidence, sub)
            _other_baselines_raw(raw["methods"], evidence, other, engine)
            if engine["sanity_probes"] > 0:
                how = (
                    "cascading randomization"
                    if engine["sanity_mode"] == "cascade"
                    else "every layer randomized at once"
                )
                say(f"sanity: {how} on {min(engine['sanity_probes'], len(probes))} probes")
                _sanity_raw(raw["methods"], model, probes, engine)
            if probes.groups is None and probes.pairs is None and probes.masks is None:
                from audit.evidence.clusters import cluster_maps

                say("clusters: SpRAy over the maps of each class")
                raw["clusters"] = {
                    m: [
                        c.to_dict()
                        for c in cluster_maps(
                            evidence.maps[m],
                            sub.labels,
                            sub.class_names,
                            max_clusters=engine["clusters"],
                            seed=engine["seed"],
                        )
                    ]
                    for m in evidence.methods
                }
        if engine["tcav"]["enabled"] and has_concepts(probes):
            opts = engine["tcav"]
            say(
                f"concepts: TCAV of each class along each context, {opts['random_concepts']} random concepts"
            )
            raw["tcav"] = tcav_raw(model, probes, engine)
        if engine["dissection"]["enabled"] and probes.masks is not None:
            say(
                f"dissection: units of {engine['dissection']['layer'] or 'the last feature map'} against the masks"
            )
            raw["dissection"] = dissection_raw(model, probes, engine)
            pictures["dissection"] = dissection_pictures(
                model, raw["dissection"], engine, probes.size
            )
        _extra_kinds_raw(raw, model, probes, engine, say)
    verdict, checks = decide(raw, gate)
    metrics = _metrics(raw, checks, evidence, probes, rows)
    findings = [c.finding for c in checks if c.decisive] + [
        c.finding for c in checks if not c.decisive
    ]
    return AuditResult(
        verdict=verdict,
        findings=findings,
        metrics=metrics,
        checks=checks,
        raw=raw,
        config=cfg,
        probes=_probe_info(probes, engine),
        evidence=evidence,
        probe_set=probes,
        explained=list(rows),
        seconds=time.perf_counter() - t0,
        pictures=pictures,
    )


def _extra_kinds_raw(
    raw: dict[str, Any],
    model: nn.Module,
    probes: ProbeSet | ProbeFolder,
    engine: Mapping[str, Any],
    say: Callable[[str], None],
) -> None:
    """Measure every registered extra kind (:func:`audit.evidence.register_kind`), after the
    built-in ones, under the model guard; its raw numbers go under its name (none when it
    says it does not apply to these probes)."""
    for kind in registered_kinds():
        say(f"{kind.name}: measuring (a registered kind of evidence)")
        with preserved(model):
            got = kind.measure(model, probes, engine)
        if got is not None:
            raw[kind.name] = got


def _device(choice: str, model: nn.Module) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        return torch.device("cuda")
    current = model_device(model)
    if current.type != "cpu":
        return current
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class _on_device:
    """Run on ``device``; a model moved there is moved back afterwards (nothing changed)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.home = model_device(model)

    def __enter__(self) -> nn.Module:
        if self.home != self.device:
            self.model.to(self.device)
        return self.model

    def __exit__(self, *exc: object) -> None:
        if self.home != self.device:
            self.model.to(self.home)


def _fit_fixed_batch(model: nn.Module, engine: dict[str, Any], say: Callable[[str], None]) -> None:
    """A model that runs only at a fixed batch size (an exported program specialized to its input
    example, :class:`audit.loaders.pt2.ExportedModule`) gets its probes that many at a time: every
    block, explainer chunk and metric pass uses ``engine.max_batch``. Said once."""
    batch = fixed_batch(model)
    if batch is not None and engine["max_batch"] != batch:
        say(
            f"the model runs at a fixed batch of {batch} (its exported program fixes it): probes go {batch} "
            f"at a time (engine.max_batch={batch}, not {engine['max_batch']})"
        )
        engine["max_batch"] = batch


def _check_outputs(model: nn.Module, probes: ProbeSet) -> None:
    device = model_device(model)
    first = probes.images[
        :1
    ]  # outside the try: a probe that does not decode is a ProbeSetError, not the model's
    try:
        with preserved(model, grad=False):
            out = model(first.to(device))
    except Exception as err:  # noqa: BLE001 - reported as one clear error
        raise AuditConfigError(
            f"the model cannot run on the probe images ({tuple(probes.images.shape[1:])}, float in [0, 1]): "
            f"{type(err).__name__}: {err}"
        ) from None
    problem = logits_problem(out, probes.class_names)
    if problem:
        raise AuditConfigError(problem)


def _check_method_options(model: nn.Module, probes: ProbeSet, engine: Mapping[str, Any]) -> None:
    """Run each method that has options once on one probe; options it rejects are config errors.

    A method that fails with the options but runs without them was given a bad option
    (an unknown layer, a composite that does not exist, a layer that is no spatial map):
    :class:`AuditConfigError` with the explainer's own message, before the heavy work.
    A method that fails either way fails because of the model; that is recorded by the
    audit (the method is not used as evidence), as for methods without options.
    """
    options = engine["method_options"] or {}
    x, t = probes.images[:1], probes.labels[:1]
    for m in engine["methods"]:
        opts = dict(options.get(m) or {})
        if not opts:
            continue
        try:
            explain(m, model, x, t, **opts)
            continue
        except Exception as err:  # noqa: BLE001 - judged below
            failure = (
                f"{type(err).__name__}: {err}"
                if not isinstance(err, (AttributionError, ValueError))
                else str(err)
            )
        try:
            explain(m, model, x, t)
        except Exception:  # noqa: BLE001 - the model's fault, recorded by the audit
            continue
        shown = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        raise AuditConfigError(
            f"engine.method_options.{m} ({shown}) does not work on this model: {failure}; "
            f"fix the option, or drop it to use {m}'s default"
        )


def _predict(
    model: nn.Module,
    probes: ProbeSet,
    max_batch: int,
    *,
    workers: int = 0,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`predict_batches` over the probes' ``rows`` (None: every probe), in batches of
    ``max_batch`` read by ``workers`` processes (:meth:`ProbeSet.batches`); the predictions
    are in the order of ``rows``. A broken model or a failing batch is one clear error."""
    n = len(probes) if rows is None else int(rows.numel())
    try:
        return predict_batches(
            model, probes.batches(rows, max_batch, workers=workers), n, finite=True
        )
    except NonFiniteLogits as err:
        raise BrokenModelError(
            f"the model is broken: it returned NaN/Inf logits for {err.bad} of {err.n} probes "
            f"(first: probe {err.first}); check its weights and input normalization; "
            f"a broken model is never audited or promoted"
        ) from None
    except ForwardError as err:
        cause = err.error
        what = f"{type(cause).__name__}" + (f" ({first_line(cause)})" if first_line(cause) else "")
        if err.batch > 1:
            raise AuditConfigError(
                f"the model's forward raised {what} on a batch of {err.batch} probes (it ran on one); "
                f"a forward must accept any batch size (look for a reshape or view that assumes one image), "
                f"or set engine.max_batch=1 to audit one probe at a time"
            ) from None
        raise AuditConfigError(
            f"the model's forward raised {what} on probe {err.start} (it ran on probe 0); "
            f"check that probe's image and the model's forward"
        ) from None


def _synthesized_raw(
    model: nn.Module, probes: ProbeSet, pred: torch.Tensor, engine: Mapping[str, Any]
) -> dict[str, Any]:
    """:func:`audit.evidence.counterfactual.measure`; NaN/Inf logits on a synthesized image mean a broken model."""
    try:
        return counterfactual.measure(
            model,
            probes,
            pred,
            max_share=engine["synthesized_max_object"],
            limit=engine["synthesized_probes"],
            seed=engine["seed"],
            max_batch=engine["max_batch"],
            workers=engine["workers"],
        )
    except NonFiniteLogits as err:
        raise BrokenModelError(
            f"the model is broken: it returned NaN/Inf logits for {err.bad} of {err.n} synthesized counterfactual "
            f"images (objects pasted onto other probes' backgrounds); a broken model is never audited or promoted"
        ) from None


def behaviour_raw(probes: ProbeSet, pred: torch.Tensor) -> dict[str, Any]:
    correct = pred == probes.labels
    out: dict[str, Any] = {"n": len(probes), "correct": int(correct.sum())}
    if len(
        probes
    ):  # for the competence check: is the model better than always answering one class?
        k = len(probes.class_names)
        labels = torch.bincount(probes.labels.cpu(), minlength=k).tolist()
        predicted = torch.bincount(pred.cpu(), minlength=k).tolist()
        out["label_counts"] = dict(zip(probes.class_names, labels, strict=True))
        out["predicted_counts"] = dict(zip(probes.class_names, predicted, strict=True))
        out["chance"] = max(labels) / len(probes)
    if probes.groups is not None:
        out["groups"] = {
            g: {"correct": a.correct, "n": a.n} for g, a in group_accuracy(probes, pred).items()
        }
    if probes.pairs is not None:
        flipped, total = flip_rate(probes, pred)
        out["pairs"] = {"flipped": flipped, "total": total}
        paired = _paired_tables(probes, correct)
        if paired:
            out["paired"] = paired
    return out


def _paired_tables(probes: ProbeSet, correct: torch.Tensor) -> list[dict[str, Any]]:
    """Per pair of groups of one class: the 2x2 table of the pairs seen in both groups.

    A pair id's rows show one object in several contexts. For groups ``(A, B)`` (in
    ``group_names`` order) every pair with a row in both counts once: ``a`` right in
    both, ``b`` right in A only, ``c`` right in B only, ``d`` wrong in both. A pair with
    several rows in one group contributes its first row there (probe order); the other
    rows still count in the group accuracies.
    """
    if probes.groups is None or probes.pairs is None:
        return []
    first: dict[tuple[int, int], bool] = {}
    for p, g, ok in zip(
        probes.pairs.tolist(), probes.groups.tolist(), correct.cpu().tolist(), strict=True
    ):
        first.setdefault((int(p), int(g)), bool(ok))
    by_pair: dict[int, dict[int, bool]] = {}
    for (p, g), ok in first.items():
        by_pair.setdefault(p, {})[g] = ok
    names = probes.group_names
    tables: dict[tuple[int, int], list[int]] = {}
    for seen in by_pair.values():
        gs = sorted(seen)
        for i, gi in enumerate(gs):
            for gj in gs[i + 1 :]:
                if split_group(names[gi])[0] != split_group(names[gj])[0]:
                    continue
                x, y = seen[gi], seen[gj]
                t = tables.setdefault((gi, gj), [0, 0, 0, 0])
                t[0 if x and y else 1 if x else 2 if y else 3] += 1
    return [
        {"groups": [names[gi], names[gj]], "a": t[0], "b": t[1], "c": t[2], "d": t[3]}
        for (gi, gj), t in sorted(tables.items())
    ]


def _methods_raw(ev: Evidence, sub: ProbeSet) -> dict[str, Any]:
    """Per method the per-probe numbers the rules judge: MoRF (``deletion_auc``) and LeRF AUCs, shares.

    A method that explains at a layer also records it under ``layer`` (Grad-CAM's
    resolved layer, e.g. ``layer4``), which the report and the MLflow run show.
    """
    out: dict[str, Any] = {}
    rand = ev.scores.get(RANDOM, {}).get("deletion")
    area = None
    if sub.masks is not None:
        area = (1.0 - sub.masks.float().flatten(1).mean(dim=1)).tolist()
    groups = None if sub.groups is None else [sub.group_names[int(g)] for g in sub.groups]
    for m, err in ev.errors.items():
        out[m] = {"error": err}
    for m in ev.methods:
        entry: dict[str, Any] = {"deletion_auc": ev.scores[m]["deletion"].tolist()}
        if "lerf" in ev.scores[m]:
            entry["lerf_auc"] = ev.scores[m]["lerf"].tolist()
        if rand is not None:  # only when asked for (the gate's rule needs none)
            entry["random_deletion_auc"] = rand.tolist()
        if "relevance_mass" in ev.scores[m]:
            entry["outside_share"] = (1.0 - ev.scores[m]["relevance_mass"]).tolist()
            entry["outside_area"] = area
        if groups is not None:
            entry["groups"] = groups
        if (
            m in ev.layers
        ):  # the layer the maps come from (Grad-CAM's default resolved), for the record
            entry["layer"] = ev.layers[m]
        out[m] = entry
    return out


def _measure_blocks(
    model: nn.Module,
    probes: ProbeSet | ProbeFolder,
    rows: Sequence[int],
    engine: Mapping[str, Any],
    ranks: Ranks | None,
    say: Callable[[str], None],
) -> tuple[torch.Tensor, Evidence | None, list[dict[str, Any]]] | None:
    """The per-probe work of this process, block by block; gathered on rank zero.

    Blocks are ``engine.max_batch`` consecutive rows (of the probe set for the
    predictions, of the explained rows ``rows`` for the attribution evidence); block ``k``
    belongs to rank ``k mod world`` (:func:`audit.engine.distributed.block_rows`), so each
    probe's numbers come from the same batch whatever the number of processes.

    Returns:
        ``(predictions [N], evidence of the explained rows, per-block curves on
        engine.also_baselines)``; None on a rank other than zero.

    Raises:
        As :func:`run_audit`; distributed, :class:`~audit.engine.distributed.ShardError` on every rank.
    """
    rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world)
    size = int(engine["max_batch"])
    n = len(probes)
    mine = block_rows(n, size, rank, world)
    explain_blocks = block_rows(len(rows), size, rank, world) if rows else []
    workers = int(engine.get("workers", 0))
    try:
        if world == 1:
            say(f"behaviour: predicting {n} probes")
            pred = _predict(model, probes, size, workers=workers)
        else:
            say(
                f"behaviour: predicting {n} probes ({len(blocks(n, size))} blocks of {size} over {world} processes)"
            )
            mine_rows = rows_of(mine)
            pred = _predict(model, probes, size, workers=workers, rows=mine_rows)
        parts: list[tuple[int, Evidence, dict[str, Any]]] = []
        if rows:
            methods = list(engine["methods"])
            metrics = [
                "deletion",
                "lerf",
            ]  # the faithfulness filter's curves (rules/faithfulness.py)
            if probes.masks is not None:
                metrics.append("relevance_mass")
            say(
                f"attribution: {', '.join(methods)} on {len(rows)} probes, deletion curves of {engine['steps']} steps"
            )
            # one line per block stage inside (maps, curves), and this one over the blocks: a block is
            # max_batch probes, so the maps of a block are one chunk and their own line comes at its end
            with task("attribution", sum(len(b) for b in explain_blocks)) as t:
                for b in explain_blocks:
                    block = probes.subset([rows[i] for i in b])  # only this block's images are read
                    ev = collect(
                        model,
                        block,
                        methods,
                        metrics,
                        target="label",
                        steps=engine["steps"],
                        baseline=engine["baseline"],
                        method_options=engine["method_options"] or None,
                        max_batch=size,
                        on_error="record",
                    ).cpu()
                    other = _other_baselines_block(model, block, ev, engine)
                    shift = torch.tensor(
                        b.start, dtype=torch.long
                    )  # block rows -> rows of the explained subset
                    parts.append(
                        (
                            b.start,
                            replace(ev, index=ev.index + shift, map_index=ev.map_index + shift),
                            other,
                        )
                    )
                    t.advance(len(b))
    except Exception as err:
        if ranks is None:
            raise
        ranks.gather("error", user_line(err))  # what the one-process run would say
        raise AssertionError(
            "unreachable: the gather raises on an error"
        ) from None  # pragma: no cover
    if ranks is not None:
        payload = {"pred": (rows_of(mine) if world > 1 else None, pred), "parts": parts}
        gathered = ranks.gather("ok", payload)
        if ranks.rank != 0:
            return None
        full = torch.empty(n, dtype=torch.long)
        for g in gathered:
            r, p = g["pred"]
            full[r] = p
        pred = full
        parts = [p for g in gathered for p in g["parts"]]
    if not rows:
        return pred, None, []
    parts.sort(key=lambda p: p[0])
    evidence = Evidence.cat([ev for _, ev, _ in parts]) if parts else None
    return pred, evidence, [o for _, _, o in parts]


def _other_baselines_block(
    model: nn.Module, block: ProbeSet, ev: Evidence, engine: Mapping[str, Any]
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """The MoRF and LeRF AUCs of one block's maps on each of ``engine.also_baselines``.

    The maps are the ones already computed; only the curves are new (one batched
    :func:`audit.metrics.curve_set` per baseline over every method's maps).

    Returns:
        ``{baseline: {method: (morf AUCs, lerf AUCs)}}`` for the block's rows.
    """
    from audit.metrics import curve_set

    names = [m for m in ev.methods if "lerf" in ev.scores[m]]
    if not names or not engine["also_baselines"] or not len(block):
        return {}
    device = model_device(model)
    x = block.images.to(device)
    t = block.labels.to(device)
    maps = torch.cat([ev.maps[m].to(device) for m in names])
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    n = len(block)
    with preserved(model, grad=False):
        for b in engine["also_baselines"]:
            got = curve_set(
                model,
                x,
                t,
                maps,
                ("deletion", "lerf"),
                steps=engine["steps"],
                baseline=b,
                max_batch=engine["max_batch"],
            )
            morf, lerf = got["deletion"][1].cpu(), got["lerf"][1].cpu()
            out[str(b)] = {
                m: (morf[i * n : (i + 1) * n].tolist(), lerf[i * n : (i + 1) * n].tolist())
                for i, m in enumerate(names)
            }
    return out


def _other_baselines_raw(
    methods: dict[str, Any],
    ev: Evidence,
    blocks_other: Sequence[Mapping[str, Any]],
    engine: Mapping[str, Any],
) -> None:
    """The faithfulness filter's MoRF and LeRF AUCs on ``engine.also_baselines``, per method.

    Joined from the blocks' :func:`_other_baselines_block` (in row order). Stored per
    method as ``srg_baselines: {baseline: {"deletion_auc": [...], "lerf_auc": [...]}}``,
    the engine's own baseline included, so :func:`recheck` needs nothing else.
    """
    names = [m for m in ev.methods if "lerf_auc" in methods.get(m, {})]
    for m in names:
        methods[m]["srg_baselines"] = {
            str(engine["baseline"]): {
                "deletion_auc": methods[m]["deletion_auc"],
                "lerf_auc": methods[m]["lerf_auc"],
            }
        }
    if not names or not engine["also_baselines"] or not len(ev.index):
        return
    for b in engine["also_baselines"]:
        for m in names:
            morf = [v for part in blocks_other for v in part[str(b)][m][0]]
            lerf = [v for part in blocks_other for v in part[str(b)][m][1]]
            methods[m]["srg_baselines"][str(b)] = {"deletion_auc": morf, "lerf_auc": lerf}


def _sanity_raw(
    methods: dict[str, Any], model: nn.Module, probes: ProbeSet, engine: Mapping[str, Any]
) -> None:
    rows = pick_rows(len(probes), engine["sanity_probes"], probes.groups)
    x = probes.images[rows].to(model_device(model))
    t = probes.labels[rows].to(x.device)
    options = engine["method_options"] or {}
    # a model that runs at a fixed batch explains that many probes per pass here too
    chunk = {"max_batch": engine["max_batch"]} if fixed_batch(model) is not None else {}
    for m, entry in methods.items():
        if "error" in entry:
            continue
        try:
            res = randomization_sanity(
                m,
                model,
                x,
                t,
                seed=engine["seed"],
                mode=engine["sanity_mode"],
                **{**chunk, **dict(options.get(m, {}))},
            )
        except AttributionError as err:
            entry["sanity_error"] = f"{type(err).__name__}: {err}"
            continue
        # per probe, what decide() judges (the final step: every layer randomized); the
        # summary is recomputed from these, so recheck() gives the same verdict
        entry["sanity_mode"] = res.mode
        entry["sanity_similarity"] = res.similarity
        entry["sanity_spearman"] = res.spearman[-1].tolist()
        entry["sanity_spearman_abs"] = res.spearman_abs[-1].tolist()
        entry["sanity_constant"] = [bool(c) for c in res.constant_original]
        entry["sanity_constant_randomized"] = [bool(c) for c in res.constant_randomized[-1]]
        if res.mode == "cascade":  # for the record only: the gate reads the final step
            entry["sanity_cascade"] = {
                layer: _max_defined(v, va)
                for layer, v, va in zip(res.steps, res.mean, res.mean_abs, strict=True)
            }


def _probe_info(
    probes: ProbeSet | ProbeFolder, engine: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``probes`` block of the report. A streamed folder's digest is hashed streaming: it is
    known already when the prediction pass read every row in order, else one more pass reads it
    (``engine.max_batch`` rows at a time, ``engine.workers`` processes)."""
    h, w = probes.size
    if isinstance(probes, ProbeFolder):
        e = engine or {}
        digest = probes.compute_digest(int(e.get("max_batch", 128)), int(e.get("workers", 0)))
    else:
        digest = probes.digest
    return {
        "digest": digest,
        "n": len(probes),
        "size": [h, w],
        "classes": list(probes.class_names),
        "groups": list(probes.group_names) if probes.groups is not None else None,
        "has_masks": probes.masks is not None,
        "has_groups": probes.groups is not None,
        "has_pairs": probes.pairs is not None,
    }


# --------------------------------------------------------------------------- judging
def recheck(report: Mapping[str, Any], gate: Mapping[str, Any] | None = None) -> str:
    """Re-derive a report's verdict from its evidence block (optionally under other thresholds).

    A registered extra kind's checks are re-judged by its judge; evidence of a kind not
    registered here is left out, with a :class:`UserWarning` that names it.
    """
    if report.get("schema") != SCHEMA or int(report.get("schema_version", -1)) != SCHEMA_VERSION:
        raise ValueError(
            f"not a {SCHEMA} v{SCHEMA_VERSION} report: schema={report.get('schema')!r}, "
            f"version={report.get('schema_version')!r}"
        )
    cfg = check_config(
        merge_config(
            {"engine": report["config"]["engine"], "gate": gate or report["config"]["gate"]}
        )
    )
    verdict, checks = decide(report["evidence"], cfg["gate"])
    for c in checks:
        if c.kind == UNREGISTERED:  # its evidence is left out of the verdict: say so
            warnings.warn(c.finding, UserWarning, stacklevel=2)
    return verdict


def _metrics(
    raw: Mapping[str, Any],
    checks: Sequence[Check],
    ev: Evidence | None,
    probes: ProbeSet,
    rows: Sequence[int],
) -> dict[str, float]:
    out: dict[str, float] = {}
    if ev is not None:
        out.update(summarize(ev, probes.subset(rows)))
        for k in list(out):  # behaviour numbers come from every probe, below
            if k == "accuracy" or k.startswith(("acc/", "context_gap", "flip_rate")):
                del out[k]
    beh = raw["behaviour"]
    out["accuracy"] = beh["correct"] / beh["n"] if beh["n"] else math.nan
    for g, c in (beh.get("groups") or {}).items():
        out[f"acc/{g}"] = c["correct"] / c["n"]
    for c in checks:
        if c.name.startswith("context_gap/"):
            cls = c.name.split("/", 1)[1]
            for k in ("gap", "low", "high"):
                out[f"context_gap/{cls}" + ("" if k == "gap" else f"/{k}")] = float(c.numbers[k])
        elif c.name == "flip_rate":
            out["flip_rate"] = float(c.numbers["flip_rate"])
            out["flip_rate/low"], out["flip_rate/high"] = (
                float(c.numbers["low"]),
                float(c.numbers["high"]),
            )
        elif (
            c.name.startswith("faithfulness/") and "srg" in c.numbers
        ):  # the mean is summarize's <m>/srg
            m = c.name.split("/", 1)[1]
            own = None if ev is None else ev.baseline
            per = c.numbers.get("baselines") or {own: c.numbers}
            for (
                b,
                v,
            ) in (
                per.items()
            ):  # the engine baseline's under <m>/srg, the others' as <m>/srg.<baseline>
                name = f"{m}/srg" if b in (own, "") else f"{m}/srg.{b}"
                if name != f"{m}/srg":
                    out[name] = float(v["srg"])
                out[f"{name}/low"], out[f"{name}/high"] = float(v["low"]), float(v["high"])
        elif c.name.startswith("sanity/") and "similarity" in c.numbers:
            out[f"{c.name.split('/', 1)[1]}/sanity_similarity"] = float(c.numbers["similarity"])
        elif c.name.startswith("synthesized/") and "flip_rate" in c.numbers:
            out[f"{c.name}/flip_rate"] = float(c.numbers["flip_rate"])
        elif c.name.startswith("attribution/"):
            out[f"{c.name.split('/', 1)[1]}/outside_excess"] = float(c.numbers["excess"])
    gaps = [v for k, v in out.items() if k.startswith("context_gap/") and k.count("/") == 1]
    if gaps:
        out["context_gap"] = max(gaps)
    out.update(_dissection_rules.metrics(raw.get("dissection")))
    tcav = raw.get("tcav") or {}
    for cls, per in (
        tcav.get("scores") or {}
    ).items():  # TCAV: mean score and logit shift over the CAVs
        for ctx, scores in per.items():
            shifts = tcav["shift"][cls][ctx]
            out[f"tcav/{cls}/{ctx}"] = sum(scores) / len(scores) if scores else math.nan
            out[f"tcav/{cls}/{ctx}/shift"] = sum(shifts) / len(shifts) if shifts else math.nan
    used = {m for c in checks if c.name == "methods" for m in c.numbers["used"]}
    for m in raw.get("methods", {}):
        out[f"{m}/used"] = 1.0 if m in used else 0.0
    return {k: float(v) for k, v in out.items()}
