"""Metrics that judge attribution maps: faithfulness, localization and sanity.

* :mod:`~audit.metrics.faithfulness`: deletion (MoRF), LeRF and insertion curves, the
  symmetric relevance gain, and the random-ranking reference.
* :mod:`~audit.metrics.localization`: relevance mass, relevance rank and the
  pointing game against object masks.
* :mod:`~audit.metrics.sanity`: the model-randomization test (one fully randomized model, or the layer cascade).

Every metric takes and returns batched tensors, runs the model (when it needs one)
in eval mode, and restores the model's state afterwards.
"""

from audit.metrics.faithfulness import (
    BASELINES,
    curve_auc,
    curve_set,
    deletion_curve,
    insertion_curve,
    lerf_curve,
    make_baseline,
    random_attribution,
    random_reference,
    relevance_gain,
)
from audit.metrics.localization import pointing_game, relevance_mass, relevance_rank
from audit.metrics.sanity import RandomizationResult, randomization_sanity, spearman

__all__ = [
    "BASELINES",
    "deletion_curve",
    "insertion_curve",
    "lerf_curve",
    "relevance_gain",
    "curve_set",
    "random_reference",
    "random_attribution",
    "make_baseline",
    "curve_auc",
    "relevance_mass",
    "relevance_rank",
    "pointing_game",
    "randomization_sanity",
    "RandomizationResult",
    "spearman",
]
