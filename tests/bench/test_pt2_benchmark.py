"""The done criterion of the pt2 loader on the benchmark: a user's own network, trained on snow-wolf
at rho=0.99 (shortcut) and 0.5 (clean), logged the MLflow default way from a batch-1 and a batch-4
input example and registered, is audited by ``model-audit model.uri=models:/...`` with no other
step: the shortcut model FAILs, the clean one PASSes, each on at least two methods' evidence.

Slow (two trainings of about a minute, four audits): ``make test-slow``. LRP on an exported
program is another change; the audits name gradcam, saliency and input x gradient.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pytest
import torch
from _jobkit import cli
from mlflow.tracking import MlflowClient
from torch import nn

from audit.training.demo import CLEAN_RHO, SHORTCUT_RHO, compose_train


class SnowNet(nn.Module):
    """The user's network: conv-BN-ReLU blocks (stride 2 after the first), average pool, linear."""

    def __init__(self, num_classes: int = 2, widths: Sequence[int] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
            ]
            c = w
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x).mean(dim=(2, 3)))


@pytest.mark.slow
def test_trained_models_logged_the_mlflow_default_way_fail_and_pass(tmp_path, monkeypatch):
    from audit.training.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    nets = {}
    for rho in (SHORTCUT_RHO, CLEAN_RHO):
        cfg = compose_train(
            [
                f"data.correlation={rho}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                f"net._target_={__name__}.SnowNet",
            ]
        )
        result = train(cfg)
        assert isinstance(result.module.net, SnowNet)
        nets[rho] = result.module.net.eval()
    exp = MlflowClient(uri).create_experiment(
        "train", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    for batch in (1, 4):
        for rho in (SHORTCUT_RHO, CLEAN_RHO):  # v1 shortcut, v2 clean
            with mlflow.start_run(experiment_id=exp):
                mlflow.pytorch.log_model(
                    nets[rho],
                    name="model",
                    input_example=torch.rand(batch, 3, 64, 64).numpy(),
                    registered_model_name=f"snow{batch}",
                    pip_requirements=["torch"],
                )
    mlflow.set_tracking_uri(None)
    client = MlflowClient(uri, registry_uri=uri)
    args = [
        "probes=synthetic",
        "engine.methods=[gradcam,saliency,input_x_gradient]",
        f"tracking.uri={uri}",
    ]
    for batch in (1, 4):
        shortcut, clean = (
            cli([f"model.uri=models:/snow{batch}/{v}", *args], tmp_path) for v in ("1", "2")
        )
        assert (shortcut.code, clean.code) == (1, 0), (
            batch,
            shortcut.out[-3000:],
            clean.out[-3000:],
            shortcut.err,
            clean.err,
        )
        assert shortcut.out.count("runs at a fixed batch of 1") == (batch == 1)
        tags = {str(v.version): v.tags for v in client.search_model_versions(f"name='snow{batch}'")}
        assert (tags["1"]["audit.verdict"], tags["2"]["audit.verdict"]) == ("FAIL", "PASS")
        assert {
            k: str(v) for k, v in client.get_registered_model(f"snow{batch}").aliases.items()
        } == {"champion": "2"}
        for version in ("1", "2"):
            run_id = tags[version]["audit.run_id"]
            path = client.download_artifacts(run_id, "report/report.json", str(tmp_path))
            checks = json.loads(Path(path).read_text())["checks"]
            used = [
                c["name"] for c in checks if c["name"].startswith("attribution/") and c["verdict"]
            ]
            assert len(used) >= 2, (batch, version, [c["finding"] for c in checks])
