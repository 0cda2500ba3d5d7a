"""The callbacks configured three ways: Python (elsewhere), Hydra (the real config), LightningCLI YAML."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from pytorch_lightning.cli import LightningCLI

from audit.callbacks import (
    ActivationMaximizationCallback,
    AttributionCallback,
    MLflowSaveConfig,
    SpuriousFeatureCallback,
)
from audit.datasets import snow_wolf
from audit.training import Classifier, SnowWolfDataModule
from audit.training.demo import compose_train
from audit.training.train import instantiate_callbacks, train

TINY = [
    "data.n_train=64",
    "data.n_val=16",
    "data.size=32",
    "data.batch_size=16",
    "net.widths=[8,16]",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "eval_probes.n_per_group=2",
    "callbacks.attribution.probes.n_per_group=2",
    "callbacks.spurious.probes.n_per_group=2",
    "callbacks.actmax.layer=features.3",
    "callbacks.actmax.steps=4",
]


def test_every_callback_file_is_one_documented_target():
    cfg = compose_train(["callbacks=default"])
    assert set(cfg.callbacks) == {"attribution", "spurious", "actmax"}
    for name, node in cfg.callbacks.items():
        assert node._target_.startswith("audit.callbacks."), name
    assert not compose_train([]).get("callbacks")  # the default group is `none`
    assert instantiate_callbacks(compose_train([]).get("callbacks")) == []


def test_hydra_config_trains_with_the_callbacks(tracking_uri):
    cfg = compose_train(["callbacks=default", *TINY])
    callbacks = instantiate_callbacks(cfg.callbacks)
    assert [type(c) for c in callbacks] == [
        AttributionCallback,
        SpuriousFeatureCallback,
        ActivationMaximizationCallback,
    ]
    assert len(callbacks[0].probes) == 8 and callbacks[0].probes.size == (32, 32)
    result = train(cfg)  # instantiates cfg.callbacks itself
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    metrics = run.data.metrics
    for key in (
        "audit/gradcam/deletion_auc",
        "audit/lrp/srg",
        "audit/spurious/context_gap",
        "audit/actmax/features.3/unit_0",
        "eval/context_gap",
    ):
        assert key in metrics, key
    assert run.data.tags["audit.attribution.probe_digest"] == callbacks[0].probes.digest


def test_lightning_cli_yaml(tmp_path, tracking_uri):
    folder = snow_wolf.probe_set(1, size=32, seed=3).save(tmp_path / "probes")
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": {
                "class_path": "pytorch_lightning.loggers.MLFlowLogger",
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
                        "methods": ["gradcam", "saliency"],
                        "metrics": ["deletion", "relevance_mass"],
                        "module": "net",
                        "strict": True,
                    },
                },
                {
                    "class_path": "audit.callbacks.SpuriousFeatureCallback",
                    "init_args": {
                        "probes": str(folder),
                        "module": "net",
                        "warn_threshold": 1.0,
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
        "model": {
            "net": {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]}
        },
        "data": {"n_train": 32, "n_val": 16, "size": 32, "batch_size": 16},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        Classifier,
        SnowWolfDataModule,
        args=["fit", "--config", str(path)],
        save_config_callback=MLflowSaveConfig,  # Lightning's default asserts: no log_dir with a SQLite store
    )
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {
        AttributionCallback,
        SpuriousFeatureCallback,
        ActivationMaximizationCallback,
        MLflowSaveConfig,
    } <= kinds
    run_id = cli.trainer.logger.run_id
    client = MlflowClient(tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    assert "audit/saliency/deletion_auc" in metrics and "audit/spurious/flip_rate" in metrics
    assert "audit/actmax/features.3/unit_0" in metrics
    assert_config_artifact(client, run_id, config)


def assert_config_artifact(client: MlflowClient, run_id: str, config: dict) -> None:
    """The run holds ``config.yaml``: the parsed config, with every value the YAML file gave."""
    assert [a.path for a in client.list_artifacts(run_id) if a.path == "config.yaml"] == [
        "config.yaml"
    ]
    with tempfile.TemporaryDirectory() as tmp:
        saved = yaml.safe_load(
            Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
        )
    assert saved["seed_everything"] == config["seed_everything"]
    assert (
        saved["model"].items() >= config["model"].items()
    )  # plus the defaults LightningCLI filled in
    assert saved["data"].items() >= config["data"].items()
    trainer = saved["trainer"]
    for key in ("max_epochs", "accelerator", "enable_checkpointing", "num_sanity_val_steps"):
        assert trainer[key] == config["trainer"][key], key
    assert trainer["logger"]["class_path"] == config["trainer"]["logger"]["class_path"]
    assert (
        trainer["logger"]["init_args"]["tracking_uri"]
        == config["trainer"]["logger"]["init_args"]["tracking_uri"]
    )
    given = config["trainer"]["callbacks"]
    assert [c["class_path"] for c in trainer["callbacks"]] == [c["class_path"] for c in given]
    for got, want in zip(trainer["callbacks"], given, strict=True):
        assert got["init_args"].items() >= want["init_args"].items(), want["class_path"]


def test_mlflow_save_config_needs_an_mlflow_logger(tmp_path, tracking_uri):
    """Without an MLFlowLogger the fit stops at setup with the fix named, before any training."""
    config = {
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
        },
        "model": {"net": {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8]}},
        "data": {"n_train": 8, "n_val": 8, "size": 32, "batch_size": 8},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="Trainer has none; set trainer.logger to an MLFlowLogger"):
        LightningCLI(
            Classifier,
            SnowWolfDataModule,
            args=["fit", "--config", str(path)],
            save_config_callback=MLflowSaveConfig,
        )


def test_mlflow_save_config_does_not_overwrite_unless_asked(tmp_path, tracking_uri):
    """A resumed run that already holds config.yaml keeps it; overwrite=True replaces it."""
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("resumed")).info.run_id
    client.log_text(run_id, "old: config\n", "config.yaml")
    config = {
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 1,
            "limit_val_batches": 0,
            "accelerator": "cpu",
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "pytorch_lightning.loggers.MLFlowLogger",
                "init_args": {"tracking_uri": tracking_uri, "run_id": run_id},
            },
        },
        "model": {"net": {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8]}},
        "data": {"n_train": 8, "n_val": 8, "size": 32, "batch_size": 8},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path)]
    with pytest.raises(
        RuntimeError, match=f"run {run_id} already has the artifact 'config.yaml'.*overwrite"
    ):
        LightningCLI(
            Classifier, SnowWolfDataModule, args=args, save_config_callback=MLflowSaveConfig
        )
    assert client.download_artifacts(run_id, "config.yaml", str(tmp_path / "a")).endswith(
        "config.yaml"
    )
    assert (tmp_path / "a" / "config.yaml").read_text() == "old: config\n"
    LightningCLI(
        Classifier,
        SnowWolfDataModule,
        args=args,
        save_config_callback=MLflowSaveConfig,
        save_config_kwargs={"overwrite": True},
    )
    saved = yaml.safe_load(
        Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "b"))).read_text()
    )
    assert saved["model"]["net"] == config["model"]["net"]
    assert saved["trainer"]["logger"]["init_args"]["run_id"] == run_id


@pytest.mark.parametrize("bad", [{"methods": ["nope"]}, {"every_n_epochs": 0}])
def test_bad_cli_values_fail_with_the_reason(tmp_path, bad):
    folder = snow_wolf.probe_set(1, size=32, seed=3).save(tmp_path / "probes")
    with pytest.raises(ValueError, match="unknown method 'nope'|every_n_epochs must be"):
        AttributionCallback(str(folder), **bad)
