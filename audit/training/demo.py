"""``make demo``: the whole loop on embedded defaults (synthetic data, a local SQLite MLflow store).

1. Generates the snow-vs-wolf benchmark and trains two models with the real Hydra
   config (``conf/train.yaml``) and the audit callbacks attached: a shortcut model at
   background correlation 0.99 and a clean one at 0.5.
2. Registers both as versions of ``snow-wolf`` in the local MLflow registry (the safe
   state-dict layout of :func:`audit.gate.loading.log_model_safely`).
3. Audits both with the audit job's config (``conf/audit.yaml``, composed by Hydra):
   reports, an MLflow run per audit, version tags, and the ``champion`` alias moved
   only on PASS.
4. Prints a table of verdicts and reasons, and how to look at it all in ``mlflow ui``.

Exit code 0 when the shortcut model FAILs and the clean one PASSes and is promoted.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from audit.gate.tracking import tracking_uri
from audit.training.train import TrainResult, format_accuracies, train

__all__ = ["compose_train", "compose_audit", "benchmark_proof", "main"]

SHORTCUT_RHO = 0.99
CLEAN_RHO = 0.5
REGISTERED_NAME = "snow-wolf"


def compose_train(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/train.yaml`` (shipped as ``audit.conf``) with command-line style overrides."""
    with initialize_config_module("audit.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def compose_audit(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/audit.yaml`` (the ``model-audit`` job) with command-line style overrides."""
    with initialize_config_module("audit.conf", version_base="1.3"):
        return compose("audit", overrides=list(overrides))


def benchmark_proof(overrides: Sequence[str] = ()) -> dict[float, tuple[TrainResult, float]]:
    """Train at correlations 0.99 and 0.5; returns ``{rho: (result, seconds)}``."""
    out = {}
    for rho in (SHORTCUT_RHO, CLEAN_RHO):
        cfg = compose_train([f"data.correlation={rho}", *overrides])
        t0 = time.perf_counter()
        result = train(cfg)
        out[rho] = (result, time.perf_counter() - t0)
    return out


def _quiet() -> None:
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="mlflow")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # ... except the audit callbacks' own lines (each pass, budget notes), which Lightning's
    # rank-zero logger carries: the demo shows the training-time audits as they happen
    ours = (
        "AttributionCallback",
        "SpuriousFeatureCallback",
        "ActivationMaximizationCallback",
        "model-audit",
    )
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    rank_zero.setLevel(logging.INFO)
    rank_zero.addFilter(lambda r: r.levelno >= logging.ERROR or r.getMessage().startswith(ours))


def main(argv: Sequence[str] | None = None) -> int:
    """Train, register and audit the two demo models; print the verdicts."""
    from audit.gate.job import audit_from_config
    from audit.gate.loading import log_model_safely

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    train_overrides = list(sys.argv[1:] if argv is None else argv)
    _quiet()
    uri = tracking_uri()
    t_start = time.perf_counter()
    print(f"model-audit demo: MLflow store {uri}\n")
    rows = []
    for rho, role in ((SHORTCUT_RHO, "shortcut"), (CLEAN_RHO, "clean")):
        print(
            f"== training the {role} model (background correlation rho={rho}) with the audit callbacks ..."
        )
        cfg = compose_train(
            [
                f"data.correlation={rho}",
                "callbacks=default",
                "trainer.enable_progress_bar=false",
                f"name=snow-wolf-{role}-rho{rho}",
                *train_overrides,
            ]
        )
        t0 = time.perf_counter()
        result = train(cfg)
        trained = time.perf_counter() - t0
        print(format_accuracies(f"trained in {trained:.0f} s (MLflow run {result.run_id})", result))
        model_uri, version = log_model_safely(
            result.module.net,
            OmegaConf.to_container(cfg.net, resolve=True),
            registered_name=REGISTERED_NAME,
            run_id=result.run_id,
            tracking_uri=uri,
        )
        print(f"registered {model_uri}\n== auditing {model_uri} ...")
        t0 = time.perf_counter()
        outcome = audit_from_config(compose_audit([f"model.uri={model_uri}"]))
        audited = time.perf_counter() - t0
        if outcome.error:
            print(f"model-audit: error: {outcome.error}")
        rows.append((role, rho, version, outcome, trained, audited))
        print()

    print("== summary")
    print(
        f"{'model':<18} {'role':<9} {'rho':>5}  {'verdict':<13} {'train':>6} {'audit':>6}  registry"
    )
    for role, rho, version, o, trained, audited in rows:
        print(
            f"{REGISTERED_NAME + ' v' + str(version):<18} {role:<9} {rho:>5}  {o.verdict or 'ERROR':<13} "
            f"{trained:>5.0f}s {audited:>5.0f}s  {o.gate or o.error}"
        )
        for r in o.reasons[:3]:
            print(f"    - {r}")
    shortcut, clean = rows[0][3], rows[1][3]
    ok = shortcut.verdict == "FAIL" and clean.verdict == "PASS" and "moved" in clean.gate
    print(
        f"\n{'OK' if ok else 'MISS'}: the shortcut model {'is' if shortcut.verdict == 'FAIL' else 'is NOT'} blocked "
        f"(FAIL) and the clean one {'is' if clean.verdict == 'PASS' else 'is NOT'} promoted (PASS)"
    )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(
        "\nReports: "
        + ", ".join(str(Path(r[3].report_dir) / "report.html") for r in rows if r[3].report_dir)
    )
    print(
        f"Look at the runs, the training-time evidence and the registry in the MLflow UI:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
