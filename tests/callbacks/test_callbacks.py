"""The audit callbacks with a real Lightning Trainer: no perturbation, logging, faults, resume."""

from __future__ import annotations

import logging
import random
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

from audit.callbacks import (
    ActivationMaximizationCallback,
    AttributionCallback,
    AuditWarning,
    SpuriousFeatureCallback,
)
from audit.datasets import snow_wolf
from audit.engine.model import hook_count
from audit.evidence.attribution import collect, summarize
from audit.methods import register
from audit.training import Classifier, SnowWolfDataModule

NET = {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]}


@register("test_broken")
def _broken(model, inputs, target, *, message: str = "broken on purpose"):
    raise RuntimeError(message)


@pytest.fixture(scope="module")
def probes():
    return snow_wolf.probe_set(2, size=32, seed=3)  # 8 probes: 4 groups x 2, masks, pairs


def _module() -> Classifier:
    return Classifier(NET, lr=1e-2)


def _data() -> SnowWolfDataModule:
    return SnowWolfDataModule(n_train=64, n_val=16, correlation=0.9, size=32, seed=0, batch_size=16)


def _trainer(**kw) -> pl.Trainer:
    args = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
    )
    args.update(kw)
    return pl.Trainer(**args)


def _all(probes, **kw):
    return [
        AttributionCallback(
            probes,
            every_n_epochs=1,
            every_n_steps=3,
            module="net",
            strict=True,
            metrics=["deletion", "lerf", "insertion", "relevance_mass"],
            **kw,
        ),
        SpuriousFeatureCallback(probes, module="net", warn_threshold=1.0, strict=True, **kw),
        ActivationMaximizationCallback(
            "features.3", [0, 1], module="net", steps=4, size=32, strict=True, **kw
        ),
    ]


def _fit(callbacks, **kw) -> tuple[Classifier, pl.Trainer]:
    pl.seed_everything(0, workers=True, verbose=False)
    module = _module()
    trainer = _trainer(callbacks=callbacks, **kw)
    trainer.fit(module, datamodule=_data())
    return module, trainer


def _rng_states():
    return torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def own_run_fit(probes, tmp_path_factory, empty_mlflow_store):
    """A plain fit, then the same fit with the three callbacks and no logger (so in their own run), in a
    store of their own: one audited fit for the tests of what it leaves (weights, RNG, run, log, numbers)."""
    folder = tmp_path_factory.mktemp("own-run")
    uri = empty_mlflow_store(folder)
    said, root = _Records(), logging.getLogger()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)
        plain, t_plain = _fit([])
        rng_plain = _rng_states()
        level = root.level
        root.addHandler(said)
        root.setLevel(logging.INFO)
        try:
            audited, t_audit = _fit(_all(probes))
        finally:
            root.removeHandler(said)
            root.setLevel(level)
        rng_audit = _rng_states()
    return {
        "uri": uri,
        "plain": (plain, t_plain, rng_plain),
        "audited": (audited, t_audit, rng_audit),
        "records": said.records,
    }


def test_callbacks_do_not_change_training(own_run_fit):
    plain, t_plain, rng_plain = own_run_fit["plain"]
    audited, t_audit, rng_audit = own_run_fit["audited"]

    a, b = plain.state_dict(), audited.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # parameters and BatchNorm buffers, bitwise
    for p, q in zip(plain.parameters(), audited.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    opt_a = t_plain.optimizers[0].state_dict()["state"]
    opt_b = t_audit.optimizers[0].state_dict()["state"]
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(torch.as_tensor(opt_a[i][k]), torch.as_tensor(opt_b[i][k])), (i, k)
    assert torch.equal(rng_plain[0], rng_audit[0])  # no global RNG draws
    assert (rng_plain[1] == rng_audit[1]).all() and rng_plain[2] == rng_audit[2]
    assert hook_count(audited) == 0 and audited.training == plain.training
    # they did run: attribution by step (every 3 of 8 steps) and by epoch
    att = t_audit.callbacks[0]
    assert (
        isinstance(att, AttributionCallback) and att._passes == 4
    )  # steps 3, 6 + epochs -> global steps 4, 8


def test_logs_into_the_mlflow_logger_run(probes, tracking_uri):
    logger = MLFlowLogger(experiment_name="cb", tracking_uri=tracking_uri)
    run_id = logger.run_id
    _fit(_all(probes), logger=logger)
    client = MlflowClient(tracking_uri)
    assert len(client.search_runs([logger.experiment_id])) == 1  # the logger's run, no other
    run = client.get_run(run_id)
    m = run.data.metrics
    for key in (
        "audit/gradcam/deletion_auc",
        "audit/lrp/insertion_auc",
        "audit/input_x_gradient/relevance_mass",
        "audit/input_x_gradient/outside_mask",
        "audit/probes/accuracy",
        "audit/probes/count",
        "audit/probes/outside_area",
        "audit/spurious/context_gap",
        "audit/spurious/acc/wolf_snow",
        "audit/spurious/flip_rate",
        "audit/spurious/outside_mask/gradcam",
        "audit/actmax/features.3/unit_1",
    ):
        assert key in m, key
    assert run.data.tags["audit.attribution.probe_digest"] == probes.digest
    assert (
        run.data.tags["audit.attribution.gradcam.layer"] == "features"
    )  # Grad-CAM's default, resolved
    assert run.data.tags["audit.spurious.probe_digest"] == probes.digest
    steps = [x.step for x in client.get_metric_history(run_id, "audit/gradcam/deletion_auc")]
    assert steps == [3, 4, 6, 8]  # every_n_steps=3, plus each epoch end; global steps
    spurious = [x.step for x in client.get_metric_history(run_id, "audit/spurious/context_gap")]
    assert spurious == [0, 1]  # epochs
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    for key, step in (("audit~gradcam", 3), ("audit~curves", 8), ("audit~actmax~features.3", 1)):
        assert any(
            p.startswith(f"images/{key}+step+{step}+") and p.endswith(".png") for p in images
        ), (key, images)


def test_logged_numbers_are_the_engine_numbers(probes, own_run_fit):
    module, trainer, _ = own_run_fit["audited"]
    att = trainer.callbacks[0]
    assert (
        isinstance(att, AttributionCallback) and att._passes == 4
    )  # the last one on the final weights
    client = MlflowClient(own_run_fit["uri"])
    run_id = client.search_runs([client.get_experiment_by_name("model-audit").experiment_id])[
        0
    ].info.run_id
    logged = client.get_run(run_id).data.metrics
    again = summarize(collect(module.net, probes), probes)  # the audit job's call, final weights
    for key in ("gradcam/deletion_auc", "lrp/relevance_mass", "input_x_gradient/insertion_auc"):
        assert logged[f"audit/{key}"] == pytest.approx(again[key], abs=1e-6)


def test_own_run_without_a_logger(own_run_fit):
    said = [r for r in own_run_fit["records"] if "has no MLFlowLogger" in r.getMessage()]
    assert len(said) == 1  # once, for all three callbacks
    client = MlflowClient(own_run_fit["uri"])
    runs = client.search_runs([client.get_experiment_by_name("model-audit").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "audit/spurious/context_gap" in runs[0].data.metrics
    assert "audit/gradcam/deletion_auc" in runs[0].data.metrics


def test_a_failing_method_warns_once_and_training_completes(probes, tracking_uri):
    att = AttributionCallback(
        probes,
        methods=["gradcam", "test_broken"],
        module="net",
        log_in_background=False,
        every_n_epochs=1,
    )
    with pytest.warns(AuditWarning) as rec:
        _, trainer = _fit([att], max_epochs=3)
    assert trainer.current_epoch == 3
    about = [w for w in rec if "test_broken" in str(w.message)]
    assert len(about) == 1 and "broken on purpose" in str(about[0].message)
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("model-audit").experiment_id])[0]
    assert [
        m.step for m in client.get_metric_history(run.info.run_id, "audit/gradcam/deletion_auc")
    ] == [0, 1, 2]
    assert not any(k.startswith("audit/test_broken") for k in run.data.metrics)


def test_a_failing_pass_is_skipped_not_fatal(probes, tracking_uri, monkeypatch):
    att = AttributionCallback(probes, module="net", log_in_background=False)
    calls = {"n": 0}
    original = AttributionCallback._compute

    def flaky(self, trainer, model):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("out of memory in the audit")
        return original(self, trainer, model)

    monkeypatch.setattr(AttributionCallback, "_compute", flaky)
    with pytest.warns(AuditWarning, match="out of memory in the audit"):
        _, trainer = _fit([att])
    assert trainer.current_epoch == 2 and att._passes == 2
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("model-audit").experiment_id])[0]
    assert [
        m.step for m in client.get_metric_history(run.info.run_id, "audit/lrp/deletion_auc")
    ] == [1]


def test_spurious_warns_and_stops_only_when_asked(probes, tracking_uri):
    watch = SpuriousFeatureCallback(
        probes, module="net", monitor="outside_mask", warn_threshold=0.0, every_n_epochs=1
    )
    with pytest.warns(AuditWarning, match="outside the object masks") as rec:
        _, trainer = _fit([watch], max_epochs=3)
    assert trainer.current_epoch == 3  # warnings never stop training
    assert (
        len([w for w in rec if "outside the object masks" in str(w.message)]) == 1
    )  # once, not per audit
    assert len(watch._history) == 3  # while every audit is logged

    stopper = SpuriousFeatureCallback(
        probes,
        module="net",
        monitor="outside_mask",
        stop_threshold=0.0,
        patience=2,
        every_n_epochs=1,
    )
    with pytest.warns(AuditWarning, match="stopping training"):
        _, trainer = _fit([stopper], max_epochs=5)
    assert trainer.current_epoch == 2  # stopped after the 2nd consecutive audit above the threshold
    assert stopper.state_dict()["over"] == 2


def test_resume_continues_the_series(probes, tracking_uri, tmp_path):
    def callbacks():
        return [
            AttributionCallback(probes, module="net", log_in_background=False, every_n_epochs=1),
            SpuriousFeatureCallback(
                probes, module="net", stop_threshold=1.0, patience=3, every_n_epochs=1
            ),
        ]

    class StopAfterTwoEpochs(pl.Callback):  # an interrupted run: same schedule, stops early
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    first = callbacks()
    _, trainer = _fit([*first, StopAfterTwoEpochs()], max_epochs=4)
    assert trainer.current_epoch == 2
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    saved = state[first[0].state_key]
    assert saved["passes"] == 2 and saved["last_step"] == 1 and saved["own_run_id"]
    assert state[first[1].state_key]["history"][-1][0] == 1

    second = callbacks()
    pl.seed_everything(0, workers=True, verbose=False)
    _trainer(callbacks=second, max_epochs=4).fit(_module(), datamodule=_data(), ckpt_path=ckpt)
    assert second[0]._passes == 4 and second[0]._last_step == 3
    assert [s for s, _ in second[1]._history] == [0, 1, 2, 3]

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("model-audit").experiment_id])
    assert len(runs) == 1  # the resumed fit logged into the same own run
    run_id = runs[0].info.run_id
    assert run_id == saved["own_run_id"]
    for key in ("audit/gradcam/deletion_auc", "audit/spurious/context_gap"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1, 2, 3], key


def test_skips_sanity_check_and_fast_dev_run(probes, tracking_uri):
    att = AttributionCallback(probes, module="net", strict=True)
    _fit([att], fast_dev_run=True)
    assert att._passes == 0
    att = AttributionCallback(probes, module="net", strict=True)
    _fit([att], max_epochs=1, num_sanity_val_steps=2)
    assert att._passes == 1


def test_long_passes_show_in_the_log(probes, tracking_uri, caplog, monkeypatch):
    monkeypatch.setattr("audit.callbacks._base.PROGRESS_AFTER_S", 0.0)
    with caplog.at_level(logging.INFO):
        _fit([AttributionCallback(probes, module="net", strict=True)], max_epochs=1)
    text = caplog.text
    # the first pass by budget may stop early (a probe per group at a time): "up to"
    assert (
        "AttributionCallback: auditing epoch 0 (up to 8 probes within its share of the budget, gradcam, "
        "input_x_gradient, lrp) ..." in text
    )
    assert "AttributionCallback: epoch 0 audited in" in text


def test_arguments_are_checked_early(probes, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'gradkam'; valid methods are: .*gradcam"):
        AttributionCallback(probes, methods=["gradkam"])
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        AttributionCallback(probes, metrics=["auc"])
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer"):
        AttributionCallback(probes, every_n_epochs=0)
    with pytest.raises(ValueError, match="does not exist"):
        AttributionCallback(tmp_path / "missing")
    with pytest.raises(ValueError, match="monitor must be one of"):
        SpuriousFeatureCallback(probes, monitor="accuracy")
    with pytest.raises(ValueError, match="share in \\[0, 1\\]"):
        SpuriousFeatureCallback(probes, warn_threshold=3)
    with pytest.raises(ValueError, match="units must be a non-empty list"):
        ActivationMaximizationCallback("features.3", [])


def test_environment_errors_name_the_fix(probes, tracking_uri):
    no_masks = snow_wolf.probe_set(2, size=32, seed=3)
    no_masks.masks = None
    with pytest.raises(ValueError, match="need object masks .* drop them from metrics"):
        _fit([AttributionCallback(no_masks, module="net")], max_epochs=1)
    three = snow_wolf.probe_set(2, size=32, seed=3)
    three.class_names = ["wolf", "husky", "fox"]
    with pytest.raises(ValueError, match="3 classes .* the model has 2 outputs"):
        _fit([AttributionCallback(three, module="net")], max_epochs=1)
    with pytest.raises(
        ValueError, match="layer 'features.30' not found; .*conv layers are: features.0"
    ):
        _fit([ActivationMaximizationCallback("features.30", [0], module="net")], max_epochs=1)


def test_probe_folder_and_state_keys(probes, tmp_path, tracking_uri):
    folder = snow_wolf.probe_set(1, size=32, seed=4).save(tmp_path / "probes")
    a = AttributionCallback(folder, module="net", methods=["gradcam"], log_in_background=False)
    b = AttributionCallback(folder, module="net", methods=["saliency"], log_in_background=False)
    assert a.state_key != b.state_key
    with warnings.catch_warnings():
        warnings.simplefilter("error", AuditWarning)
        _fit([a, b], max_epochs=1)
    assert a.probes is not None and len(a.probes) == 4
