"""A training run as MLflow shows it: a short parameter set (the overrides and a few key values) and
the whole resolved config as the artifact ``config.yaml``. Real Hydra composition, real Lightning
Trainers (one epoch on tiny data), a real SQLite MLflow store."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from test_training import TINY  # the smallest training run, shared

from audit.training.demo import compose_train
from audit.training.train import main, run_params, train

KEY = {"net", "data", "data/correlation", "max_epochs", "lr", "batch_size", "seed"}


def _config_yaml(client: MlflowClient, run_id: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()


def test_a_composed_run_logs_its_overrides_and_key_values_and_the_config_as_an_artifact(
    tracking_uri, tmp_path
):
    """Called from Python with the overrides it was composed with; a password in a URL never reaches MLflow."""
    overrides = [
        *TINY,
        "data.correlation=0.9",
        "seed=1",
        "+notify=https://bot:s3cret@hooks.example/x",
        "name=tiny",
    ]
    cfg = compose_train(overrides)
    result = train(cfg, overrides=overrides)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    params = run.data.params
    # seed=1 beside the data module's own seed 0: Lightning no longer logs the module's hyperparameters too
    assert set(params) == KEY | {
        "data/n_train",
        "data/n_val",
        "data/size",
        "eval_probes/n_per_group",
        "notify",
    }
    assert params["net"] == "SmallCNN" and params["data"] == "snow_wolf"
    assert (
        params["data/correlation"] == "0.9"
        and params["max_epochs"] == "1"
        and params["seed"] == "1"
    )
    assert params["lr"] == str(cfg.module.lr) and params["batch_size"] == str(cfg.data.batch_size)
    assert params["data/n_train"] == "96" and params["notify"] == "https://bot:***@hooks.example/x"
    text = _config_yaml(client, result.run_id, tmp_path)
    assert "s3cret" not in text and "bot:***@hooks.example" in text
    logged = yaml.safe_load(text)
    expected = OmegaConf.to_container(cfg, resolve=True)
    expected["notify"] = "https://bot:***@hooks.example/x"
    assert logged == expected
    assert (
        result.module.hparams["net"]["_target_"] == "audit.models.SmallCNN"
    )  # kept for checkpoints


def test_the_hydra_app_logs_the_command_line_overrides(tracking_uri, tmp_path, monkeypatch, capsys):
    """``python -m audit.training.train ...`` (the Hydra app, run in this process): the overrides come from Hydra."""
    argv = [
        "audit.training.train",
        *TINY,
        "net.widths=[8,16]",
        "data=stamps",
        "eval_probes.benchmark=stamps",
        f"paths.output_dir={tmp_path}/out",
        "hydra.output_subdir=null",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    assert "context gap" in capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("model-audit").experiment_id])
    params = run.data.params
    assert set(params) == KEY | {
        "data/n_train",
        "data/n_val",
        "data/size",
        "eval_probes/n_per_group",
        "net/widths",
        "eval_probes/benchmark",
    }
    assert (
        params["data"] == "stamps"
        and params["net/widths"] == "[8, 16]"
        and params["max_epochs"] == "1"
    )
    assert yaml.safe_load(_config_yaml(client, run.info.run_id, tmp_path))["net"]["widths"] == [
        8,
        16,
    ]


def test_run_params_names_groups_removals_and_leaves_out_what_does_not_change_the_model():
    overrides = [
        "net=resnet18_small",
        "callbacks=default",
        "~eval_probes.seed",
        "trainer.max_epochs=3",
        "module.lr=0.01",
        "name=x",
        "paths.output_dir=/tmp/x",
        "logger.tracking_uri=sqlite:///a.db",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=/tmp/y",
    ]
    cfg = compose_train(overrides)
    params = run_params(cfg, overrides)
    assert params == {
        "net": "resnet18_small",
        "data": "SnowWolfDataModule",
        "data/correlation": str(cfg.data.correlation),
        "max_epochs": "3",
        "lr": "0.01",
        "batch_size": str(cfg.data.batch_size),
        "seed": str(cfg.seed),
        "callbacks": "default",
        "eval_probes/seed": "(removed)",
    }
    assert run_params(cfg) == {
        k: v for k, v in params.items() if k not in ("callbacks", "eval_probes/seed")
    } | {"net": "resnet18_small"}
