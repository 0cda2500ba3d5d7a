"""``model-audit plan``: how many probes a verdict needs, before anyone collects them.

For the gate's thresholds and confidence (``conf/audit.yaml`` composed with the same
overrides the audit would get, e.g. ``gate.confidence=0.99``) and a design (classes,
contexts per class), it gives the size of each kind of probe set that makes a verdict
likely (with probability ``power``):

* **groups, unpaired**: probes per group ``<class>|<context>``;
* **groups with pairs**: pairs per class (the same object in each of its contexts);
* **masks only**: objects per class, judged by the synthesized counterfactuals' flip rate;
* **TCAV**: the probes per group its concepts need (corroboration; never decides).

What each column assumes:

* *PASS a clean model*: every context at accuracy ``accuracy``; with pairs, an object is
  right or wrong in both contexts with correlation ``rho`` (:func:`audit.engine.stats.simulate_class`);
  masks only, the flip rate such a model shows by chance, ``2 A (1 - A) (1 - rho)``.
* *FAIL a shortcut*: one class whose worst context is ``gap`` below its best, every
  other class clean (masks only: that class flips ``gap`` more often than a clean one).

Every size is the smallest one whose probability of the verdict reaches ``power`` under
the gate's own rule: the context gap by simulation through :func:`audit.engine.stats.decide_counts`
(``reps`` replicates, fixed seed: common random numbers across sizes), the flip rate exactly
from the binomial law through :func:`audit.engine.stats.decide_rate` (for FAIL at Holm's first
level, ``alpha / classes``, so the FAIL size is an upper bound). The INCONCLUSIVE line of
an audit states the same kind of number for the probes it actually had
(:func:`audit.engine.stats.describe_probes_needed`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

from audit.engine import stats
from audit.errors import AuditError, first_line, report

__all__ = ["Design", "Plan", "PlanError", "plan", "format_plan", "main"]

#: Largest size searched: a design that needs more has thresholds no probe set can meet.
MAX_SIZE = 100_000


class PlanError(AuditError, ValueError):
    """A design or an override the plan cannot use: the message names the value and its range."""


@dataclass(frozen=True)
class Design:
    """The probe set being planned and the models it should tell apart.

    Attributes:
        classes: classes of the probe set.
        contexts: contexts per class (groups ``<class>|<context>``).
        accuracy: a clean model's accuracy in every context.
        gap: the context gap of the shortcut to FAIL (best context minus worst, one class).
        rho: correlation of an object's right/wrong outcome across its contexts (pairs).
        power: the wanted probability of the verdict.
        reps: simulated replicates per size (the context gap).
        seed: seed of the simulation.
    """

    classes: int = 2
    contexts: int = 2
    accuracy: float = 0.95
    gap: float = 0.3
    rho: float = 0.5
    power: float = 0.9
    reps: int = 4000
    seed: int = 0

    def check(self) -> None:
        """Raise :class:`PlanError` (a ValueError) naming the first value out of range."""
        for name, value, low, high in (
            ("classes", self.classes, 2, 1000),
            ("contexts", self.contexts, 2, 20),
            ("reps", self.reps, 100, 1_000_000),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise PlanError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")
        for name, value in (("accuracy", self.accuracy), ("power", self.power)):
            if not 0.5 < value < 1.0:
                raise PlanError(f"{name} must lie strictly between 0.5 and 1; got {value!r}")
        if not 0.0 < self.gap <= self.accuracy:
            raise PlanError(f"gap must lie in (0, accuracy={self.accuracy}]; got {self.gap!r}")
        if not 0.0 <= self.rho <= 1.0:
            raise PlanError(f"rho must lie in [0, 1]; got {self.rho!r}")

    @property
    def clean_flip_rate(self) -> float:
        """The flip rate of a clean model between two contexts: discordant outcomes by chance."""
        return 2.0 * self.accuracy * (1.0 - self.accuracy) * (1.0 - self.rho)


@dataclass(frozen=True)
class Plan:
    """Sizes per design; ``*_pass`` for a clean model's PASS, ``*_fail`` for the shortcut's FAIL.

    Attributes:
        unpaired_pass, unpaired_fail: probes per group.
        paired_pass, paired_fail: pairs per class.
        masks_pass, masks_fail: objects per class (synthesized counterfactuals).
        tcav: probes per group TCAV needs (``engine.tcav.examples``).
        gate: the thresholds used (``confidence``, ``context_gap``, ``flip_rate``).
        design: the design.
    """

    unpaired_pass: int
    unpaired_fail: int
    paired_pass: int
    paired_fail: int
    masks_pass: int
    masks_fail: int
    tcav: int
    gate: Mapping[str, Any]
    design: Design


def _smallest(probability: Callable[[int], float], target: float, what: str) -> int:
    """Smallest size ``n >= 2`` with ``probability(n) >= target`` (doubling, then bisection)."""
    hi = 2
    while probability(hi) < target:
        hi *= 2
        if hi > MAX_SIZE:
            raise PlanError(
                f"no {what} up to {MAX_SIZE} reaches the wanted probability; check the thresholds"
            )
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probability(mid) >= target:
            hi = mid
        else:
            lo = mid
    return max(hi, 2)


def gap_probability(
    n: int, design: Design, gate: Mapping[str, Any], paired: bool, verdict: str
) -> float:
    """P(``verdict``) of the context-gap rule with ``n`` probes per group (or ``n`` pairs per
    class), for a clean model (``verdict="PASS"``) or the shortcut (``"FAIL"``), by simulation."""
    rng = np.random.default_rng(design.seed)
    rho = design.rho if paired else None
    clean = [design.accuracy] * design.contexts
    shortcut = [design.accuracy, design.accuracy - design.gap] + clean[2:]
    counts, flags, classes = [], [], []
    for k in range(design.classes):
        accuracies = shortcut if verdict == "FAIL" and k == 0 else clean
        c, p = stats.simulate_class(rng, accuracies, n, design.reps, rho)
        counts.append(c)
        flags.append(p)
        classes.append(np.full(p.shape, k))
    gap = gate["context_gap"]
    res = stats.decide_counts(
        np.concatenate(counts, axis=1),
        np.concatenate(flags),
        np.concatenate(classes),
        float(gap["fail"]),
        float(gap["pass"]),
        float(gate["confidence"]),
    )
    return float((res.verdict == stats.CODES.index(verdict)).mean())


def rate_probability(n: int, design: Design, gate: Mapping[str, Any], verdict: str) -> float:
    """P(``verdict``) of the flip-rate rule with ``n`` objects per class, exactly (binomial law)."""
    flip = gate["flip_rate"]
    conf = float(gate["confidence"])
    k = np.arange(n + 1)
    if verdict == "PASS":  # every class's upper bound below flip_rate.fail (intersection-union)
        v, _, _ = stats.decide_rate(
            k, np.full_like(k, n), float(flip["fail"]), float(flip["pass"]), conf
        )
        one = float(binom.pmf(k, n, design.clean_flip_rate)[v == stats.CODES.index("PASS")].sum())
        return one**design.classes
    # the shortcut class shown at Holm's first level alpha / classes (later levels only add FAILs)
    alpha = 1.0 - conf
    v, _, _ = stats.decide_rate(
        k,
        np.full_like(k, n),
        float(flip["fail"]),
        float(flip["pass"]),
        1.0 - alpha / design.classes,
    )
    rate = min(1.0, design.clean_flip_rate + design.gap)
    return float(binom.pmf(k, n, rate)[v == stats.CODES.index("FAIL")].sum())


def plan(design: Design, gate: Mapping[str, Any], tcav_examples: int = 30) -> Plan:
    """The sizes of :class:`Plan` for ``design`` under the thresholds of ``gate`` (the ``gate``
    mapping of the audit config: ``confidence``, ``context_gap``, ``flip_rate``)."""
    from audit.evidence.concepts import group_minimum

    design.check()
    target = design.power

    def gap_size(paired: bool, verdict: str) -> int:
        unit = "pairs per class" if paired else "probes per group"
        return _smallest(lambda n: gap_probability(n, design, gate, paired, verdict), target, unit)

    def rate_size(verdict: str) -> int:
        return _smallest(
            lambda n: rate_probability(n, design, gate, verdict), target, "objects per class"
        )

    return Plan(
        unpaired_pass=gap_size(False, "PASS"),
        unpaired_fail=gap_size(False, "FAIL"),
        paired_pass=gap_size(True, "PASS"),
        paired_fail=gap_size(True, "FAIL"),
        masks_pass=rate_size("PASS"),
        masks_fail=rate_size("FAIL"),
        tcav=group_minimum(tcav_examples, design.classes, design.classes, design.contexts),
        gate=gate,
        design=design,
    )


def format_plan(p: Plan, tcav_examples: int = 30) -> str:
    """The plan as the command prints it: the assumptions, then one line per design."""
    d, g = p.design, p.gate
    groups = d.classes * d.contexts
    pct = round(100 * d.power)
    head = (
        f"Probes a verdict needs (gate.confidence={g['confidence']}, context_gap pass {g['context_gap']['pass']} / "
        f"fail {g['context_gap']['fail']}, flip_rate pass {g['flip_rate']['pass']} / fail {g['flip_rate']['fail']}), "
        f"for {d.classes} classes x {d.contexts} contexts, with {pct}% probability:\n"
        f"  PASS: a clean model, accuracy {d.accuracy} in every context (pairs: correlation {d.rho} across "
        f"contexts; masks only: flip rate {d.clean_flip_rate:.3f})\n"
        f"  FAIL: one class {d.gap} less accurate in one context (masks only: flip rate "
        f"{min(1.0, d.clean_flip_rate + d.gap):.3f})\n"
    )
    rows = [
        (
            "groups, unpaired",
            f"{p.unpaired_pass} probes per group ({p.unpaired_pass * groups} in all)",
            f"{p.unpaired_fail} probes per group ({p.unpaired_fail * groups} in all)",
        ),
        (
            "groups with pairs",
            f"{p.paired_pass} pairs per class ({p.paired_pass * groups} probes)",
            f"{p.paired_fail} pairs per class ({p.paired_fail * groups} probes)",
        ),
        (
            "masks only (synthesized)",
            f"{p.masks_pass} objects per class ({p.masks_pass * d.classes} probes)",
            f"{p.masks_fail} objects per class ({p.masks_fail * d.classes} probes)",
        ),
    ]
    width = max(len(r[1]) for r in rows)
    lines = [f"  {'':<26}{'PASS a clean model':<{width + 3}}FAIL the shortcut"]
    lines += [f"  {name:<26}{a:<{width + 3}}{b}" for name, a, b in rows]
    lines.append(
        f"  {'TCAV (corroborates)':<26}at least {p.tcav} probes per group (engine.tcav.examples={tcav_examples})"
    )
    tail = (
        "Sizes are the smallest whose simulated (context gap) or exact (flip rate) probability of the verdict "
        "under the gate's rule reaches the target; larger is safer. Pairs beat unpaired groups: the same "
        "object in each context. See docs/probes.md."
    )
    return head + "\n".join(lines) + "\n" + tail


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="model-audit plan",
        description="How many probes a PASS or a FAIL needs at the gate's thresholds, before you collect them.",
    )
    d = Design()
    p.add_argument(
        "--classes",
        type=int,
        default=d.classes,
        help=f"classes of the probe set (default {d.classes})",
    )
    p.add_argument(
        "--contexts",
        type=int,
        default=d.contexts,
        help=f"contexts per class (default {d.contexts})",
    )
    p.add_argument(
        "--accuracy",
        type=float,
        default=d.accuracy,
        help=f"a clean model's accuracy (default {d.accuracy})",
    )
    p.add_argument(
        "--gap",
        type=float,
        default=d.gap,
        help=f"the shortcut's context gap to FAIL (default {d.gap})",
    )
    p.add_argument(
        "--rho",
        type=float,
        default=d.rho,
        help=f"correlation across an object's contexts (default {d.rho})",
    )
    p.add_argument(
        "--power",
        type=float,
        default=d.power,
        help=f"wanted probability of the verdict (default {d.power})",
    )
    p.add_argument(
        "--reps", type=int, default=d.reps, help=f"simulated replicates per size (default {d.reps})"
    )
    p.add_argument(
        "overrides", nargs="*", help="overrides of the audit config, e.g. gate.confidence=0.99"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan; 0, or 2 with one line for bad options or overrides."""
    try:
        args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # argparse printed its usage or help
        return 0 if exit_.code in (0, None) else 2
    design = Design(
        args.classes, args.contexts, args.accuracy, args.gap, args.rho, args.power, args.reps
    )
    try:
        cfg = _compose(args.overrides)
        examples = int(cfg["engine"]["tcav"]["examples"])
        print(format_plan(plan(design, cfg["gate"], examples), examples), flush=True)
    except AuditError as err:
        return report("model-audit plan", err)
    return 0


def _compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The audit config with ``overrides``, its gate thresholds checked as the audit checks them."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from audit.config import check_config, merge_config

    try:
        with initialize_config_module(config_module="audit.conf", version_base="1.3"):
            cfg = OmegaConf.to_container(compose("audit", overrides=list(overrides)), resolve=True)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors: their first line
        raise PlanError(first_line(err) or type(err).__name__) from None
    return check_config(
        merge_config({"engine": cfg["engine"], "gate": cfg["gate"]})
    )  # AuditConfigError: main
