"""The audit job end to end: `python -m audit` in a subprocess, a real SQLite registry, exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _toy_models import ColourReader, GreyReader, colour_probe_set
from mlflow.tracking import MlflowClient

from audit.loading import log_model_safely

TESTS = Path(__file__).resolve().parent
NAME = "toy"
# a small, fast audit: colour squares, 48 probes per group at 32x32 (see _toy_models)
ENGINE = ["engine.attribution_probes=32", "engine.sanity_probes=4", "engine.steps=8"]
ALLOW = "model.allowed_targets=[audit.models.*,_toy_models.*]"


def small(workdir: Path) -> list[str]:
    folder = workdir / "colour-probes"
    if not folder.is_dir():
        colour_probe_set(n_per_group=48, size=32).save(folder)
    return ["probes=folder", f"probes.path={folder}", ALLOW, *ENGINE]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A registry built once: 'toy' v1 (reads the colour: PASS) and v2 (reads the grey context: FAIL)."""
    folder = tmp_path_factory.mktemp("job-registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("train", artifact_location=(folder / "artifacts").as_uri())
    for model in (ColourReader(), GreyReader()):
        run = client.create_run(exp)
        log_model_safely(model, {"_target_": f"_toy_models.{type(model).__name__}"},
                         registered_name=NAME, run_id=run.info.run_id, tracking_uri=uri)  # fmt: skip
        client.set_terminated(run.info.run_id)
    return folder


@pytest.fixture
def store(template, tmp_path, monkeypatch):
    """A fresh copy of the template store; returns (uri, client, workdir)."""
    shutil.copyfile(template / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(template / "artifacts", tmp_path / "artifacts_src", dirs_exist_ok=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri, MlflowClient(uri), tmp_path


def run_job(args: list[str], workdir: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "audit", *args, f"paths.root_dir={workdir}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def registry_state(client: MlflowClient) -> dict:
    versions = {str(v.version): dict(v.tags) for v in client.search_model_versions(f"name='{NAME}'")}
    return {"versions": versions, "aliases": {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}}


def test_multirun_fail_blocks_and_never_removes_the_champion(store):
    uri, client, work = store
    proc = run_job(["-m", f"model.uri=models:/{NAME}/1,models:/{NAME}/2", *small(work)], work, uri)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the worst of PASS (0) and FAIL (1)
    assert f"{NAME} v1: PASS" in out and f"{NAME} v2: FAIL" in out and "model-audit: summary" in out
    state = registry_state(client)
    assert state["aliases"] == {"champion": "1"}  # moved by v1's PASS, kept through v2's FAIL
    assert state["versions"]["2"]["audit.verdict"] == "FAIL"
    assert "alias 'champion' not moved (stays v1)" in out


def test_a_config_hydra_cannot_compose_exits_2(store):
    uri, _client, work = store
    proc = run_job(["probes=nosuch"], work, uri)
    assert proc.returncode == 2
    # one line from the real entry point (tests/test_bad_inputs.py runs 40+ cases in-process)
    assert proc.stderr.strip().splitlines() == [
        "model-audit: error: In 'audit': Could not find 'probes/nosuch'; "
        "available options in 'probes': folder, stamps, synthetic"
    ]
