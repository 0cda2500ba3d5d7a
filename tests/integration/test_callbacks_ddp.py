"""DDP with 2 CPU processes (gloo, ddp_spawn): sharded probes, gathered results, rank-zero logging,
no deadlock when one rank's explainer (or its whole pass) raises, stop decision on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import pytorch_lightning as pl
    import torch
    from audit.datasets import snow_wolf
    from audit.evidence.attribution import collect, summarize
    from audit.methods import register
    from audit.training import Classifier, SnowWolfDataModule
    from audit.callbacks import AttributionCallback, SpuriousFeatureCallback


    @register("rank1_fails")
    def rank1_fails(model, inputs, target):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("explainer broke on rank 1")
        return inputs.abs().sum(dim=1, keepdim=True)


    class FlakyAttribution(AttributionCallback):
        def _compute(self, trainer, model):
            if trainer.global_rank == 1 and trainer.current_epoch == 0:
                raise RuntimeError("the whole pass broke on rank 1")
            return super()._compute(trainer, model)


    if __name__ == "__main__":
        uri = sys.argv[1]
        probes = snow_wolf.probe_set(2, size=32, seed=3)
        att = FlakyAttribution(
            probes, methods=["gradcam", "rank1_fails"], module="net", tracking_uri=uri, every_n_epochs=1,
            metrics=["deletion", "lerf", "insertion", "relevance_mass"],
        )
        spu = SpuriousFeatureCallback(
            probes, module="net", monitor="outside_mask", stop_threshold=0.0, patience=3, tracking_uri=uri,
            every_n_epochs=1,
        )
        # by budget: rank zero decides when to audit and every rank follows (a pass gathers)
        budget = AttributionCallback(
            probes, methods=["gradcam"], module="net", tracking_uri=uri, prefix="budget", max_overhead=1e-3,
        )
        pl.seed_everything(0, verbose=False)
        module = Classifier({"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]})
        trainer = pl.Trainer(
            max_epochs=5, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
            callbacks=[att, spu, budget], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=SnowWolfDataModule(n_train=64, n_val=16, size=32, batch_size=16))
        final = summarize(collect(module.net, probes, ["gradcam"]), probes)  # the final weights, one process
        print("RESULT " + json.dumps(final))
    """
)


def test_ddp_two_cpu_processes(tmp_path, tracking_uri):
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="always::UserWarning")
    out = subprocess.run(
        [sys.executable, str(script), tracking_uri],
        capture_output=True,
        text=True,
        timeout=420,  # a deadlock would hang here
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert (
        "the audit at epoch 0 failed on rank 1 (RuntimeError: the whole pass broke on rank 1)"
        in log
    )
    assert "method 'rank1_fails' failed (RuntimeError: explainer broke on rank 1)" in log
    assert log.count("method 'rank1_fails' failed") == 1  # warned once, by rank zero only
    assert "stopping training" in log
    final = json.loads(
        next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:]
    )

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("model-audit").experiment_id])
    assert len(runs) == 1  # only global rank zero created a run and logged
    run_id = runs[0].info.run_id
    history = client.get_metric_history(run_id, "audit/gradcam/deletion_auc")
    # epoch 0 skipped (rank 1 failed), the stop after 3 audits above the threshold ends after epoch 2
    assert [m.step for m in history] == [1, 2]
    assert [
        m.step for m in client.get_metric_history(run_id, "audit/spurious/outside_mask/gradcam")
    ] == [0, 1, 2]
    assert not any(k.startswith("audit/rank1_fails") for k in runs[0].data.metrics)
    # the budgeted callback: the first epoch and the final weights (the stop asked at epoch 2), no deadlock
    assert [m.step for m in client.get_metric_history(run_id, "budget/gradcam/deletion_auc")] == [
        0,
        2,
    ]
    # the gathered shards give the numbers of one process on the whole probe set
    metrics = runs[0].data.metrics
    for key in ("gradcam/deletion_auc", "gradcam/relevance_mass", "gradcam/insertion_auc"):
        assert metrics[f"audit/{key}"] == pytest.approx(final[key], abs=1e-3), (
            key
        )  # see test_callbacks_evidence
    assert metrics["audit/spurious/context_gap"] == pytest.approx(final["context_gap"])
