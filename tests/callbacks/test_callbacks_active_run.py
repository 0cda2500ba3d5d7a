"""Without an MLFlowLogger the callbacks join the active MLflow run (autolog's, or the user's own).

A real Lightning Trainer, a tiny network, real SQLite stores and the real ``mlflow.pytorch.autolog``;
nothing mocked. ``log_models=False`` keeps autolog from saving the model (inferring its pip
requirements alone takes ~13 s); the run it starts and the metrics it logs are the same.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import mlflow
import pytest
import pytorch_lightning as pl
from mlflow.tracking import MlflowClient
from mlflow.utils.autologging_utils import autologging_is_disabled

from audit.callbacks import AttributionCallback, SpuriousFeatureCallback
from audit.datasets import snow_wolf
from audit.training import Classifier, SnowWolfDataModule

NET = {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]}
OWN = "model-audit"  # the experiment of the callbacks' own run


@pytest.fixture(scope="module")
def probes():
    return snow_wolf.probe_set(2, size=32, seed=3)  # 8 probes: 4 groups x 2, masks, pairs


@pytest.fixture
def autolog():
    mlflow.pytorch.autolog(log_models=False, silent=True)
    yield
    mlflow.pytorch.autolog(disable=True)


def _callbacks(probes, **kw):
    return [
        AttributionCallback(
            probes, methods=["gradcam"], module="net", strict=True, every_n_epochs=1, **kw
        ),
        SpuriousFeatureCallback(
            probes, method=None, module="net", strict=True, every_n_epochs=1, **kw
        ),
    ]


def _fit(callbacks) -> pl.Trainer:
    pl.seed_everything(0, workers=True, verbose=False)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=callbacks,
    )
    data = SnowWolfDataModule(n_train=32, n_val=8, correlation=0.9, size=32, seed=0, batch_size=16)
    trainer.fit(Classifier(NET, lr=1e-2), datamodule=data)
    return trainer


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_the_autolog_run_holds_the_audit_series(probes, tracking_uri, autolog, caplog):
    with caplog.at_level(logging.INFO):
        _fit(_callbacks(probes))
    run = mlflow.last_active_run()  # the run autolog started around fit, and ended after it
    assert run is not None and run.info.status == "FINISHED"
    client = MlflowClient(tracking_uri)
    data = client.get_run(run.info.run_id).data
    assert "train/loss" in data.metrics  # autolog's own series ...
    assert _steps(client, run.info.run_id, "audit/gradcam/srg") == [0, 1]  # ... and the callbacks'
    assert _steps(client, run.info.run_id, "audit/spurious/context_gap") == [0, 1]
    assert data.tags["audit.attribution.probe_digest"] == probes.digest
    assert "audit.own_run" not in data.tags
    assert client.get_experiment_by_name(OWN) is None  # no separate run
    (said,) = [r.getMessage() for r in caplog.records if "model-audit:" in r.getMessage()]
    assert f"active MLflow run {run.info.run_id}" in said and "no MLFlowLogger" in said


def test_a_run_the_user_started_is_joined_and_left_open(probes, tracking_uri):
    with mlflow.start_run() as mine:
        # the callbacks' tracking_uri names the same store: they join the run
        _fit(_callbacks(probes, tracking_uri=tracking_uri))
        assert mlflow.active_run().info.run_id == mine.info.run_id
        client = MlflowClient(tracking_uri)
        assert client.get_run(mine.info.run_id).info.status == "RUNNING"  # the user's run to end
        assert _steps(client, mine.info.run_id, "audit/gradcam/deletion_auc") == [0, 1]
        assert _steps(client, mine.info.run_id, "audit/overhead/total") == [1]
    assert client.get_experiment_by_name(OWN) is None


def test_an_active_run_in_another_store_leaves_the_configured_store_to_the_callbacks(
    probes, tracking_uri, tmp_path, caplog, empty_mlflow_store
):
    other = empty_mlflow_store(tmp_path, "callbacks.db")
    with mlflow.start_run() as active, caplog.at_level(logging.INFO):
        _fit(_callbacks(probes, tracking_uri=other))
    assert not any(
        k.startswith("audit/")
        for k in MlflowClient(tracking_uri).get_run(active.info.run_id).data.metrics
    )
    theirs = MlflowClient(other)
    (own,) = theirs.search_runs([theirs.get_experiment_by_name(OWN).experiment_id])
    assert own.info.status == "FINISHED" and own.data.tags["audit.own_run"] == "true"
    assert _steps(theirs, own.info.run_id, "audit/gradcam/srg") == [0, 1]
    (said,) = [r.getMessage() for r in caplog.records if "model-audit:" in r.getMessage()]
    # the line names both stores and the way to join the active run instead
    assert (
        active.info.run_id in said
        and tracking_uri in said
        and other in said
        and "tracking_uri=None" in said
    )


def test_no_active_run_keeps_the_own_run(probes, tracking_uri):
    _fit(_callbacks(probes))
    client = MlflowClient(tracking_uri)
    (own,) = client.search_runs([client.get_experiment_by_name(OWN).experiment_id])
    assert own.info.status == "FINISHED" and _steps(
        client, own.info.run_id, "audit/gradcam/srg"
    ) == [0, 1]


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import mlflow
    import pytorch_lightning as pl
    from audit.callbacks import SpuriousFeatureCallback
    from audit.datasets import snow_wolf
    from audit.training import Classifier, SnowWolfDataModule

    if __name__ == "__main__":
        uri, strategy = sys.argv[1], sys.argv[2]
        mlflow.set_tracking_uri(uri)
        spu = SpuriousFeatureCallback(snow_wolf.probe_set(2, size=32, seed=3), method=None, module="net", every_n_epochs=1)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            max_epochs=2, accelerator="cpu", devices=2, strategy=strategy, logger=False, callbacks=[spu],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        # under `ddp` every rank runs this script, so rank 1 has an active run of its own
        with mlflow.start_run(run_name=f"rank-{trainer.global_rank}"):
            trainer.fit(
                Classifier({"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]}),
                datamodule=SnowWolfDataModule(n_train=64, n_val=16, size=32, batch_size=16),
            )
    """
)


# ddp_spawn is slow (a third interpreter): the fast suite keeps rank-zero-only logging under ddp_spawn
# (test_callbacks_ddp.py) and a pickled callback joining the launcher's run from another process (below)
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("ddp_spawn", marks=pytest.mark.slow)])
def test_under_ddp_rank_zero_logs_to_the_launching_run_and_other_ranks_nothing(
    tracking_uri, tmp_path, strategy
):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), tracking_uri, strategy],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    client = MlflowClient(tracking_uri)
    runs = {
        r.info.run_name: r
        for r in client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    }
    assert set(runs) == ({"rank-0", "rank-1"} if strategy == "ddp" else {"rank-0"})
    assert _steps(client, runs["rank-0"].info.run_id, "audit/spurious/context_gap") == [0, 1]
    if strategy == "ddp":
        assert not any(
            k.startswith("audit/") for k in runs["rank-1"].data.metrics
        )  # rank 1 logged nothing
    assert client.get_experiment_by_name(OWN) is None


def test_a_pickled_callback_carries_the_active_run_to_another_process_only_while_it_runs(
    probes, tracking_uri
):
    import copy
    import os
    import pickle

    cb = AttributionCallback(probes, methods=["gradcam"], module="net")
    with mlflow.start_run() as run:
        clone = pickle.loads(pickle.dumps(cb))
        assert (
            copy.deepcopy(cb)._launcher_run
            == clone._launcher_run
            == (os.getpid(), run.info.run_id, tracking_uri)
        )
    # in the same process a copy is just a copy: the run it saw is not joined once it is no longer active
    assert clone._active_run() is None
    # as seen from a spawned process (another pid): joined while the run is running, not once it ended
    clone._launcher_run = (os.getpid() + 1, run.info.run_id, tracking_uri)
    assert clone._active_run() is None  # the `with` ended it: FINISHED
    MlflowClient(tracking_uri).update_run(run.info.run_id, status="RUNNING")
    assert clone._active_run() == (run.info.run_id, tracking_uri)
    assert (
        pickle.loads(pickle.dumps(AttributionCallback(probes)))._launcher_run is None
    )  # no run active


def test_the_budget_floor_bench_row_on_a_fit_far_below_the_floor(tracking_uri):
    # the user's case end to end: autolog, no logger, the three callbacks as the README sets them
    from audit.bench import budget_floor

    row = budget_floor.one(2, 64, 32, tracking_uri)
    assert row["epochs_audited"] == [0, 1] and row["probes"] == 64
    assert (
        row["share"] > 0.1 and row["announced"] is not None
    )  # too short for 10%, and said after epoch 0
    assert (
        row["final_count"] < 64
    )  # the budget was spent: the final pass was cut, and logged as such
    assert row["callbacks_s"] == pytest.approx(row["share"] * row["training_s"])
    assert (
        autologging_is_disabled("pytorch") and mlflow.active_run() is None
    )  # nothing left on for later tests
    assert MlflowClient(tracking_uri).get_experiment_by_name(OWN) is None
