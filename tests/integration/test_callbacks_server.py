"""Faults: a real ``mlflow server`` stopped in the middle of training, then started again."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from _mlflow_server import MlflowServer
from mlflow.tracking import MlflowClient

from audit.callbacks import AttributionCallback, AuditWarning, SpuriousFeatureCallback
from audit.datasets import snow_wolf
from audit.gate.tracking import EvidenceSink, Record, RunTarget, replay_spool
from audit.training import Classifier, SnowWolfDataModule

NET = {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]}


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"
    )  # a dead server must not stall for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


class Chaos(pl.Callback):
    """Stops the server after the first audit has been sent, starts it again before epoch ``back``."""

    def __init__(self, server: MlflowServer, watched: AttributionCallback, back: int) -> None:
        self.server, self.watched, self.back = server, watched, back

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            assert self.watched._sink.wait(60)
            self.server.stop()

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.back:
            self.server.start()


def test_server_stopped_mid_training_then_back(server, tmp_path):
    probes = snow_wolf.probe_set(1, size=32, seed=3)
    spool = tmp_path / "spool"
    att = AttributionCallback(
        probes,
        methods=["gradcam"],
        module="net",
        tracking_uri=server.uri,
        spool_dir=spool,
        every_n_epochs=1,
    )
    spu = SpuriousFeatureCallback(probes, module="net", tracking_uri=server.uri, every_n_epochs=1)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        callbacks=[att, spu, Chaos(server, att, back=3)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with pytest.warns(AuditWarning) as rec:
        trainer.fit(
            Classifier(NET),
            datamodule=SnowWolfDataModule(n_train=32, n_val=16, size=32, batch_size=16),
        )
    assert trainer.current_epoch == 4  # training completed

    about = [
        str(w.message)
        for w in rec
        if "AttributionCallback" in str(w.message) and "MLflow" in str(w.message)
    ]
    assert len(about) == 1, about  # warned once, although two audits could not be sent
    assert "health check" in about[0] and str(spool) in about[0]

    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("model-audit").experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    for key in ("audit/gradcam/deletion_auc", "audit/spurious/context_gap"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1, 2, 3], key
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    for step in range(4):  # the spooled images arrived too
        assert any(p.startswith(f"images/audit~gradcam+step+{step}+") for p in images), step
    assert not any(spool.iterdir())  # the spool was emptied by the retries


def test_records_left_in_the_spool_can_be_replayed(server, tmp_path):
    target = RunTarget(server.uri, experiment_name="replay")
    sink = EvidenceSink(target, tmp_path / "spool", background=False)
    sink.submit(Record(step=0, metrics={"a": 1.0}))
    assert sink.pending() == 0 and target.run_id is not None
    server.stop()
    sink.submit(Record(step=1, metrics={"a": 2.0}, images={"pic": _rgb()}))
    sink.submit(Record(step=2, metrics={"a": 3.0}))
    assert not sink.close() and sink.pending() == 2
    assert all("health check" in p for p in sink.problems())
    server.start()
    assert replay_spool(tmp_path / "spool") == 2
    client = MlflowClient(server.uri)
    assert [m.value for m in client.get_metric_history(target.run_id, "a")] == [1.0, 2.0, 3.0]
    assert any(
        a.path.startswith("images/pic+step+1+")
        for a in client.list_artifacts(target.run_id, "images")
    )


def _rgb():
    import numpy as np

    return np.zeros((8, 8, 3), dtype=np.uint8)
