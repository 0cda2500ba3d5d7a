"""The benchmark does its job: a model trained at rho=0.99 leans on the background, one at 0.5 does not.

Slow (two full trainings, about a minute each on 2 cores): `make test-slow`.
The same training runs in `make demo`, which prints the table.
"""

from __future__ import annotations

import pytest

from audit.training.demo import CLEAN_RHO, SHORTCUT_RHO, benchmark_proof


@pytest.mark.slow
def test_shortcut_model_leans_on_background_and_clean_model_does_not(tracking_uri):
    results = benchmark_proof(["trainer.enable_progress_bar=false"])
    shortcut, _ = results[SHORTCUT_RHO]
    clean, _ = results[CLEAN_RHO]
    # rho = 0.99: for some class, one background is >= 30 points worse than the other
    assert shortcut.max_gap >= 0.30, shortcut.accuracies
    # rho = 0.5: every class within 10 points across backgrounds, mean accuracy >= 90%
    assert clean.max_gap <= 0.10, clean.accuracies
    assert clean.mean_accuracy >= 0.90, clean.accuracies
