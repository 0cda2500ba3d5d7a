"""Pickled MLflow models (``serialization_format="pickle"``, what ``mlflow.pytorch.autolog()`` registers
for a Lightning fit) audited from the ``model-audit`` console script, whose ``sys.path`` holds the
script's folder, not the working directory: the user's module beside their files (``mynets.py``)
must be found while unpickling, as it is for ``_target_`` paths. Gating a pickle is the operator's
``model.allow_pickle`` decision (unpickling runs the model's code).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from _jobkit import ENGINE, colour_folder
from mlflow.tracking import MlflowClient

MODEL_AUDIT = str(Path(sys.executable).parent / "model-audit")
MYNETS = textwrap.dedent('''
    import torch
    from torch import nn


    class ColourNet(nn.Module):
        """Reads the square's colour (red minus blue), blind to the grey context."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
            self.head = nn.Linear(2, 2)
            with torch.no_grad():
                self.features[0].weight.copy_(torch.tensor([[8.0, 0.0, -8.0], [-8.0, 0.0, 8.0]]).view(2, 3, 1, 1))
                self.features[0].bias.zero_()
                self.head.weight.copy_(torch.eye(2) * 4)
                self.head.bias.zero_()

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))
''')


@pytest.fixture(scope="module")
def pickled(tmp_path_factory, empty_mlflow_store):
    """``work/mynets.py`` and a store where ``pickled`` v1 is a pickled ``mynets.ColourNet``."""
    work = tmp_path_factory.mktemp("work")
    (work / "mynets.py").write_text(MYNETS)
    uri = empty_mlflow_store(work)
    sys.path.insert(0, str(work))
    try:
        mynets = importlib.import_module("mynets")
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)
            mlflow.set_tracking_uri(uri)
            exp = MlflowClient(uri).create_experiment(
                "train", artifact_location=(work / "artifacts").as_uri()
            )
            with mlflow.start_run(experiment_id=exp):
                mlflow.pytorch.log_model(
                    mynets.ColourNet().eval(),
                    name="model",
                    serialization_format="pickle",
                    registered_model_name="pickled",
                    pip_requirements=["torch"],
                )
            mlflow.set_tracking_uri(None)
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("mynets", None)
    colour_folder(work)
    return work, uri


def _model_audit(args: list[str], cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=uri)
    return subprocess.run(
        [MODEL_AUDIT, *args, f"paths.root_dir={cwd}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _args(work: Path) -> list[str]:
    return [
        "model.uri=models:/pickled/1",
        "probes=folder",
        f"probes.path={colour_folder(work)}",
        *ENGINE,
        "engine.methods=[gradcam,saliency]",
        "engine.sanity_probes=0",
    ]


def test_load_model_finds_the_pickled_class_in_the_working_directory(pickled, monkeypatch):
    """In process, with the working directory off sys.path (as under the console script)."""
    from audit.gate.loading import load_model

    work, uri = pickled
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(work))])
    loaded = load_model(
        {"kind": "mlflow", "uri": "models:/pickled/1", "allow_pickle": True}, tracking_uri=uri
    )
    assert type(loaded.model).__module__ == "mynets" and loaded.layout == "pickle"
    assert str(work) not in sys.path and "" not in sys.path  # put back after the one import
    sys.modules.pop("mynets", None)


@pytest.mark.slow
def test_the_console_script_unpickles_a_model_whose_class_is_beside_the_user(pickled):
    work, uri = pickled
    done = _model_audit([*_args(work), "model.allow_pickle=true"], work, uri)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PASS" in done.stdout and "ModuleNotFoundError" not in done.stderr
    mv = MlflowClient(uri, registry_uri=uri).get_model_version("pickled", "1")
    assert mv.tags["audit.verdict"] == "PASS"


@pytest.mark.slow
def test_elsewhere_the_missing_module_is_one_line_naming_it_and_the_fix(pickled, tmp_path):
    work, uri = pickled
    done = _model_audit([*_args(work), "model.allow_pickle=true"], tmp_path, uri)
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("model-audit: error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert "mynets" in errors[0] and "PYTHONPATH" in errors[0] and "this is a bug" not in errors[0]
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("model-audit-gate")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert all(r.info.run_id in done.stdout or "audit.verdict" in r.data.tags for r in runs)
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())
