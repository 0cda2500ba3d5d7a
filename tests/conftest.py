"""Shared test setup: no telemetry, GPU tests skipped without CUDA, MLflow in tmp dirs."""

from __future__ import annotations

import os
import time

import pytest
import torch
from _stores import empty_store

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


_STARTED = pytest.StashKey[float]()


def pytest_addoption(parser):
    parser.addoption(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="skip the tests not started within SECONDS of the first test's start (CI's share of the slow tests)",
    )


def pytest_runtest_setup(item):
    budget = item.config.getoption("--time-budget")
    if budget is None:
        return
    started = item.config.stash.setdefault(
        _STARTED, time.monotonic()
    )  # the clock starts with the first test
    if time.monotonic() - started > budget:
        pytest.skip(f"not started: the --time-budget of {budget:g} s is spent")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_mlflow_globals():
    """Undo MLflow's process-wide tracking URI after every test.

    Lightning's ``MLFlowLogger`` calls ``mlflow.set_tracking_uri()``, which sets a
    module global and writes ``MLFLOW_TRACKING_URI`` behind monkeypatch's back; a
    later test's fluent API (``mlflow.start_run``) would then write to a deleted
    test's store.
    """
    try:
        import mlflow
    except ImportError:  # the GPU machine runs the explainer tests without MLflow installed
        yield
        return

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(None)  # clears the global and the variable
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh, empty SQLite MLflow store for one test, exported as MLFLOW_TRACKING_URI.

    The test runs in ``tmp_path``: MLflow puts the artifacts of the default
    experiment under ``./mlruns`` of the working directory, which must not be the
    repository.
    """
    uri = empty_store(tmp_path)  # a copy of a store MLflow migrated once for the whole session
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(scope="session")
def empty_mlflow_store():
    """``empty_mlflow_store(folder, name="mlflow.db") -> uri``: an empty SQLite MLflow store there
    for a fixture that builds a registry (see ``_stores``: no migrations run per store)."""
    return empty_store
