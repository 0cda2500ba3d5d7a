"""The callbacks' time budget (max_overhead), the spurious callback's interval warnings, quiet warnings.

Timing is made unambiguous instead of measured finely: an explainer that sleeps makes a
pass cost a known 0.15 s or more, and a LightningModule that sleeps in each training
step makes an epoch cost a known time, so "the budget allows it" is never a close call
(the ratios below are 5x or more away from the threshold either way).
"""

from __future__ import annotations

import linecache
import re
import time
import warnings

import pytest
import pytorch_lightning as pl
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

from audit.callbacks import AttributionCallback, AuditWarning, SpuriousFeatureCallback
from audit.callbacks._base import emit_warning
from audit.datasets import snow_wolf
from audit.methods import register
from audit.methods.gradients import saliency
from audit.training import Classifier, SnowWolfDataModule

NET = {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]}
SLEEP = {"pass": 0.0}


@register("test_sleepy")
def _sleepy(model, inputs, target):
    time.sleep(SLEEP["pass"])
    return saliency(model, inputs, target)


class _SlowSteps(Classifier):
    """A classifier whose every training step also sleeps (a known epoch cost)."""

    def __init__(self, sleep: float) -> None:
        super().__init__(NET, lr=1e-2)
        self.sleep = sleep

    def training_step(self, batch, batch_idx):
        time.sleep(self.sleep)
        return super().training_step(batch, batch_idx)


class _StopAfter(pl.Callback):
    """Asks training to stop at the end of one epoch, after the audit callbacks' hook ran."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def probes():
    return snow_wolf.probe_set(2, size=32, seed=3)  # 8 probes: 4 groups x 2, masks, pairs


def _fit(callbacks, *, step_sleep: float, pass_sleep: float, max_epochs: int, logger=False):
    SLEEP["pass"] = pass_sleep
    pl.seed_everything(0, workers=True, verbose=False)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=callbacks,
    )
    data = SnowWolfDataModule(n_train=32, n_val=8, correlation=0.9, size=32, seed=0, batch_size=16)
    trainer.fit(_SlowSteps(step_sleep), datamodule=data)
    return trainer


def _attribution(probes, **kw):
    return AttributionCallback(
        probes,
        methods=["test_sleepy"],
        metrics=["deletion"],
        render=0,
        module="net",
        strict=True,
        **kw,
    )


def _steps(uri, run_id, key):
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_expensive_passes_audit_only_the_first_and_final_epochs(probes, tracking_uri, caplog):
    # a pass costs >= 0.15 s, an epoch ~0.04 s: the budget of 10% never allows a pass between
    logger = MLFlowLogger(experiment_name="budget", tracking_uri=tracking_uri)
    att = _attribution(probes)
    # beside it, a cheap callback on a fixed cadence: outside the budget's decisions, inside its share
    spu = SpuriousFeatureCallback(probes, method=None, module="net", every_n_epochs=1, strict=True)
    with caplog.at_level("INFO"):
        _fit([spu, att], step_sleep=0.02, pass_sleep=0.15, max_epochs=5, logger=logger)
    assert _steps(tracking_uri, logger.run_id, "audit/test_sleepy/deletion_auc") == [0, 4]
    assert att._skipped == [1, 2, 3]
    said = [r.getMessage() for r in caplog.records if "not audited" in r.getMessage()]
    assert len(said) == 1 and "epoch 1 not audited" in said[0] and "max_overhead=0.1" in said[0]
    # the shares are logged: this callback's with each pass, everyone's once at the end
    run = MlflowClient(tracking_uri).get_run(logger.run_id)
    assert _steps(tracking_uri, logger.run_id, "audit/overhead/attribution") == [0, 4]
    assert _steps(tracking_uri, logger.run_id, "audit/overhead/total") == [4]
    assert (
        run.data.metrics["audit/overhead/total"] > 0.1
    )  # 2 passes of >= 0.15 s against ~0.2 s of training steps
    over = [r.getMessage() for r in caplog.records if "above max_overhead=0.1" in r.getMessage()]
    assert len(over) == 1 and "first and final passes alone" in over[0]
    # said early too, once, right after the first pass, with the share to expect
    lines = [r.getMessage() for r in caplog.records]
    early = [i for i, line in enumerate(lines) if "too short for max_overhead=0.1" in line]
    assert len(early) == 1
    assert early[0] == 1 + next(
        i for i, line in enumerate(lines) if "AttributionCallback: epoch 0 audited" in line
    )
    expected = float(re.search(r"take about (\d+)% of it", lines[early[0]]).group(1)) / 100
    # the final pass costs what the first did: the projection is the share the fit ended with, within 2x
    assert 0.5 < expected / run.data.metrics["audit/overhead/total"] < 2.0


def test_cheap_passes_audit_every_epoch_within_budget(probes, tracking_uri, caplog):
    # a pass costs 0.1-0.6 s (8 probes, one method, its own MLflow run; several times that on
    # a loaded machine, and the run's creation counts too), an epoch > 1 s: a budget of 20x
    # buys a pass every epoch with room to spare
    att = _attribution(probes, max_overhead=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AuditWarning)  # no "above max_overhead"
        with caplog.at_level("INFO"):
            trainer = _fit([att], step_sleep=0.5, pass_sleep=0.0, max_epochs=4)
    assert not [r for r in caplog.records if "too short for max_overhead" in r.getMessage()]
    assert att._passes == 4 and att._skipped == []
    assert att._budget.share() < 20.0
    assert trainer.current_epoch == 4


def test_budget_is_shared_by_every_callback_of_the_trainer(probes, tracking_uri):
    # epochs of ~0.24 s (budget 0.024 s each), attribution 0.15 s per pass: it waits ~6 epochs
    # between passes and the cheap spurious callback still audits every epoch
    att = _attribution(probes)
    spu = SpuriousFeatureCallback(probes, method=None, module="net", strict=True)
    _fit([att, spu], step_sleep=0.12, pass_sleep=0.15, max_epochs=8)
    assert att._budget is spu._budget
    assert att.pass_seconds and min(att.pass_seconds) >= 0.15
    assert len(att.pass_seconds) < 8 and att._skipped  # first, final and whatever fitted between
    assert att._last_step == 7  # the final weights
    total = sum(att.pass_seconds) + sum(spu.pass_seconds)
    assert att._budget.spent == pytest.approx(total)


def test_a_fixed_cadence_ignores_the_budget(probes, tracking_uri):
    att = _attribution(probes, every_n_epochs=1)
    spu = SpuriousFeatureCallback(probes, method=None, module="net", every_n_epochs=2, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AuditWarning)  # no budget warning for a cadence the user set
        _fit([att, spu], step_sleep=0.0, pass_sleep=0.05, max_epochs=4)
    assert att._passes == 4 and att._skipped == []
    assert spu._passes == 2 and spu._last_step == 3  # epochs 1 and 3


def test_training_stopped_after_the_hook_still_audits_the_final_weights(probes, tracking_uri):
    logger = MLFlowLogger(experiment_name="stop", tracking_uri=tracking_uri)
    att = _attribution(probes, max_overhead=1e-3)  # nothing between first and final
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AuditWarning)
        trainer = _fit(
            [att, _StopAfter(2)], step_sleep=0.0, pass_sleep=0.0, max_epochs=10, logger=logger
        )
    assert trainer.current_epoch == 3
    # epoch 2's end was not known to be the last when the callback's hook ran: on_train_end audits it
    assert _steps(tracking_uri, logger.run_id, "audit/test_sleepy/deletion_auc") == [0, 2]


def test_max_overhead_is_checked(probes):
    for bad in (0, -0.1, True, "10%", float("inf")):
        with pytest.raises(ValueError, match="max_overhead"):
            AttributionCallback(probes, max_overhead=bad)
    assert AttributionCallback(probes, max_overhead=None).max_overhead is None
    assert (
        AttributionCallback(probes).budgeted
        and not AttributionCallback(probes, every_n_steps=5).budgeted
    )


# ---------------------------------------------------------------------- spurious: intervals, not points
def _summary(groups, pairs=None, paired=None):
    beh = {"groups": groups}
    if pairs is not None:
        beh["pairs"] = pairs
    if paired is not None:
        beh["paired"] = paired
    return {"_behaviour": beh, "context_gap": 0.0}


def _table(a, b, c, d, groups=("wolf|snow", "wolf|grass")):
    return {"groups": list(groups), "a": a, "b": b, "c": c, "d": d}


def test_spurious_warns_on_the_interval_not_the_point(probes):
    spu = SpuriousFeatureCallback(probes, warn_threshold=0.05)
    # 16 pairs: right on snow 16, on grass 14 -> a raw gap of 0.125, above 0.05, but 2 discordant
    # pairs cannot show it: the lower bound is below 0.05
    small = _summary(
        {"wolf|snow": {"correct": 16, "n": 16}, "wolf|grass": {"correct": 14, "n": 16}},
        paired=[_table(14, 2, 0, 0)],
    )
    assert spu._shown_above(small, 0.05) is None
    # 16 pairs, every one right on snow and wrong on grass: shown
    big = _summary(
        {"wolf|snow": {"correct": 16, "n": 16}, "wolf|grass": {"correct": 0, "n": 16}},
        paired=[_table(0, 16, 0, 0)],
    )
    cls, text = spu._shown_above(big, 0.05)
    assert cls == "wolf" and "lower bound" in text and "wolf|grass" in text
    assert spu._context_gap_low(big) > 0.7 and spu._context_gap_low(small) < 0.05


def test_spurious_flip_rate_and_outside_mask_intervals(probes):
    spu = SpuriousFeatureCallback(probes, monitor="flip_rate")
    groups = {"wolf|snow": {"correct": 8, "n": 8}}
    assert spu._shown_above(_summary(groups, pairs={"flipped": 1, "total": 8}), 0.05) is None
    assert (
        spu._shown_above(_summary(groups, pairs={"flipped": 8, "total": 8}), 0.05)[0] == "flip_rate"
    )
    spu = SpuriousFeatureCallback(probes, monitor="outside_mask")
    wide = {**_summary(groups), "_outside": [0.2, 0.99, 0.5, 0.9], "outside_area": 0.9}
    tight = {**_summary(groups), "_outside": [0.95, 0.96, 0.97, 0.96], "outside_area": 0.9}
    assert spu._shown_above(wide, 0.9) is None and spu._shown_above(tight, 0.9)[0] == "outside_mask"


def test_spurious_warns_once_per_class_on_a_leaning_model(probes, tracking_uri):
    # a model trained on a perfectly correlated background leans on it; with a warn threshold
    # the first readings shown above it warn, once per class, and later ones only log
    spu = SpuriousFeatureCallback(
        snow_wolf.probe_set(16, size=32, seed=3),
        method=None,
        module="net",
        warn_threshold=0.05,
        every_n_epochs=1,
    )
    pl.seed_everything(0, workers=True, verbose=False)
    trainer = pl.Trainer(
        max_epochs=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[spu],
    )
    data = SnowWolfDataModule(
        n_train=256, n_val=16, correlation=1.0, size=32, seed=0, batch_size=32
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(Classifier(NET, lr=1e-2), datamodule=data)
    mine = [w for w in rec if issubclass(w.category, AuditWarning)]
    keys = [k for k in spu._warned if k.startswith("spurious:")]
    assert mine, "a model trained with rho 1.0 shows a context gap"
    assert len(mine) == len(keys) <= 2  # at most once per class
    assert all(w.filename == "model-audit" for w in mine)


def test_warnings_carry_no_source_line():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        emit_warning("something to say")
    (w,) = rec
    assert w.category is AuditWarning and w.filename == "model-audit"
    text = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
    assert text == "model-audit:0: AuditWarning: something to say\n"
    assert linecache.getline(w.filename, w.lineno) == ""


def test_passes_explain_a_fixed_subset_and_the_final_weights_every_probe(probes, tracking_uri):
    from audit.evidence.attribution import collect, summarize

    logger = MLFlowLogger(experiment_name="subset", tracking_uri=tracking_uri)
    att = AttributionCallback(
        probes,
        methods=["gradcam"],
        module="net",
        strict=True,
        every_n_epochs=1,
        pass_probes=4,
        render=2,
    )
    trainer = _fit([att], step_sleep=0.0, pass_sleep=0.0, max_epochs=3, logger=logger)
    client = MlflowClient(tracking_uri)
    assert [
        (m.step, m.value) for m in client.get_metric_history(logger.run_id, "audit/probes/count")
    ] == [
        (0, 4.0),
        (1, 4.0),
        (2, 8.0),
    ]
    assert att._pass_rows is not None and set(att._rows) <= set(
        att._pass_rows
    )  # rendered from the pass's probes
    assert sorted(probes.groups[att._pass_rows].tolist()) == [
        0,
        1,
        2,
        3,
    ]  # spread over the 4 groups
    # the final pass: the gate's numbers on the whole probe set, final weights
    again = summarize(
        collect(trainer.lightning_module.net, probes, ["gradcam"], ["deletion", "lerf"]), probes
    )
    logged = client.get_run(logger.run_id).data.metrics
    assert logged["audit/gradcam/srg"] == pytest.approx(again["gradcam/srg"], abs=1e-6)
    # its cost estimate scales the computing part with the probes: the final pass is not priced as a subset pass
    assert att._units(final=True) == 8 and att._units(final=False) == 4
    with pytest.raises(ValueError, match="pass_probes"):
        AttributionCallback(probes, pass_probes=0)


def test_turns_are_fair_a_cheap_callback_leaves_room_for_a_waiting_dear_one():
    # The decision rule on known numbers: 10 s trained of a projected 20 s, budget 0.1.
    # A's between pass costs 0.5 s, B's 0.1 s; their final passes 0.6 s and 0.1 s are held back.
    from types import SimpleNamespace

    from audit.callbacks._base import AuditCallback, _Budget

    budget = _Budget()
    dear, cheap = AuditCallback(), AuditCallback()
    for cb, cost in ((dear, 0.5), (cheap, 0.1)):
        cb._budget, cb._fit_passes = budget, 1
        cb.pass_seconds, cb._pass_compute, cb._pass_units = [cost], [cost], [1]
        budget.estimates[id(cb)] = cost + (0.1 if cb is dear else 0.0)
    budget.spent = 0.6 + 0.1  # their first passes
    budget.start = time.perf_counter() - 10.0 - budget.spent
    half = SimpleNamespace(estimated_stepping_batches=80, global_step=40)
    assert not dear._affordable(half)  # 0.7 + 0.5 > 1.0 allowed now
    # alone, the cheap pass would fit (0.8 <= 1.0, 0.8 + 0.7 <= 2.0); it waits for the dear one
    assert not cheap._affordable(half)
    assert set(budget.waiting) == {id(dear), id(cheap)}
    # 4.5 s later (14.5 s of a projected 20.7 s): both fit now, the dear one first
    budget.start -= 4.5
    later = SimpleNamespace(estimated_stepping_batches=80, global_step=56)
    assert dear._affordable(later) and id(dear) not in budget.waiting
    # a waiting pass that can never fit the whole training's budget holds nobody back
    budget.waiting = {id(dear): (1, 5.0)}
    assert cheap._affordable(later)


@pytest.mark.parametrize("max_overhead, explained", [(0.1, [4.0, 4.0]), (1000.0, [8.0, 8.0])])
def test_the_final_pass_explains_every_probe_unless_the_budget_is_spent_and_says_so(
    probes, tracking_uri, caplog, max_overhead, explained
):
    # The documented rule (docs/callbacks.md, README): the final weights' pass explains every probe
    # unless what is left of the budget cannot pay for them; then it explains N (a probe per group at
    # a time, at least one such chunk) and says so: a log line and audit/probes/left_out.
    # One chunk (a probe per group: 4 of the 8) costs >= 0.3 s against epochs of ~0.04 s:
    # with 0.1 the first and final passes stop after one chunk; with a large budget they explain all 8.
    logger = MLFlowLogger(experiment_name="allowance", tracking_uri=tracking_uri)
    att = _attribution(probes, pass_probes=None, max_overhead=max_overhead)
    with caplog.at_level("INFO"):
        _fit([att], step_sleep=0.02, pass_sleep=0.3, max_epochs=3, logger=logger)
    client = MlflowClient(tracking_uri)
    count = {
        m.step: m.value for m in client.get_metric_history(logger.run_id, "audit/probes/count")
    }
    left = {
        m.step: m.value for m in client.get_metric_history(logger.run_id, "audit/probes/left_out")
    }
    assert [count[0], count[2]] == explained  # (a large budget also audits epoch 1)
    assert [left[0], left[2]] == [8.0 - n for n in explained]
    said = [
        r.getMessage() for r in caplog.records if "final weights' pass explained" in r.getMessage()
    ]
    if explained[0] < 8:
        # every chunk is spread over the groups, and the cost estimate counts the probes done
        assert att._pass_units == [4, 4]
        (line,) = said
        assert (
            "4 of 8 probes" in line
            and "max_overhead=0.1" in line
            and "audit/probes/left_out" in line
        )
        assert "not the gate's" in line
    else:
        assert said == []
