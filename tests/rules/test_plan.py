"""``model-audit plan``: the sizes it prints reach their verdict's probability under the gate's rule.

The sizes come from audit.engine.stats (simulation through ``decide_counts`` for the context gap, the
binomial law for the flip rate); they are checked here against the independent simulator of the
Monte Carlo error-rate study (tests/rules/test_decision_rule_mc.py), and, slow, against the demo's clean
model audited on a probe set of the planned size.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import test_decision_rule_mc as mc

from audit.engine import stats
from audit.gate.plan import Design, format_plan, plan, rate_probability

GATE = {
    "confidence": 0.95,
    "context_gap": {"fail": 0.15, "pass": 0.05},
    "flip_rate": {"fail": 0.15, "pass": 0.05},
}
POWER = 0.9


@pytest.fixture(scope="module")
def default_plan():
    return plan(Design(), GATE)


def _probability(
    accuracies: list[list[float]], n: int, paired: bool, code: int, seed: int
) -> float:
    counts, flags, classes = mc.simulate(np.random.default_rng(seed), accuracies, n, paired)
    res = stats.decide_counts(counts, flags, classes, 0.15, 0.05, 0.95)
    return float((res.verdict == code).mean())


@pytest.mark.parametrize("paired", [False, True], ids=["unpaired", "pairs"])
def test_a_clean_model_passes_at_the_planned_size_and_not_well_below_it(default_plan, paired):
    n = default_plan.paired_pass if paired else default_plan.unpaired_pass
    clean = [[0.95, 0.95]] * 2  # the plan's default design; mc's pairs use its own RHO = 0.5
    se = math.sqrt(POWER * (1 - POWER) / mc.REPS)
    assert _probability(clean, n, paired, stats.PASS, seed=11) >= POWER - 3 * se
    assert _probability(clean, int(0.7 * n), paired, stats.PASS, seed=12) < POWER


@pytest.mark.parametrize("paired", [False, True], ids=["unpaired", "pairs"])
def test_a_shortcut_fails_at_the_planned_size_and_not_well_below_it(default_plan, paired):
    n = default_plan.paired_fail if paired else default_plan.unpaired_fail
    shortcut = [[0.95, 0.65], [0.95, 0.95]]  # one class 0.3 worse in one context
    se = math.sqrt(POWER * (1 - POWER) / mc.REPS)
    assert _probability(shortcut, n, paired, stats.FAIL, seed=13) >= POWER - 3 * se
    assert _probability(shortcut, int(0.6 * n), paired, stats.FAIL, seed=14) < POWER


def test_the_flip_rate_sizes_hold_under_the_gates_own_per_class_rule(default_plan):
    """decide_rates (what rules.synthesized calls, Holm over the classes) on simulated flips."""
    rng = np.random.default_rng(5)
    d = Design()

    def verdicts(n: int, rates: list[float]) -> list[str]:
        flips = rng.binomial(n, rates, size=(1000, len(rates)))
        return [
            stats.decide_rates(list(f), [n] * len(rates), 0.15, 0.05, 0.95).verdict for f in flips
        ]

    clean = [d.clean_flip_rate] * 2
    assert np.mean([v == "PASS" for v in verdicts(default_plan.masks_pass, clean)]) >= POWER - 0.03
    assert (
        np.mean([v == "PASS" for v in verdicts(int(0.7 * default_plan.masks_pass), clean)]) < POWER
    )
    shortcut = [d.clean_flip_rate + d.gap, d.clean_flip_rate]
    assert (
        np.mean([v == "FAIL" for v in verdicts(default_plan.masks_fail, shortcut)]) >= POWER - 0.03
    )
    # the exact probability it was planned from reaches the power at the size and not one below
    assert rate_probability(default_plan.masks_pass, d, GATE, "PASS") >= POWER
    assert rate_probability(default_plan.masks_pass - 1, d, GATE, "PASS") < POWER


def test_the_plan_agrees_with_the_documented_power_table(default_plan):
    """docs/gate.md's table (python -m audit.engine.stats power, 20,000 replicates, 2 classes x 2 contexts):
    70 probes per group unpaired, 49 pairs at correlation 0.5, for 90%; simulation good to about +-2."""
    assert abs(default_plan.unpaired_pass - 70) <= 3
    assert abs(default_plan.paired_pass - 49) <= 3


def test_stricter_gates_and_more_comparisons_need_more_probes(default_plan):
    strict = plan(Design(), {**GATE, "confidence": 0.99})
    wide = plan(Design(classes=10, contexts=3), GATE)
    for name in (
        "unpaired_pass",
        "unpaired_fail",
        "paired_pass",
        "paired_fail",
        "masks_pass",
        "masks_fail",
    ):
        assert getattr(strict, name) > getattr(default_plan, name), name
    assert (
        wide.unpaired_pass > default_plan.unpaired_pass
        and wide.paired_fail > default_plan.paired_fail
    )
    assert (
        default_plan.tcav == 32
    )  # engine.tcav.examples=30 on 2 classes x 2 contexts: 15 + 2 * 8 + 1


def test_the_printed_plan_names_every_design_and_its_assumptions(default_plan):
    text = format_plan(default_plan)
    assert f"{default_plan.paired_pass} pairs per class" in text
    assert f"{default_plan.unpaired_fail} probes per group" in text
    assert f"{default_plan.masks_pass} objects per class" in text
    assert (
        "at least 32 probes per group" in text
        and "accuracy 0.95" in text
        and "0.3 less accurate" in text
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "audit", "plan", *args], capture_output=True, text=True, timeout=300
    )


def test_the_command_uses_the_gate_config_and_refuses_bad_input_in_one_line():
    out = _cli("--reps", "1000", "gate.confidence=0.99")
    assert out.returncode == 0, out.stderr
    assert "gate.confidence=0.99" in out.stdout and "pairs per class" in out.stdout
    for args, words in (
        (["--contexts", "1"], "contexts must be an integer in [2, 20]"),
        (["gate.confidence=1.5"], "gate.confidence"),
        (["gate.nosuch=1"], "gate.nosuch"),
    ):
        bad = _cli("--reps", "1000", *args)
        assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, bad.stderr)


@pytest.mark.slow
def test_a_probe_set_sized_by_the_plan_passes_the_demos_clean_model(tracking_uri):
    """The demo's clean model (trained at correlation 0.5) PASSes on snow-wolf probes with the
    planned number of pairs per class, with the default engine and gate."""
    from audit import run_audit
    from audit.datasets import snow_wolf
    from audit.training.demo import CLEAN_RHO, compose_train
    from audit.training.train import train

    result = train(
        compose_train([f"data.correlation={CLEAN_RHO}", "trainer.enable_progress_bar=false"])
    )
    n = plan(Design(), GATE).paired_pass
    probes = snow_wolf.probe_set(n_per_group=n, seed=3)
    audit = run_audit(result.module.net.eval(), probes)
    assert audit.verdict == "PASS", audit.findings
