"""The audit callbacks' budget on short trainings: what the floor costs against ``max_overhead``.

The first and final passes always happen, so a short training cannot keep the budget.
Each row trains the benchmark's SmallCNN in a fresh process with the three callbacks as
docs/callbacks.md sets them (64 probes; Grad-CAM, input x gradient and LRP; actmax on 4 units),
``mlflow.pytorch.autolog(log_models=False)`` around ``fit`` and no logger, so the callbacks
log to autolog's run. It prints the training's own time, what the callbacks took, the
share they logged (``audit/overhead/total``), the share the early line announced after
the first passes, and how many probes the final weights' pass explained.

``python -m audit.bench.budget_floor [EPOCHSxIMAGESxPX ...]`` (default: 2x256x32 3x1024x32 2x2000x64).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "one"]

DEFAULT_ROWS = ("2x256x32", "3x1024x32", "2x2000x64")
_EXPECT = re.compile(r"Expect them to take about (\d+)% of it")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def one(epochs: int, n_train: int, size: int, uri: str) -> dict[str, Any]:
    """Train one short fit with the callbacks under autolog; the numbers of one row."""
    import mlflow
    import pytorch_lightning as pl

    from audit.callbacks import (
        ActivationMaximizationCallback,
        AttributionCallback,
        SpuriousFeatureCallback,
    )
    from audit.datasets import snow_wolf
    from audit.training import Classifier, SnowWolfDataModule

    lines = _Lines()
    lightning_log = logging.getLogger("lightning.pytorch")  # where rank_zero_info logs
    lightning_log.addHandler(lines)
    mlflow.set_tracking_uri(uri)
    mlflow.pytorch.autolog(log_models=False, silent=True)
    try:
        probes = snow_wolf.probe_set(n_per_group=16, size=size, seed=7)
        att = AttributionCallback(probes, module="net")
        callbacks = [
            att,
            SpuriousFeatureCallback(probes, module="net"),
            ActivationMaximizationCallback(module="net", size=size),
        ]
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        pl.seed_everything(0, verbose=False)
        data = SnowWolfDataModule(n_train=n_train, n_val=64, correlation=0.99, size=size)
        trainer.fit(
            Classifier({"_target_": "audit.models.SmallCNN", "num_classes": 2}), datamodule=data
        )
    finally:
        mlflow.pytorch.autolog(disable=True)
        lightning_log.removeHandler(lines)
    metrics = mlflow.last_active_run().data.metrics
    said = [m for line in lines.lines if (m := _EXPECT.search(line))]
    used, share = att.budget_seconds, metrics["audit/overhead/total"]
    return {
        "epochs": epochs,
        "n_train": n_train,
        "size": size,
        "training_s": used / share,
        "callbacks_s": used,
        "share": share,  # the share as logged at the end of fit
        "announced": int(said[0].group(1)) / 100 if said else None,
        "final_count": int(metrics["audit/probes/count"]),
        "probes": len(probes),
        "epochs_audited": sorted({s for cb in callbacks for s in cb.pass_steps}),
    }


def _row(spec: str, workdir: str) -> dict[str, Any]:
    epochs, n_train, size = (int(x) for x in spec.split("x"))
    uri = f"sqlite:///{workdir}/{spec}.db"
    cmd = [sys.executable, "-m", "audit.bench.budget_floor", "--one", spec, uri]
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--one"]:
        epochs, n_train, size = (int(x) for x in args[1].split("x"))
        print(json.dumps(one(epochs, n_train, size, args[2])))
        return 0
    print(
        "| training | its own time | callbacks | audit/overhead/total | said after the first passes | final pass | epochs audited |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="budget-floor-") as workdir:
        for spec in args or DEFAULT_ROWS:
            r = _row(spec, workdir)
            announced = (
                f"about {r['announced']:.0%}" if r["announced"] is not None else "(not said)"
            )
            print(
                f"| {r['epochs']} epochs x {r['n_train']:,} images, {r['size']} px | {r['training_s']:.1f} s "
                f"| {r['callbacks_s']:.1f} s | {r['share']:.0%} | {announced} "
                f"| {r['final_count']} of {r['probes']} probes | {', '.join(map(str, r['epochs_audited']))} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
