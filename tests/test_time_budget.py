"""The test session's own switches (tests/conftest.py): ``--time-budget`` and the copied empty stores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from _stores import empty_store
from mlflow.tracking import MlflowClient

TESTS = Path(__file__).resolve().parent

THREE = """
import time

def test_first():
    time.sleep(1.5)

def test_second():
    pass

def test_third():
    pass
"""


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "_stores.py"):
        shutil.copyfile(TESTS / name, folder / name)
    (folder / "test_three.py").write_text(THREE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tests_not_started_within_the_budget_are_skipped_and_listed(tmp_path):
    done = _pytest(tmp_path, "--time-budget=1")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "1 passed, 2 skipped" in out, out
    assert (
        "SKIPPED [2] conftest.py" in out and "not started: the --time-budget of 1 s is spent" in out
    ), out


def test_an_empty_store_is_a_new_store_of_its_own(tmp_path, monkeypatch):
    """A copy behaves as MLflow's own new store: the default experiment is made on the first open,
    with its artifacts under the working directory; the registry works; copies share nothing."""
    monkeypatch.chdir(tmp_path)
    a, b = empty_store(tmp_path / "a"), empty_store(tmp_path / "b", "other.db")
    client = MlflowClient(a, registry_uri=a)
    (default,) = client.search_experiments()
    assert (default.experiment_id, default.name) == ("0", "Default")
    assert default.artifact_location == str(tmp_path / "mlruns" / "0")
    assert client.create_experiment("x") == "1"
    client.create_registered_model("m")
    other = MlflowClient(b, registry_uri=b)
    assert [e.name for e in other.search_experiments()] == ["Default"]
    assert other.search_registered_models() == []
    assert (
        empty_store(tmp_path / "a") == a and client.get_experiment_by_name("x") is not None
    )  # kept
