"""Spurious-feature assessment: the evidence of one model on one probe set -> a verdict with reasons.

:func:`run_audit` measures; :func:`decide` judges. The split is deliberate: ``decide``
works on plain numbers (counts and per-probe scores, the ``evidence`` block of
``report.json``) and the gate config, so anyone holding a report can re-derive its
verdict with :func:`recheck`, and the thresholds can be changed without re-running
a model.

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
  The rule and its error guarantees are in :mod:`audit.stats`. One class being harder
  than another is not a spurious feature, so gaps are only taken within a class.
* **Counterfactual flips** (pairs): the share of pairs whose prediction changes
  with the context, with one-sided Wilson bounds. Reported always; decides (PASS when
  the upper bound is below ``flip_rate.fail``, FAIL when the lower bound is above
  ``flip_rate.pass``) only when there are no groups.
* **Attribution** (masks): per method, the per-probe share of positive relevance
  outside the object mask minus the share of the image the outside covers (the
  *excess*, scaled to -1..+1), with a normal interval over probes. Only methods that
  pass the two filters below count. It decides only when there are neither groups nor
  pairs, and then it can FAIL (clear excess) but never PASS: relevance on the object
  does not show that the context is ignored (the snow-wolf shortcut model puts most
  of its Grad-CAM and LRP relevance on the animal). With groups or pairs it
  corroborates, and (``attribution.veto``) turns a behavioural PASS into
  INCONCLUSIVE when the faithful methods clearly put the relevance off the object.
* **Faithfulness filter**: a method whose deletion AUC does not beat a random pixel
  ordering's by ``faithfulness.min_advantage`` (paired interval over probes) is not
  used as evidence, and a finding says so.
* **Sanity filter**: a method whose maps survive the randomization of every layer
  (Spearman similarity >= ``sanity.max_similarity``, Adebayo et al. 2018) is not used.
  Only the original against the fully randomized model is judged (all layers at once,
  ``engine.sanity_mode: full``, Hedstroem et al. 2023; ``cascade`` also records each
  layer's step). A constant map of the randomized model (an all-zero Grad-CAM) changed
  completely and counts as similarity 0; a probe whose *original* map is constant says
  nothing and is left out (the finding gives the count), and a method constant on
  every probe is not used as evidence.
* **Labels only**: the maps are clustered per class (SpRAy, :mod:`audit.spray`) for a
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

import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import nn

from audit import stats
from audit._model import AttributionError, model_device, preserved
from audit.behaviour import (
    ForwardError,
    NonFiniteLogits,
    flip_rate,
    group_accuracy,
    predict,
    split_group,
)
from audit.evidence import RANDOM, Evidence, check_names, collect, summarize
from audit.methods import explain
from audit.methods.registry import METHODS, _check_options
from audit.metrics import randomization_sanity
from audit.metrics.sanity import MODES as SANITY_MODES
from audit.probes import ProbeSet
from audit.render import pick_rows

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


class AuditConfigError(ValueError):
    """A bad audit config or an input that does not fit (names the key and the fix)."""


class BrokenModelError(AuditConfigError):
    """The model returns NaN or Inf logits: it is broken, and is never audited or promoted.

    A subclass of :class:`AuditConfigError`, so the job maps it to exit 2 (bad input).
    """


# --------------------------------------------------------------------------- results
@dataclass
class Check:
    """One piece of evidence and what it says.

    Attributes:
        name: e.g. ``context_gap/wolf``, ``flip_rate``, ``attribution/gradcam``,
            ``faithfulness/lrp``, ``sanity/saliency``, ``clusters/wolf``.
        kind: ``behaviour``, ``attribution``, ``faithfulness``, ``sanity``, ``clusters``.
        verdict: PASS / FAIL / INCONCLUSIVE for a check that votes; None for one that
            only informs (a filter, a corroborating number).
        finding: the sentence, with its numbers.
        numbers: the numbers behind it.
        decisive: whether this check's verdict entered the final verdict.
    """

    name: str
    kind: str
    verdict: str | None
    finding: str
    numbers: dict[str, Any] = field(default_factory=dict)
    decisive: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "verdict": self.verdict,
            "decisive": self.decisive,
            "finding": self.finding,
            "numbers": _plain_numbers(self.numbers),
        }


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


def _plain_numbers(obj: Any) -> Any:
    """JSON-safe copy: tensors to lists, NaN/Inf to None, tuples to lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain_numbers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_numbers(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _plain_numbers(obj.detach().cpu().tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    try:
        f = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------- config
def default_config() -> dict[str, Any]:
    """The defaults shipped in ``conf/engine/default.yaml`` and ``conf/gate/default.yaml``."""
    import yaml

    root = resources.files("audit.conf")
    return {
        part: yaml.safe_load(root.joinpath(part, "default.yaml").read_text(encoding="utf-8"))
        for part in ("engine", "gate")
    }


def merge_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The defaults with ``config`` (``{"engine": {...}, "gate": {...}}``, partial) laid over them.

    Raises:
        AuditConfigError: an unknown key (a typo must not silently fall back to a default).
    """
    base = default_config()
    if config is None:
        return base
    cfg = _to_dict(config)
    unknown = sorted(set(cfg) - set(base))
    if unknown:
        raise AuditConfigError(f"unknown audit config section(s) {unknown}; valid sections are engine and gate")
    for part, over in cfg.items():
        _merge_into(base[part], _to_dict(over or {}), part)
    return base


def _to_dict(obj: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        pass
    if isinstance(obj, Mapping):
        return {k: _to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


# keys whose value is a free mapping (not merged key by key against defaults)
_FREE = {"engine.method_options"}


def _merge_into(base: dict[str, Any], over: Mapping[str, Any], where: str) -> None:
    for key, value in over.items():
        path = f"{where}.{key}"
        if key not in base:
            raise AuditConfigError(
                f"unknown config key {path!r}; valid keys under {where} are {sorted(base)}"
            )
        if isinstance(base[key], dict) and path not in _FREE:
            if not isinstance(value, Mapping):
                raise AuditConfigError(f"{path} must be a mapping with keys {sorted(base[key])}; got {value!r}")
            _merge_into(base[key], value, path)
        else:
            base[key] = _to_dict(value)


def _number(cfg: Mapping[str, Any], path: str, low: float, high: float, *, open_low=False, open_high=False) -> float:
    node: Any = cfg
    for part in path.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        raise AuditConfigError(f"{path} must be a number; got {node!r}")
    bad_low = node <= low if open_low else node < low
    bad_high = node >= high if open_high else node > high
    if bad_low or bad_high:
        lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
        raise AuditConfigError(
            f"{path}={node} is out of range: it must lie in {lo}{low}, {high}{hi}; "
            f"set it in conf/gate or on the command line, e.g. {path}=<value in range>"
        )
    return float(node)


def _integer(cfg: Mapping[str, Any], path: str, low: int) -> int:
    node: Any = cfg
    for part in path.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < low:
        raise AuditConfigError(f"{path} must be an integer >= {low}; got {node!r}")
    return node


def check_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a merged config (every threshold in range, names known); returns it.

    Raises:
        AuditConfigError: naming the key, the allowed range or names, and the fix.
    """
    gate, engine = cfg["gate"], cfg["engine"]
    _number(cfg, "gate.confidence", 0.5, 1.0, open_low=True, open_high=True)
    for part in ("context_gap", "flip_rate"):
        p = _number(cfg, f"gate.{part}.pass", 0.0, 1.0)
        f = _number(cfg, f"gate.{part}.fail", 0.0, 1.0, open_low=True)
        if not p < f:
            raise AuditConfigError(
                f"gate.{part}.pass ({p}) must be below gate.{part}.fail ({f}), e.g. pass=0.05 fail=0.15"
            )
    _number(cfg, "gate.attribution.fail", -1.0, 1.0)
    if not isinstance(gate["attribution"]["veto"], bool):
        raise AuditConfigError(
            f"gate.attribution.veto must be true or false (a boolean, not a string); got {gate['attribution']['veto']!r}"
        )
    _number(cfg, "gate.faithfulness.min_advantage", -1.0, 1.0)
    _number(cfg, "gate.sanity.max_similarity", -1.0, 1.0, open_low=True)
    methods = engine["methods"]
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise AuditConfigError(f"engine.methods must be a list of names, e.g. [gradcam, lrp]; got {methods!r}")
    try:
        check_names(list(methods), ())
    except ValueError as err:
        raise AuditConfigError(f"engine.methods: {err}") from None
    options = engine["method_options"] or {}
    if not isinstance(options, Mapping):
        raise AuditConfigError(
            f"engine.method_options must be a mapping method -> options, e.g. {{gradcam: {{layer: features}}}}; "
            f"got {options!r}"
        )
    extra = sorted(set(options) - set(methods))
    if extra:
        raise AuditConfigError(
            f"engine.method_options has options for {extra}, which are not in engine.methods {list(methods)}"
        )
    for m, opts in options.items():
        if opts is not None and not isinstance(opts, Mapping):
            raise AuditConfigError(
                f"engine.method_options.{m} must be a mapping option -> value, e.g. {{layer: features}}; got {opts!r}"
            )
        try:  # option names are known without a model; bad values are found in run_audit
            _check_options(m, METHODS[m], dict(opts or {}))
        except AttributionError as err:
            raise AuditConfigError(f"engine.method_options.{m}: {err}") from None
    _integer(cfg, "engine.steps", 1)
    _integer(cfg, "engine.max_batch", 1)
    _integer(cfg, "engine.attribution_probes", 1)
    _integer(cfg, "engine.sanity_probes", 0)
    if engine["sanity_mode"] not in SANITY_MODES:
        raise AuditConfigError(
            f"engine.sanity_mode must be full (one randomization of every layer) or cascade "
            f"(one step per layer, slow); got {engine['sanity_mode']!r}"
        )
    _integer(cfg, "engine.seed", 0)
    _integer(cfg, "engine.clusters", 1)
    if engine["baseline"] not in ("zero", "mean", "blur"):
        raise AuditConfigError(f"engine.baseline must be zero, mean or blur; got {engine['baseline']!r}")
    if engine["device"] not in ("auto", "cpu", "cuda"):
        raise AuditConfigError(f"engine.device must be auto, cpu or cuda; got {engine['device']!r}")
    if engine["device"] == "cuda" and not torch.cuda.is_available():
        raise AuditConfigError("engine.device=cuda but no CUDA device is available; use auto or cpu")
    return dict(cfg)


# --------------------------------------------------------------------------- measuring
def run_audit(
    model: nn.Module,
    probes: ProbeSet,
    config: Mapping[str, Any] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> AuditResult:
    """Audit ``model`` on ``probes``: measure the evidence and decide (see the module docstring).

    Args:
        model: a classifier returning logits ``[N, classes]`` for display-space images
            (wrap input normalization with :class:`audit.models.Normalized`). Never
            modified: training flags, gradients, hooks and BatchNorm statistics are
            restored, and the sanity check randomizes a deep copy.
        probes: the probe set; output ``i`` of the model is ``probes.class_names[i]``.
        config: ``{"engine": {...}, "gate": {...}}`` laid over the defaults of
            ``conf/engine/default.yaml`` and ``conf/gate/default.yaml``; None = defaults.
        progress: called with a short line at each stage (e.g. ``print``).

    Returns:
        The :class:`AuditResult`.

    Raises:
        AuditConfigError: a bad config (also a method option the model rejects, e.g. an
            unknown Grad-CAM layer, found on one probe before the heavy work), probes
            whose classes do not match the model, or a forward that fails on a batch.
        BrokenModelError: the model returns NaN or Inf logits for any probe.
    """
    t0 = time.perf_counter()
    cfg = check_config(merge_config(config))
    engine, gate = cfg["engine"], cfg["gate"]
    say = progress or (lambda _msg: None)
    device = _device(engine["device"], model)
    with torch.inference_mode(False), _on_device(model, device) as model:
        _check_outputs(model, probes)
        _check_method_options(model, probes, engine)
        say(f"behaviour: predicting {len(probes)} probes")
        pred = _predict(model, probes, engine["max_batch"])
        raw: dict[str, Any] = {"behaviour": _behaviour_raw(probes, pred)}

        methods = list(engine["methods"])
        evidence, rows = None, []
        if methods:
            rows = pick_rows(len(probes), engine["attribution_probes"], probes.groups)
            sub = probes.subset(rows)
            metrics = ["deletion", "random_reference"]
            if probes.masks is not None:
                metrics.append("relevance_mass")
            say(f"attribution: {', '.join(methods)} on {len(rows)} probes, deletion curves of {engine['steps']} steps")
            evidence = collect(
                model, sub, methods, metrics, target="label", steps=engine["steps"],
                baseline=engine["baseline"], method_options=engine["method_options"] or None,
                max_batch=engine["max_batch"], on_error="record",
            ).cpu()  # fmt: skip
            raw["methods"] = _methods_raw(evidence, sub)
            if engine["sanity_probes"] > 0:
                how = "cascading randomization" if engine["sanity_mode"] == "cascade" else "every layer randomized at once"
                say(f"sanity: {how} on {min(engine['sanity_probes'], len(probes))} probes")
                _sanity_raw(raw["methods"], model, probes, engine)
            if probes.groups is None and probes.pairs is None and probes.masks is None:
                from audit.spray import cluster_maps

                say("clusters: SpRAy over the maps of each class")
                raw["clusters"] = {
                    m: [c.to_dict() for c in cluster_maps(evidence.maps[m], sub.labels, sub.class_names,
                                                          max_clusters=engine["clusters"], seed=engine["seed"])]
                    for m in evidence.methods
                }  # fmt: skip
    verdict, checks = decide(raw, gate)
    metrics = _metrics(raw, checks, evidence, probes, rows)
    findings = [c.finding for c in checks if c.decisive] + [c.finding for c in checks if not c.decisive]
    return AuditResult(
        verdict=verdict,
        findings=findings,
        metrics=metrics,
        checks=checks,
        raw=raw,
        config=cfg,
        probes=_probe_info(probes),
        evidence=evidence,
        probe_set=probes,
        explained=list(rows),
        seconds=time.perf_counter() - t0,
    )


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


def _check_outputs(model: nn.Module, probes: ProbeSet) -> None:
    device = model_device(model)
    try:
        with preserved(model, grad=False):
            out = model(probes.images[:1].to(device))
    except Exception as err:  # noqa: BLE001 - reported as one clear error
        raise AuditConfigError(
            f"the model cannot run on the probe images ({tuple(probes.images.shape[1:])}, float in [0, 1]): "
            f"{type(err).__name__}: {err}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise AuditConfigError(
            f"the model must return logits [N, classes]; it returned {type(out).__name__} "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
        )
    if out.shape[1] != len(probes.class_names):
        raise AuditConfigError(
            f"the probes' classes do not match the model's outputs: the probe set has "
            f"{len(probes.class_names)} classes {probes.class_names} but the model has {out.shape[1]} outputs; "
            f"classes.txt line i must name model output i"
        )


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
            failure = f"{type(err).__name__}: {err}" if not isinstance(err, (AttributionError, ValueError)) else str(err)
        try:
            explain(m, model, x, t)
        except Exception:  # noqa: BLE001 - the model's fault, recorded by the audit
            continue
        shown = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        raise AuditConfigError(
            f"engine.method_options.{m} ({shown}) does not work on this model: {failure}; "
            f"fix the option, or drop it to use {m}'s default"
        )


def _predict(model: nn.Module, probes: ProbeSet, max_batch: int) -> torch.Tensor:
    """:func:`predict` over every probe; a broken model or a failing batch is one clear error."""
    try:
        return predict(model, probes.images, max_batch=max_batch, finite=True)
    except NonFiniteLogits as err:
        raise BrokenModelError(
            f"the model is broken: it returned NaN/Inf logits for {err.bad} of {err.n} probes "
            f"(first: probe {err.first}); check its weights and input normalization; "
            f"a broken model is never audited or promoted"
        ) from None
    except ForwardError as err:
        cause = err.error
        what = f"{type(cause).__name__}" + (f" ({str(cause).splitlines()[0]})" if str(cause).strip() else "")
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


def _behaviour_raw(probes: ProbeSet, pred: torch.Tensor) -> dict[str, Any]:
    correct = pred == probes.labels
    out: dict[str, Any] = {"n": len(probes), "correct": int(correct.sum())}
    if len(probes):  # for the competence check: is the model better than always answering one class?
        k = len(probes.class_names)
        labels = torch.bincount(probes.labels.cpu(), minlength=k).tolist()
        predicted = torch.bincount(pred.cpu(), minlength=k).tolist()
        out["label_counts"] = dict(zip(probes.class_names, labels, strict=True))
        out["predicted_counts"] = dict(zip(probes.class_names, predicted, strict=True))
        out["chance"] = max(labels) / len(probes)
    if probes.groups is not None:
        out["groups"] = {g: {"correct": a.correct, "n": a.n} for g, a in group_accuracy(probes, pred).items()}
    if probes.pairs is not None:
        flipped, total = flip_rate(probes, pred)
        out["pairs"] = {"flipped": flipped, "total": total}
        paired = _paired_tables(probes, correct)
        if paired:
            out["paired"] = paired
    return out


# --------------------------------------------------------------------------- behaviour: context gaps and flips
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
    for p, g, ok in zip(probes.pairs.tolist(), probes.groups.tolist(), correct.cpu().tolist(), strict=True):
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


def _gap_comparisons(beh: Mapping[str, Any]) -> list[stats.Comparison]:
    """Every pair of contexts of every class, paired where the pairs cover the groups.

    A pair of groups ``(A, B)`` is compared on its pairs (the paired table of
    ``beh["paired"]``) when they hold at least half the rows of each group
    (``2 * pairs >= max(n_A, n_B)``), and as independent groups on all their rows
    otherwise. The choice depends on the design only (which rows have a partner), never
    on the predictions, so it does not bias either test.
    """
    groups = beh["groups"]
    by_class: dict[str, list[str]] = {}
    for g in groups:
        by_class.setdefault(split_group(g)[0], []).append(g)
    tables: dict[tuple[str, str], tuple[int, int, int, int]] = {}
    for t in beh.get("paired") or []:
        ga, gb = (str(x) for x in t["groups"])
        a, b, c, d = (int(t[k]) for k in ("a", "b", "c", "d"))
        tables[(ga, gb)] = (a, b, c, d)
        tables[(gb, ga)] = (a, c, b, d)
    out = []
    for cls, names in by_class.items():
        for i, ga in enumerate(names):
            for gb in names[i + 1 :]:
                na, nb = int(groups[ga]["n"]), int(groups[gb]["n"])
                t = tables.get((ga, gb))
                if t is not None and sum(t) >= 1 and 2 * sum(t) >= max(na, nb):
                    out.append(stats.Comparison(cls, ga, gb, t, paired=True))
                else:
                    counts = (int(groups[ga]["correct"]), na, int(groups[gb]["correct"]), nb)
                    out.append(stats.Comparison(cls, ga, gb, counts))
    return out


def _context_gap_checks(
    beh: Mapping[str, Any], gate: Mapping[str, Any], attr_by_group: Mapping[str, Mapping[str, tuple[float, float]]]
) -> tuple[str | None, list[Check]]:
    """The behaviour verdict (None: no class in two contexts) and one check per class."""
    comparisons = _gap_comparisons(beh)
    if not comparisons:
        return None, [Check("context_gap", "behaviour", None,
                            "no class is seen in two or more contexts (groups '<class>|<context>'), so no context gap can be measured")]  # fmt: skip
    conf = float(gate["confidence"])
    pct = round(100 * conf)
    g_fail, g_pass = float(gate["context_gap"]["fail"]), float(gate["context_gap"]["pass"])
    dec = stats.decide_comparisons(comparisons, g_fail, g_pass, conf)
    m = len(comparisons)
    checks = []
    for cls, v in dec.classes.items():
        r = dec.deciding(cls)
        c = r.comparison
        (k1, n1), (k2, n2) = c.accuracies
        (worse, kw, nw), (better, kb, nb) = sorted([(c.first, k1, n1), (c.second, k2, n2)], key=lambda x: x[1] / x[2])
        head = f"{worse}: accuracy {kw / nw:.2f} ({kw}/{nw}) vs {kb / nb:.2f} ({kb}/{nb}) for {better}"
        if c.paired:
            disc = c.counts[1] + c.counts[2]
            on = f"on {c.size} ({disc} discordant"
            test = "paired score interval, Newcombe"
        else:
            on = f"on {c.size} (independent groups"
            test = "score interval, Newcombe"
        mine = len(dec.of(cls))
        if v == "FAIL":
            tail = (
                f"context gap {abs(r.diff):.2f} {on}; lower bound {r.lower:.2f} at family-wise {pct}%, {test}, "
                f"Holm over {m} comparison{'s' if m > 1 else ''}) is clearly above the tolerated {g_pass:.2f}"
            )
        elif v == "PASS":
            every = f"; the largest of {mine} context pairs, each tested (intersection-union)" if mine > 1 else ""
            tail = (
                f"context gap {abs(r.diff):.2f} {on}; {pct}% one-sided bounds {r.low:+.2f} and {r.high:+.2f}, {test}) "
                f"rules out a gap of {g_fail:.2f} (equivalence test{every})"
            )
        else:
            tail = stats.describe_probes_needed(r, dec)
        support = _support(attr_by_group, worse)
        nums = {"gap": abs(r.diff), "low": r.lower, "high": r.upper, "diff_low": r.low, "diff_high": r.high,
                "holm_level": r.level, "paired": c.paired, "counts": list(c.counts), "comparisons": m,
                "class_comparisons": mine, "worst_group": worse, "worst_accuracy": kw / nw, "worst_n": nw,
                "best_group": better, "best_accuracy": kb / nb, "best_n": nb, "fail": g_fail, "pass": g_pass}  # fmt: skip
        checks.append(Check(f"context_gap/{cls}", "behaviour", v, f"{head}; {tail}{support}", nums))
    return dec.verdict, checks


def _flip_rate_check(pairs: Mapping[str, Any], gate: Mapping[str, Any]) -> Check:
    """The ``flip_rate`` check: one-sided Wilson bounds of the share of pairs that flip."""
    conf = float(gate["confidence"])
    pct = round(100 * conf)
    k, n = int(pairs["flipped"]), int(pairs["total"])
    f_fail, f_pass = float(gate["flip_rate"]["fail"]), float(gate["flip_rate"]["pass"])
    code, lo, hi = stats.decide_rate(k, n, f_fail, f_pass, conf)
    v = stats.CODES[int(code)]
    lo, hi = float(lo), float(hi)
    sentence = (
        f"changing only the context flips the prediction on {k} of {n} counterfactual pairs "
        f"(flip rate {k / n:.2f}, {pct}% one-sided bounds {lo:.2f} and {hi:.2f}, Wilson)"
    )
    if v == "PASS":
        sentence += f"; rules out a flip rate of {f_fail:.2f}"
    elif v == "FAIL":
        sentence += f"; clearly above the tolerated {f_pass:.2f}"
    nums = {"flip_rate": k / n, "low": lo, "high": hi, "flipped": k, "pairs": n, "fail": f_fail, "pass": f_pass}
    return Check("flip_rate", "behaviour", v, sentence, nums)


def _methods_raw(ev: Evidence, sub: ProbeSet) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rand = ev.scores.get(RANDOM, {}).get("deletion")
    area = None
    if sub.masks is not None:
        area = (1.0 - sub.masks.float().flatten(1).mean(dim=1)).tolist()
    groups = None if sub.groups is None else [sub.group_names[int(g)] for g in sub.groups]
    for m, err in ev.errors.items():
        out[m] = {"error": err}
    for m in ev.methods:
        entry: dict[str, Any] = {
            "deletion_auc": ev.scores[m]["deletion"].tolist(),
            "random_deletion_auc": None if rand is None else rand.tolist(),
        }
        if "relevance_mass" in ev.scores[m]:
            entry["outside_share"] = (1.0 - ev.scores[m]["relevance_mass"]).tolist()
            entry["outside_area"] = area
        if groups is not None:
            entry["groups"] = groups
        out[m] = entry
    return out


def _sanity_raw(methods: dict[str, Any], model: nn.Module, probes: ProbeSet, engine: Mapping[str, Any]) -> None:
    rows = pick_rows(len(probes), engine["sanity_probes"], probes.groups)
    x = probes.images[rows].to(model_device(model))
    t = probes.labels[rows].to(x.device)
    options = engine["method_options"] or {}
    for m, entry in methods.items():
        if "error" in entry:
            continue
        try:
            res = randomization_sanity(
                m, model, x, t, seed=engine["seed"], mode=engine["sanity_mode"], **dict(options.get(m, {}))
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
                layer: _max_defined(v, va) for layer, v, va in zip(res.steps, res.mean, res.mean_abs, strict=True)
            }


def _probe_info(probes: ProbeSet) -> dict[str, Any]:
    h, w = probes.size
    return {
        "digest": probes.digest,
        "n": len(probes),
        "size": [h, w],
        "classes": list(probes.class_names),
        "groups": list(probes.group_names) if probes.groups is not None else None,
        "has_masks": probes.masks is not None,
        "has_groups": probes.groups is not None,
        "has_pairs": probes.pairs is not None,
    }


# --------------------------------------------------------------------------- judging
def decide(raw: Mapping[str, Any], gate: Mapping[str, Any]) -> tuple[str, list[Check]]:
    """The verdict and its checks from plain evidence numbers (see the module docstring).

    Args:
        raw: the ``evidence`` block of a report: ``behaviour`` (``n``, ``correct``,
            ``label_counts`` and ``predicted_counts`` per class, ``chance``, counts per
            group, flipped pairs), ``methods`` (per-probe deletion AUCs, random AUCs, outside
            shares and areas, sanity similarity), ``clusters``.
        gate: the gate thresholds (``conf/gate/default.yaml``).

    Returns:
        ``(verdict, checks)``.
    """
    conf = float(gate["confidence"])
    pct = round(100 * conf)
    checks: list[Check] = []
    beh = raw.get("behaviour", {})
    methods = raw.get("methods", {})

    # -- filters: which methods count as evidence
    usable: list[str] = []
    for m, e in methods.items():
        if "error" in e:
            checks.append(Check(f"faithfulness/{m}", "faithfulness", None,
                                f"{m} is not used as evidence: it failed ({e['error']})", {"used": False}))  # fmt: skip
            continue
        ok = True
        adv = _paired_advantage(e.get("random_deletion_auc"), e.get("deletion_auc"), conf)
        need = float(gate["faithfulness"]["min_advantage"])
        if adv is None:
            ok = False
            checks.append(Check(f"faithfulness/{m}", "faithfulness", None,
                                f"{m} is not used as evidence: no random-ordering reference to judge its deletion curve against"))  # fmt: skip
        else:
            mean_m, mean_r, (a, lo, hi) = adv
            nums = {"deletion_auc": mean_m, "random_deletion_auc": mean_r, "advantage": a, "low": lo, "high": hi, "min_advantage": need}
            if lo > need:
                checks.append(Check(f"faithfulness/{m}", "faithfulness", None,
                                    f"{m} is faithful: deletion AUC {mean_m:.3f} vs {mean_r:.3f} for a random ordering "
                                    f"(advantage {a:.3f}, {pct}% CI {lo:.3f} to {hi:.3f}, above the required {need:.3f})", nums))  # fmt: skip
            else:
                ok = False
                checks.append(Check(f"faithfulness/{m}", "faithfulness", None,
                                    f"{m} is not used as evidence: its deletion AUC {mean_m:.3f} is not clearly below a random "
                                    f"ordering's {mean_r:.3f} (advantage {a:.3f}, {pct}% CI {lo:.3f} to {hi:.3f}; needs more than {need:.3f})", nums))  # fmt: skip
        sane = _sanity_check(m, e, float(gate["sanity"]["max_similarity"]))
        if sane is not None:
            checks.append(sane)
            ok = ok and bool(sane.numbers.get("used"))
        if ok:
            usable.append(m)

    if methods:
        checks.append(Check("methods", "summary", None,
                            f"methods used as evidence: {', '.join(usable) if usable else 'none'} (of {', '.join(methods)})",
                            {"used": list(usable)}))  # fmt: skip

    # -- attribution: excess relevance outside the masks, per usable method
    attr_verdicts: list[str] = []
    attr_by_group: dict[str, dict[str, tuple[float, float]]] = {}
    a_fail = float(gate["attribution"]["fail"])
    for m in list(methods):
        e = methods[m]
        if "outside_share" not in e or e.get("outside_area") is None:
            continue
        ex = _excess(e["outside_share"], e["outside_area"], conf)
        if ex is None:
            continue
        share, area, (d, lo, hi), n = ex
        if m in usable:  # only evidence-grade methods support a behavioural finding
            attr_by_group[m] = _per_group_outside(e)
        nums = {"outside_share": share, "outside_area": area, "excess": d, "low": lo, "high": hi, "n": n,
                "fail": a_fail, "used": m in usable}  # fmt: skip
        sentence = (
            f"{share:.0%} of {_label(m)} relevance lies outside the object masks, whose area is {area:.0%} "
            f"(excess {d:+.2f} on a -1 to +1 scale, {pct}% CI {lo:+.2f} to {hi:+.2f}, {n} probes)"
        )
        if m in usable:
            # never PASS on attribution alone: relevance on the object does not show that the
            # context is ignored (the snow-wolf shortcut model puts most of its relevance on the
            # animal, yet flips all its predictions with the background)
            v = "FAIL" if lo > a_fail else "INCONCLUSIVE"
            attr_verdicts.append(v)
            checks.append(Check(f"attribution/{m}", "attribution", v, sentence, nums))
        else:
            checks.append(Check(f"attribution/{m}", "attribution", None, sentence + "; not used as evidence", nums))
    if usable and attr_verdicts:
        n_fail = attr_verdicts.count("FAIL")
        attribution = "FAIL" if 2 * n_fail > len(attr_verdicts) else "INCONCLUSIVE"
    else:
        attribution = None

    # -- behaviour: context gaps per class (rule and guarantees: audit.stats)
    behaviour = None
    if beh.get("groups"):
        behaviour, gap_checks = _context_gap_checks(beh, gate, attr_by_group)
        checks.extend(gap_checks)

    # -- counterfactual flips
    flips = None
    pairs = beh.get("pairs")
    if pairs and pairs.get("total"):
        flip_check = _flip_rate_check(pairs, gate)
        if behaviour is None:
            flips = flip_check.verdict
        else:
            flip_check.verdict = None  # behaviour decides; the flips corroborate
        checks.append(flip_check)

    # -- competence: a model no better than always answering one class shows nothing
    competence = _competence(beh, conf)
    if competence is not None:
        checks.append(competence)

    # -- the verdict
    decisive: list[str]
    if behaviour is not None:
        verdict, decisive = behaviour, ["behaviour"]
    elif flips is not None:
        verdict, decisive = flips, ["behaviour"]
    elif attribution is not None:
        verdict, decisive = attribution, ["attribution"]
    else:
        verdict, decisive = "INCONCLUSIVE", []
        if raw.get("clusters"):
            for m, clusters in raw["clusters"].items():
                for c in _cluster_lines(m, clusters):
                    checks.append(Check(f"clusters/{m}", "clusters", None, c))
        reason = (
            "the probe set has only labels (no masks, groups or pairs): the attribution maps are clustered "
            "per class for review, and the gate does not guess"
            if not (beh.get("groups") or beh.get("pairs") or any("outside_share" in e for e in methods.values()))
            else "no usable evidence: no faithful and sane attribution method, and no groups or pairs to measure behaviour"
        )
        checks.insert(0, Check("verdict", "summary", "INCONCLUSIVE", f"INCONCLUSIVE: {reason}", decisive=True))
    if verdict == "PASS" and "behaviour" in decisive and attribution == "FAIL" and gate["attribution"]["veto"]:
        verdict = "INCONCLUSIVE"
        decisive.append("attribution")
        checks.insert(0, Check("veto", "attribution", "INCONCLUSIVE",
                               "INCONCLUSIVE: behaviour passes, but the faithful attribution methods put clearly more relevance "
                               "outside the object masks than their area explains; a human should look at the overlays", decisive=True))  # fmt: skip
    if competence is not None and competence.verdict == "INCONCLUSIVE" and verdict != "FAIL":
        # vetoes a PASS (then it alone decides), and is the first reason of any other
        # INCONCLUSIVE: without it, a constant or guessing model's per-context accuracies
        # look like "no context gap"
        if verdict == "PASS":
            decisive = []
        verdict = "INCONCLUSIVE"
        decisive.append("competence")
        checks.remove(competence)
        checks.insert(0, competence)
        competence.finding = f"INCONCLUSIVE: {competence.finding}"
    for c in checks:
        if c.verdict is not None and c.kind in decisive:
            c.decisive = True
    return verdict, checks


def recheck(report: Mapping[str, Any], gate: Mapping[str, Any] | None = None) -> str:
    """Re-derive a report's verdict from its evidence block (optionally under other thresholds)."""
    if report.get("schema") != SCHEMA or int(report.get("schema_version", -1)) != SCHEMA_VERSION:
        raise ValueError(
            f"not a {SCHEMA} v{SCHEMA_VERSION} report: schema={report.get('schema')!r}, "
            f"version={report.get('schema_version')!r}"
        )
    cfg = check_config(merge_config({"engine": report["config"]["engine"], "gate": gate or report["config"]["gate"]}))
    return decide(report["evidence"], cfg["gate"])[0]


# --------------------------------------------------------------------------- helpers
def _competence(beh: Mapping[str, Any], conf: float) -> Check | None:
    """The ``competence`` check: the model must beat the best constant predictor on these probes.

    Chance is the largest class share of the probes (what always answering the most
    frequent class scores), not ``1 / classes``. INCONCLUSIVE when every probe gets the
    same prediction, or when the accuracy's interval (Wilson, at the gate's confidence)
    does not lie above chance; PASS otherwise. None for evidence without the counts
    (reports written before the check existed, hand-built evidence).
    """
    n, correct = beh.get("n"), beh.get("correct")
    labels, predicted = beh.get("label_counts"), beh.get("predicted_counts")
    if not n or correct is None or not labels or not predicted:
        return None
    n, correct = int(n), int(correct)
    chance = max(int(v) for v in labels.values()) / n
    used = {str(c): int(k) for c, k in predicted.items() if int(k) > 0}
    present = [str(c) for c, k in labels.items() if int(k) > 0]
    low, high = stats.wilson_interval(correct, n, conf)
    pct = round(100 * conf)
    acc = correct / n
    nums = {"accuracy": acc, "low": low, "high": high, "n": n, "correct": correct, "chance": chance,
            "predicted_classes": len(used), "constant": len(used) == 1}  # fmt: skip
    if len(used) == 1:
        (only,) = used
        tail = (
            f"; the probes hold class '{present[0]}' only, so add probes of the other classes"
            if len(present) == 1
            else ""
        )
        return Check("competence", "competence", "INCONCLUSIVE",
                     f"the model predicts '{only}' for every probe ({n} of {n}): its accuracy per context "
                     f"says nothing about what it relies on, and a constant model is never promoted{tail}", nums)  # fmt: skip
    ci = f"{pct}% CI {low:.2f} to {high:.2f}"
    if low > chance:
        return Check("competence", "competence", "PASS",
                     f"accuracy {acc:.2f} ({correct}/{n}, {ci}) is above chance: {chance:.2f}, the share of the "
                     f"largest class, what always answering it would score", nums)  # fmt: skip
    where = "below" if high < chance else "not clearly above"
    return Check("competence", "competence", "INCONCLUSIVE",
                 f"accuracy {acc:.2f} ({correct}/{n}, {ci}) is {where} chance {chance:.2f} (the share "
                 f"of the largest class, what always answering it would score): a model that does not beat a "
                 f"constant guess shows nothing about what it relies on, and is never promoted", nums)  # fmt: skip


def _sanity_check(m: str, e: Mapping[str, Any], limit: float) -> Check | None:
    """The ``sanity/<m>`` check (``numbers["used"]``: whether it lets the method count), or None.

    Judges the original against the fully randomized model, per probe: a constant
    randomized map counts as similarity 0 (changed completely), a constant original map
    leaves the probe out. Per-probe numbers (``sanity_spearman``, ``sanity_spearman_abs``,
    ``sanity_constant``, ``sanity_constant_randomized``) are recomputed here, so a
    rechecked report gives the same verdict; a report with only ``sanity_similarity``
    (written before them) is judged on that number.
    """
    if "sanity_error" in e:
        return Check(f"sanity/{m}", "sanity", None,
                     f"{m} is not used as evidence: its sanity check failed ({e['sanity_error']})", {"used": False})  # fmt: skip
    if e.get("sanity_spearman") is None:
        if "sanity_similarity" not in e:
            return None
        sim = _finite(e["sanity_similarity"])
        nums: dict[str, Any] = {"similarity": sim, "max_similarity": limit, "used": False}
        if sim is None:
            nums.pop("similarity")
            return Check(f"sanity/{m}", "sanity", None,
                         f"{m} is not used as evidence: its sanity similarity is undefined and the report has no "
                         f"per-probe numbers to say why (re-run the audit)", nums)  # fmt: skip
        return _sanity_outcome(m, sim, limit, nums)

    signed, absolute = list(e["sanity_spearman"]), list(e.get("sanity_spearman_abs") or [])
    n = len(signed)
    const = [bool(c) for c in (e.get("sanity_constant") or [False] * n)]
    const_r = [bool(c) for c in (e.get("sanity_constant_randomized") or [False] * n)]
    if len(absolute) != n or len(const) != n or len(const_r) != n:
        return Check(f"sanity/{m}", "sanity", None,
                     f"{m} is not used as evidence: its sanity numbers do not line up ({n} signed, {len(absolute)} "
                     f"absolute, {len(const)} and {len(const_r)} constant flags)", {"used": False})  # fmt: skip
    keep = [i for i in range(n) if not const[i]]
    n_const = n - len(keep)
    n_zero = sum(const_r[i] for i in keep)
    nums = {"probes": n, "constant_original": n_const, "constant_randomized": n_zero,
            "max_similarity": limit, "used": False}  # fmt: skip
    if e.get("sanity_mode") is not None:
        nums["mode"] = str(e["sanity_mode"])
    label = _label(m)
    if not keep:
        return Check(f"sanity/{m}", "sanity", None,
                     f"{m} is not used as evidence: {label} gives a constant map on all {n} sanity probes: it says "
                     f"nothing there, so there is nothing a randomized model could change", nums)  # fmt: skip
    means = []
    for values in (signed, absolute):
        vs = [v for v in (_finite(values[i]) for i in keep) if v is not None]
        means.append(sum(vs) / len(vs) if vs else None)
    sim = _max_defined(*means)
    if math.isnan(sim):
        return Check(f"sanity/{m}", "sanity", None,
                     f"{m} is not used as evidence: its similarity to the randomized model's maps is undefined on "
                     f"every probe", nums)  # fmt: skip
    nums["similarity"] = sim
    notes = ""
    if n_zero:
        notes += (f"; the randomized model's map is constant on {n_zero} of {len(keep)} probes: it changed "
                  f"completely there (similarity 0)")  # fmt: skip
    if n_const:
        notes += (f"; {label} gives a constant map on {n_const} of {n} probes: it says nothing there, "
                  f"and they are left out")  # fmt: skip
    return _sanity_outcome(m, sim, limit, nums, notes)


def _sanity_outcome(m: str, sim: float, limit: float, nums: dict[str, Any], notes: str = "") -> Check:
    """The sanity check of method ``m`` from its (defined) similarity to the randomized model's maps."""
    nums["used"] = sim < limit
    if nums["used"]:
        return Check(f"sanity/{m}", "sanity", None,
                     f"{m} passes the randomization sanity check: similarity {sim:.2f} to the maps of a fully "
                     f"randomized model (must stay below {limit:.2f}){notes}", nums)  # fmt: skip
    return Check(f"sanity/{m}", "sanity", None,
                 f"{m} is not used as evidence: its maps barely change when every layer is randomized "
                 f"(similarity {sim:.2f}, must stay below {limit:.2f}){notes}", nums)  # fmt: skip


def _finite(x: Any) -> float | None:
    """``float(x)``, or None for None, NaN and Inf (a report stores NaN as null)."""
    if x is None or isinstance(x, bool):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def _max_defined(*values: float | None) -> float:
    """The largest of the values that are neither None nor NaN; NaN when none is."""
    defined = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return max(defined) if defined else math.nan


def _label(method: str) -> str:
    return {"gradcam": "Grad-CAM", "lrp": "LRP", "saliency": "saliency"}.get(method, method)


def _fmt(x: float) -> str:
    return "undefined" if x is None or math.isnan(x) else f"{x:.2f}"


def _mean_ci(values: Sequence[float], conf: float) -> tuple[float, float, float, int] | None:
    v = torch.tensor([x for x in values if x is not None and math.isfinite(x)], dtype=torch.float64)
    n = int(v.numel())
    if n == 0:
        return None
    mean = float(v.mean())
    if n < 2:
        return mean, -math.inf, math.inf, n
    half = stats.z_value(conf) * float(v.std(unbiased=True)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def _paired_advantage(rand: Sequence[float] | None, auc: Sequence[float] | None, conf: float):
    if rand is None or auc is None or len(rand) != len(auc):
        return None
    pairs = [(r, a) for r, a in zip(rand, auc, strict=True) if r is not None and a is not None]
    if not pairs:
        return None
    ci = _mean_ci([r - a for r, a in pairs], conf)
    if ci is None:
        return None
    mean_m = sum(a for _, a in pairs) / len(pairs)
    mean_r = sum(r for r, _ in pairs) / len(pairs)
    return mean_m, mean_r, ci[:3]


def _excess(share: Sequence[float], area: Sequence[float], conf: float):
    both = [(s, a) for s, a in zip(share, area, strict=True) if s is not None and a is not None and math.isfinite(s)]
    if not both:
        return None
    ci = _mean_ci([_normalized_excess(s, a) for s, a in both], conf)
    mean_s = sum(s for s, _ in both) / len(both)
    mean_a = sum(a for _, a in both) / len(both)
    return mean_s, mean_a, ci[:3], ci[3]


def _normalized_excess(share: float, area: float) -> float:
    """Outside share against outside area on a [-1, 1] scale: 0 = as the area predicts,
    +1 = every bit of relevance outside the object, -1 = every bit on it.

    A plain difference cannot work when objects are small: with an outside area of
    91%, even a model looking only at the context has an excess of at most 0.09. So
    the difference is divided by the room it has in its direction.
    """
    d = share - area
    room = (1.0 - area) if d >= 0 else area
    return d / room if room > 0 else 0.0


def _per_group_outside(e: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    groups = e.get("groups")
    if not groups:
        return {}
    acc: dict[str, list[tuple[float, float]]] = {}
    for g, s, a in zip(groups, e["outside_share"], e["outside_area"], strict=True):
        if s is not None and a is not None and math.isfinite(s):
            acc.setdefault(g, []).append((s, a))
    return {g: (sum(s for s, _ in v) / len(v), sum(a for _, a in v) / len(v)) for g, v in acc.items()}


def _support(attr_by_group: Mapping[str, Mapping[str, tuple[float, float]]], group: str) -> str:
    parts = []
    for m, per in attr_by_group.items():
        if group in per:
            share, area = per[group]
            parts.append(f"{share:.0%} of {_label(m)} relevance on {group} lies outside the object, whose area is {area:.0%}")
    return ("; " + "; ".join(parts)) if parts else ""


def _cluster_lines(method: str, clusters: Sequence[Mapping[str, Any]]) -> list[str]:
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for c in clusters:
        by_class.setdefault(str(c["class_name"]), []).append(c)
    lines = []
    for cls, cs in by_class.items():
        sizes = ", ".join(str(int(c["size"])) for c in cs)
        lines.append(
            f"{_label(method)} maps of class {cls} fall into {len(cs)} cluster(s) of sizes {sizes}; "
            f"review the cluster means in the report"
        )
    return lines


def _metrics(
    raw: Mapping[str, Any], checks: Sequence[Check], ev: Evidence | None, probes: ProbeSet, rows: Sequence[int]
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
            out["flip_rate/low"], out["flip_rate/high"] = float(c.numbers["low"]), float(c.numbers["high"])
        elif c.name.startswith("faithfulness/") and "advantage" in c.numbers:
            out[f"{c.name.split('/', 1)[1]}/deletion_advantage"] = float(c.numbers["advantage"])
        elif c.name.startswith("sanity/") and "similarity" in c.numbers:
            out[f"{c.name.split('/', 1)[1]}/sanity_similarity"] = float(c.numbers["similarity"])
        elif c.name.startswith("attribution/"):
            out[f"{c.name.split('/', 1)[1]}/outside_excess"] = float(c.numbers["excess"])
    gaps = [v for k, v in out.items() if k.startswith("context_gap/") and k.count("/") == 1]
    if gaps:
        out["context_gap"] = max(gaps)
    used = {m for c in checks if c.name == "methods" for m in c.numbers["used"]}
    for m in raw.get("methods", {}):
        out[f"{m}/used"] = 1.0 if m in used else 0.0
    return {k: float(v) for k, v in out.items()}
