"""The gate is not about backgrounds: the same engine and thresholds on the stamps benchmark.

There the spurious cue is a small checker or striped stamp beside a disc or a ring,
inside no background at all. The gate must FAIL the model that reads the stamp and
PASS the one that reads the shape, from the same evidence and the default config.
"""

from __future__ import annotations

import pytest

from audit.datasets import stamps
from audit.gate.job import _load_probes
from audit.pipeline import run_audit
from audit.training.demo import compose_audit, compose_train
from audit.training.train import train


def test_the_job_composes_the_stamps_probes():
    cfg = compose_audit(
        ["model.uri=models:/x/1", "probes=stamps", "probes.n_per_group=4", "probes.size=32"]
    )
    probes = _load_probes(cfg.probes)
    assert probes.class_names == stamps.CLASSES and probes.group_names == stamps.GROUPS
    assert probes.masks is not None and probes.pairs is not None and len(probes) == 16


@pytest.mark.slow
def test_gate_fails_the_stamp_reader_and_passes_the_shape_reader():
    probes = stamps.probe_set(n_per_group=256, size=64, seed=2024)
    verdicts = {}
    for rho in (0.99, 0.5):
        cfg = compose_train(
            [
                f"data.correlation={rho}",
                "data=stamps",
                "eval_probes.benchmark=stamps",
                "trainer.max_epochs=3",
                "logger=none",
                "trainer.enable_progress_bar=false",
            ]
        )
        result = run_audit(train(cfg).module.net, probes)
        verdicts[rho] = result
        print(rho, result.verdict, result.findings[:2])
    shortcut, clean = verdicts[0.99], verdicts[0.5]
    assert shortcut.verdict == "FAIL", shortcut.findings
    assert any(f.startswith(("disc|", "ring|")) and "clearly above" in f for f in shortcut.findings)
    assert shortcut.metrics["flip_rate"] > 0.5
    assert clean.verdict == "PASS", clean.findings
    assert clean.metrics["context_gap"] < 0.05
