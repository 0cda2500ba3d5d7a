"""Training through the real Hydra config, logged to a real MLflow store."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from audit.models import Normalized, SmallCNN, build_model, resnet18_small
from audit.training import Classifier
from audit.training.demo import compose_train
from audit.training.train import train

TINY = [
    "data.n_train=96",
    "data.n_val=32",
    "data.size=32",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "eval_probes.n_per_group=4",
]


def test_composed_config_trains_and_logs_to_mlflow(tracking_uri, tmp_path):
    cfg = compose_train([*TINY, "data.correlation=0.9"])
    assert cfg.logger.tracking_uri == tracking_uri
    result = train(cfg)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data/correlation"] == "0.9"
    for key in ("train/loss_epoch", "val/acc", "eval/context_gap", "eval/acc/wolf_snow"):
        assert key in run.data.metrics, key
    assert run.data.metrics["eval/acc/husky_grass"] == result.accuracies["husky|grass"].accuracy
    assert len(run.data.tags["audit.probe_digest"]) == 64
    assert set(result.accuracies) == {"wolf|snow", "wolf|grass", "husky|snow", "husky|grass"}


def test_training_is_reproducible_for_a_seed():
    cfg = compose_train([*TINY, "logger=none"])
    a = train(cfg).module.net.state_dict()
    b = train(cfg).module.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_reloads_without_arguments(tmp_path):
    module = Classifier({"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 8]})
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = Classifier.load_from_checkpoint(tmp_path / "m.ckpt")
    x = torch.rand(2, 3, 16, 16)
    module.eval(), loaded.eval()
    assert torch.equal(module(x), loaded(x))


def test_cli_runs_the_hydra_app(tracking_uri, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "audit.training.train", *TINY, f"paths.output_dir={tmp_path}/out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "context gap wolf" in out.stdout
    assert mlflow.MlflowClient(tracking_uri).search_experiments()


def test_model_zoo():
    x = torch.rand(2, 3, 32, 32)
    assert SmallCNN(num_classes=3)(x).shape == (2, 3)
    assert resnet18_small(num_classes=2)(x).shape == (2, 2)
    wrapped = Normalized(SmallCNN(), mean=[0.5] * 3, std=[0.25] * 3).eval()
    inner = wrapped.model
    assert torch.allclose(wrapped(x), inner((x - 0.5) / 0.25))
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")
    with pytest.raises(ValueError, match="_target_"):
        Classifier({"num_classes": 2})
