"""A modern net on the benchmark: train on snow-wolf with the audit callbacks, then audit it.

``python -m audit.bench.modern NET RHO EPOCHS [override ...]``, e.g.
``python -m audit.bench.modern small_vit 0.99 30``: trains ``net=NET`` at background
correlation ``RHO`` for ``EPOCHS`` epochs (seed 0, ``data.seed=0``) with
``callbacks=default`` and an MLflow logger (store: ``$MLFLOW_TRACKING_URI``, default
``sqlite:///<out>/mlflow.db``), registers the net and loads it back through the audit
job's loader (registry layout, default allow-list), measures the ground truth on
2,000 images per group (as ``audit.training.validate``), audits it with the default gate on 256
probes per group, and writes every per-method number to
``<out>/results/<tag>.json``, where ``<out>`` is ``$MODERN_OUT`` (default ``./modern``).
The table in docs/validation.md of the small ViT and ConvNeXt comes from these runs. ``SMOKE=1``
shrinks the truth and probe sets to a smoke test.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

OUT = Path(os.environ.get("MODERN_OUT", "modern")).resolve()
OUT.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{OUT}/mlflow.db")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
warnings.filterwarnings("ignore")
for name in ("pytorch_lightning", "lightning.pytorch", "lightning", "mlflow"):
    logging.getLogger(name).setLevel(logging.ERROR)

from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from audit.datasets import snow_wolf  # noqa: E402
from audit.evidence.behaviour import context_gaps, group_accuracy, predict  # noqa: E402
from audit.gate.loading import load_model, log_model_safely  # noqa: E402
from audit.pipeline import run_audit  # noqa: E402
from audit.training.demo import compose_train  # noqa: E402
from audit.training.train import format_accuracies, train  # noqa: E402
from audit.training.validate import TRUTH_PER_GROUP, TRUTH_SEED, truth_of  # noqa: E402

# activation maximization needs a layer the net has (the config's default is SmallCNN's)
ACTMAX = {
    "small_vit": ["callbacks.actmax.layer=logits", "callbacks.actmax.units=[0,1]"],
    "small_convnext": ["callbacks.actmax.layer=features.5"],
    "small_cnn": [],
    "resnet18_small": ["callbacks.actmax.layer=layer4"],
}


def main() -> None:
    net_name, rho, epochs, *extra = sys.argv[1:]
    rho, epochs, seed = float(rho), int(epochs), 0
    tag = re.sub(
        r"[^A-Za-z0-9._-]", "_", f"{net_name}-rho{rho}-e{epochs}" + "".join(f"-{e}" for e in extra)
    )
    uri = os.environ["MLFLOW_TRACKING_URI"]
    cfg = compose_train(
        [
            f"net={net_name}",
            f"data.correlation={rho}",
            f"seed={seed}",
            f"data.seed={seed}",
            "callbacks=default",
            *ACTMAX[net_name],
            "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu",
            "trainer.deterministic=true",
            f"trainer.max_epochs={epochs}",
            f"name={tag}",
            *extra,
        ]
    )
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    print(
        format_accuracies(f"{tag}: trained in {train_s:.0f} s (run {result.run_id})", result),
        flush=True,
    )
    net_cfg = OmegaConf.to_container(cfg.net, resolve=True)
    model_uri, version = log_model_safely(
        result.module.net,
        net_cfg,
        registered_name=f"snow-wolf-{net_name}",
        run_id=result.run_id,
        tracking_uri=uri,
    )
    net = load_model(
        {"kind": "mlflow", "uri": model_uri}, tracking_uri=uri
    ).model  # the job's loader
    run = MlflowClient(uri).get_run(result.run_id)
    hist = {
        k: [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(result.run_id, k)]
        for k in run.data.metrics
        if k.endswith("/srg") or k in ("val/acc", "train/acc")
    }

    smoke = bool(os.environ.get("SMOKE"))
    test = snow_wolf.probe_set(
        n_per_group=50 if smoke else TRUTH_PER_GROUP, size=int(cfg.data.size), seed=TRUTH_SEED
    )
    accs = group_accuracy(test, predict(net, test.images, max_batch=512))
    gaps = {c: b.accuracy - w.accuracy for c, (w, b) in context_gaps(accs).items()}
    accuracy = sum(a.correct for a in accs.values()) / sum(a.n for a in accs.values())

    probes = snow_wolf.probe_set(
        n_per_group=4 if smoke else 256, size=int(cfg.data.size), seed=2024
    )
    t0 = time.perf_counter()
    res = run_audit(net, probes, {"engine": {"device": "cpu"}})
    audit_s = time.perf_counter() - t0

    out = {
        "tag": tag,
        "net": net_name,
        "rho": rho,
        "epochs": epochs,
        "extra": extra,
        "run_id": result.run_id,
        "model_uri": model_uri,
        "params": sum(p.numel() for p in net.parameters()),
        "train_s": train_s,
        "audit_s": audit_s,
        "val_acc": run.data.metrics.get("val/acc"),
        "train_acc": run.data.metrics.get("train/acc"),
        "test_acc": accuracy,
        "test_group_acc": {g: a.accuracy for g, a in accs.items()},
        "true_gaps": gaps,
        "truth": truth_of(gaps),
        "verdict": res.verdict,
        "decisive": [c.finding for c in res.checks if c.decisive],
        "findings": res.findings,
        "metrics": res.metrics,
        "checks": [c.to_dict() for c in res.checks],
        "layers": {m: e.get("layer") for m, e in res.raw.get("methods", {}).items()},
        "callback_history": hist,
    }
    (OUT / "results").mkdir(parents=True, exist_ok=True)
    (OUT / "results" / f"{tag}.json").write_text(json.dumps(out, indent=2, default=str))
    print(
        f"{tag}: test acc {accuracy:.3f}, true gaps {gaps} -> {out['truth']}; gate {res.verdict} "
        f"(audit {audit_s:.0f} s)"
    )
    for f in res.findings:
        print("  -", f)
    for m in ("gradcam", "input_x_gradient", "lrp"):
        keys = sorted(k for k in res.metrics if k.startswith(f"{m}/"))
        print(f"  {m}: " + ", ".join(f"{k.split('/', 1)[1]}={res.metrics[k]:.4f}" for k in keys))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
