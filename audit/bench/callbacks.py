"""Overhead of the audit callbacks on the benchmark's training run (target: at most +10 %).

The run: ``compose_train(["data.correlation=0.99", "trainer.enable_progress_bar=false",
"logger=none"])`` (SmallCNN, 4000 images of 64x64, 8 epochs), trained without
callbacks and with ``callbacks=default`` (attribution on 64 probes with Grad-CAM,
input x gradient and LRP, deletion and LeRF curves with 16 steps and relevance mass;
the spurious-feature series; activation maximization), alternately, in one process.
By default the callbacks spend a budget (``max_overhead: 0.1``): they audit the first
epoch and the final weights, and between them as often as 10% of the training time
allows. The callbacks log to their own run in a temporary SQLite MLflow store,
created before the timing starts. Wall times include everything
``audit.train.train`` does (data generation, fit, the final evaluation); the ratio is
with / without, the median of the rounds. The table also lists each callback's passes
and the epochs they audited.

``python -m audit.bench.callbacks [--rounds R] [override ...]``, e.g.
``python -m audit.bench.callbacks net=resnet18_small`` or
``python -m audit.bench.callbacks callbacks.attribution.every_n_epochs=1`` (a fixed cadence).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence

import torch

TARGET_RATIO = 1.10
BASE = ["data.correlation=0.99", "trainer.enable_progress_bar=false", "logger=none"]

__all__ = ["main", "run"]


def _fit(overrides: Sequence[str]) -> tuple[float, dict[str, list[float]]]:
    from audit.demo import compose_train
    from audit.train import instantiate_callbacks, train

    cfg = compose_train(list(overrides))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    cfg.callbacks = None  # instantiated here, to read their pass times afterwards
    t0 = time.perf_counter()
    train(cfg, callbacks=callbacks)
    seconds = time.perf_counter() - t0
    return seconds, {
        type(c).__name__: (list(getattr(c, "pass_seconds", [])), list(getattr(c, "pass_steps", [])))
        for c in callbacks
    }


def run(rounds: int = 1, extra: Sequence[str] = ()) -> dict[str, object]:
    """Alternate runs without and with the callbacks; returns the times and the median ratio."""
    without, with_, ratios, passes = [], [], [], {}
    for r in range(rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        times = {}
        for on in order:
            # overrides of the callbacks group apply to the run with callbacks only
            common = [o for o in extra if not o.startswith("callbacks")]
            mine = [o for o in extra if o.startswith("callbacks")]
            overrides = [*BASE, *common, *(["callbacks=default", *mine] if on else [])]
            seconds, per = _fit(overrides)
            times[on] = seconds
            if on:
                for k, (secs, steps) in per.items():
                    passes.setdefault(k, []).append((secs, steps))
            print(f"  round {r + 1}: {'with   ' if on else 'without'} callbacks {seconds:7.1f} s", flush=True)
        without.append(times[False])
        with_.append(times[True])
        ratios.append(times[True] / times[False])
    return {"without": without, "with": with_, "ratio": statistics.median(ratios), "passes": passes}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m audit.bench.callbacks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="with/without pairs (default 1, ~3 min each)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra Hydra overrides, e.g. trainer.max_epochs=2 (callbacks.* ones: the run with callbacks only)",
    )
    args = parser.parse_args([] if argv is None else list(argv))
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-callbacks-") as tmp:
        old = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        try:
            from audit.tracking import client

            client().search_experiments()  # create the store first: not a cost of the callbacks
            print(f"threads: {torch.get_num_threads()}; training: {' '.join(BASE + args.overrides)}")
            res = run(args.rounds, args.overrides)
        finally:
            if old is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old
    print(f"{'callback':<34} {'passes':>6} {'mean s':>8} {'total s':>8}  epochs audited, per round (training thread)")
    for name, rounds in res["passes"].items():
        secs = [s for r, _ in rounds for s in r]
        if secs:
            steps = " | ".join(",".join(str(s) for s in st) for _, st in rounds)
            print(f"{name:<34} {len(secs):6d} {statistics.mean(secs):8.2f} {sum(secs):8.1f}  {steps}")
    med_without, med_with = statistics.median(res["without"]), statistics.median(res["with"])
    status = "PASS" if res["ratio"] <= TARGET_RATIO else "MISS"
    print(f"{'what':<34} {'without':>8} {'with':>8} {'ratio':>7} {'target':>7}  result")
    print(
        f"{'train 8 epochs + callbacks=default':<34} {med_without:8.1f} {med_with:8.1f} "
        f"{res['ratio']:7.3f} {'<= 1.10':>7}  {status}"
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
