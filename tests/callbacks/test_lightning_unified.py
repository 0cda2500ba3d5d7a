"""The audit callbacks and MLflowSaveConfig under the unified ``lightning`` package (``lightning.pytorch``).

``audit.training`` is written against ``pytorch_lightning``; a ``lightning.pytorch.Trainer``
only fits a ``lightning.pytorch.LightningModule``, so these tests bring their own small
module and data module, as a user of the unified package would.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from test_callbacks_config import assert_config_artifact
from torch.utils.data import DataLoader, TensorDataset

from audit.callbacks import (
    ActivationMaximizationCallback,
    AttributionCallback,
    MLflowSaveConfig,
    SpuriousFeatureCallback,
)
from audit.datasets import snow_wolf
from audit.models import SmallCNN


class UnifiedClassifier(L.LightningModule):
    """A SmallCNN under ``self.net``, trained with cross-entropy."""

    def __init__(self, widths: list[int] = [8, 16], lr: float = 1e-2) -> None:  # noqa: B006 - a CLI default
        super().__init__()
        self.lr = lr
        self.net = SmallCNN(num_classes=2, widths=widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class UnifiedData(L.LightningDataModule):
    """Snow-wolf training and validation images at ``size`` pixels."""

    def __init__(
        self, n_train: int = 64, n_val: int = 16, size: int = 32, batch_size: int = 16
    ) -> None:
        super().__init__()
        self.n_train, self.n_val, self.size, self.batch_size = n_train, n_val, size, batch_size

    def _loader(self, n: int, seed: int, shuffle: bool) -> DataLoader:
        ps = snow_wolf.generate(n, correlation=0.9, size=self.size, seed=seed)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(ps.images, ps.labels),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=g,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.n_train, 0, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.n_val, 1, shuffle=False)


def test_callbacks_log_into_the_unified_mlflow_logger_run(tracking_uri):
    probes = snow_wolf.probe_set(2, size=32, seed=3)
    callbacks = [
        AttributionCallback(
            probes, methods=["gradcam", "saliency"], metrics=["deletion"], module="net", strict=True
        ),
        SpuriousFeatureCallback(probes, module="net", warn_threshold=1.0, strict=True),
        ActivationMaximizationCallback(
            "net.features.3", [0], steps=4, size=32, strict=True
        ),  # module=None
    ]
    assert all(isinstance(c, L.Callback) for c in callbacks)
    logger = MLFlowLogger(experiment_name="unified", tracking_uri=tracking_uri)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(UnifiedClassifier(), datamodule=UnifiedData())
    assert trainer.current_epoch == 2 and all(
        c._passes >= 2 for c in callbacks
    )  # first and final epoch

    client = MlflowClient(tracking_uri)
    assert [r.info.run_id for r in client.search_runs([logger.experiment_id])] == [
        logger.run_id
    ]  # no own run
    assert client.get_experiment_by_name("model-audit") is None
    run = client.get_run(logger.run_id)
    metrics = run.data.metrics
    for key in (
        "train/loss",  # the training's own series: the same run
        "audit/gradcam/deletion_auc",
        "audit/saliency/deletion_auc",
        "audit/spurious/context_gap",
        "audit/spurious/flip_rate",
        "audit/actmax/net.features.3/unit_0",
    ):
        assert key in metrics, key
    assert run.data.tags["audit.attribution.probe_digest"] == probes.digest
    assert run.data.tags["audit.spurious.probe_digest"] == probes.digest
    assert [
        m.step for m in client.get_metric_history(logger.run_id, "audit/spurious/context_gap")
    ] == [0, 1]
    images = [a.path for a in client.list_artifacts(logger.run_id, "images")]
    for key in ("audit~gradcam", "audit~actmax~net.features.3"):
        assert any(p.startswith(f"images/{key}+step+") and p.endswith(".png") for p in images), (
            key,
            images,
        )


def test_unified_lightning_cli_saves_its_config_to_mlflow(tmp_path, tracking_uri):
    folder = snow_wolf.probe_set(1, size=32, seed=3).save(tmp_path / "probes")
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": {
                "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                "init_args": {"experiment_name": "cli", "tracking_uri": tracking_uri},
            },
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "callbacks": [
                {
                    "class_path": "audit.callbacks.AttributionCallback",
                    "init_args": {
                        "probes": str(folder),
                        "methods": ["saliency"],
                        "metrics": ["deletion"],
                        "module": "net",
                        "strict": True,
                    },
                },
                {
                    "class_path": "audit.callbacks.ActivationMaximizationCallback",
                    "init_args": {
                        "layer": "features.3",
                        "units": [0],
                        "steps": 2,
                        "size": 32,
                        "module": "net",
                    },
                },
            ],
        },
        "model": {"widths": [8, 16]},
        "data": {"n_train": 32, "n_val": 16, "batch_size": 16},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        UnifiedClassifier,
        UnifiedData,
        args=["fit", "--config", str(path)],
        save_config_callback=MLflowSaveConfig,
    )
    assert isinstance(cli.trainer, L.Trainer) and isinstance(cli.trainer.logger, MLFlowLogger)
    assert any(isinstance(c, MLflowSaveConfig) for c in cli.trainer.callbacks)
    run_id = cli.trainer.logger.run_id
    client = MlflowClient(tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    assert "audit/saliency/deletion_auc" in metrics and "audit/actmax/features.3/unit_0" in metrics
    assert_config_artifact(client, run_id, config)


def test_importing_the_callbacks_prints_lightning_lines_once(tmp_path):
    # Under a root handler (as Hydra sets one), importing audit.callbacks brings in
    # `lightning`, whose umbrella logger would print every lightning.pytorch line twice.
    import subprocess
    import sys

    code = (
        "import logging; logging.basicConfig(format='ROOT %(message)s', level=logging.INFO)\n"
        "import audit.callbacks\n"
        "from lightning.pytorch.utilities.rank_zero import rank_zero_info\n"
        "rank_zero_info('one line')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "one line" in ln]
    assert lines == ["ROOT one line"], out.stdout + out.stderr
