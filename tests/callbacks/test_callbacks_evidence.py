"""The engine behind the callbacks (audit.evidence), its pictures (audit.report.pictures) and its logging (audit.gate.tracking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from audit.datasets import snow_wolf
from audit.engine.model import hook_count
from audit.engine.rows import pick_rows
from audit.evidence.attribution import Evidence, collect, inference_copy, summarize
from audit.evidence.behaviour import context_gaps, group_accuracy
from audit.gate.tracking import EvidenceSink, Record, RunTarget, replay_spool
from audit.models import SmallCNN
from audit.report.pictures import curve_plot, heatmap, image_grid, overlay_grid


@pytest.fixture(scope="module")
def probes():
    return snow_wolf.probe_set(2, size=32, seed=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = SmallCNN(num_classes=2, widths=[8, 16])
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them matters
        for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m.train()


def _state(m: nn.Module):
    return {k: v.clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()]


def test_collect_restores_the_model_and_is_deterministic(model, probes):
    before, flags = _state(model)
    a = collect(
        model, probes, metrics=("deletion", "insertion", "relevance_mass", "random_reference")
    )
    after, flags_after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and flags == flags_after
    assert hook_count(model) == 0 and all(p.grad is None for p in model.parameters())
    b = collect(
        model, probes, metrics=("deletion", "insertion", "relevance_mass", "random_reference")
    )
    for m in a.scores:
        for k in a.scores[m]:
            torch.testing.assert_close(
                a.scores[m][k], b.scores[m][k], rtol=0, atol=0, equal_nan=True
            )
    assert set(a.maps) == {"gradcam", "input_x_gradient", "lrp"} and a.maps["lrp"].shape == (
        8,
        1,
        32,
        32,
    )
    assert a.curves["gradcam"]["deletion"].shape == (8, 17) and "random" in a.curves
    assert a.fast


def test_shards_gathered_equal_the_whole(model, probes):
    whole = collect(model, probes)
    parts = [collect(model, probes, rows=range(r, 8, 3)).keep_maps([0, 5]).cpu() for r in (2, 0, 1)]
    joined = Evidence.cat(parts)
    assert joined.index.tolist() == list(range(8)) and joined.map_index.tolist() == [0, 5]
    assert torch.equal(joined.logits, whole.logits)
    # Per-probe results do not depend on the shard, up to float rounding: gradients of a
    # batch differ from those of a sub-batch by ~1e-10, which can swap near-tied pixels
    # in a deletion ranking (seen: 2.5e-4 in one saliency curve point).
    for m in whole.scores:
        for k in whole.scores[m]:
            torch.testing.assert_close(
                joined.scores[m][k], whole.scores[m][k], rtol=0, atol=1e-3, equal_nan=True
            )
    torch.testing.assert_close(joined.maps["lrp"], whole.maps["lrp"][[0, 5]], rtol=0, atol=1e-6)
    assert summarize(joined, probes) == pytest.approx(
        summarize(whole, probes), abs=1e-3, nan_ok=True
    )


def test_the_folded_copy_matches_and_leaves_the_model_alone(model, probes):
    x = probes.images
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x)
        fast = inference_copy(model, x, ref)
        assert fast is not None
        with torch.no_grad():
            assert torch.allclose(fast(x), ref, atol=1e-5)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 0  # folded
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2  # untouched
        assert all(
            p.data_ptr() != q.data_ptr() for p in model.parameters() for q in fast.parameters()
        )
        assert inference_copy(model, x, ref + 1.0) is None  # a copy that disagrees is refused
    finally:
        model.train()
    fast_ev, slow_ev = collect(model, probes), collect(model, probes, fast=False)
    assert not slow_ev.fast
    for m in fast_ev.scores:
        assert torch.allclose(
            fast_ev.scores[m]["deletion"], slow_ev.scores[m]["deletion"], atol=1e-4
        )


def test_collect_under_inference_mode(model, probes):
    with torch.inference_mode():
        ev = collect(model, probes, ["gradcam"], ["deletion"])
    assert (
        not ev.maps["gradcam"].is_inference()
        and torch.isfinite(ev.scores["gradcam"]["deletion"]).all()
    )


def test_errors_raise_or_are_recorded(model, probes):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        collect(model, probes, ["nope"])
    plain = snow_wolf.probe_set(1, size=32, seed=3)
    plain.masks = None
    with pytest.raises(ValueError, match="need object masks"):
        collect(model, plain, ["gradcam"], ["relevance_mass"])
    opts = {"gradcam": {"layer": "no.such.layer"}}
    with pytest.raises(Exception, match="layer 'no.such.layer' not found"):
        collect(model, probes, ["gradcam", "saliency"], method_options=opts)
    ev = collect(model, probes, ["gradcam", "saliency"], method_options=opts, on_error="record")
    assert "not found" in ev.errors["gradcam"] and ev.methods == ["saliency"]
    joined = Evidence.cat(
        [ev.cpu(), collect(model, probes, ["gradcam", "saliency"], rows=[]).cpu()]
    )
    assert "gradcam" in joined.errors and "gradcam" not in joined.scores


def test_summary_numbers_are_the_behaviour_numbers(model, probes):
    ev = collect(model, probes, ["gradcam"], ["relevance_mass"])
    s = summarize(ev, probes)
    accs = group_accuracy(probes, ev.predictions)
    for g, a in accs.items():
        assert s[f"acc/{g}"] == a.accuracy
    for c, (worst, best) in context_gaps(accs).items():
        assert s[f"context_gap/{c}"] == best.accuracy - worst.accuracy
    assert s["gradcam/outside_mask"] == pytest.approx(1 - s["gradcam/relevance_mass"])
    assert s["outside_area"] == pytest.approx(1 - probes.masks.float().mean().item())
    assert 0.0 <= s["flip_rate"] <= 1.0


def test_pictures():
    rng = np.random.default_rng(0)
    images = rng.random((5, 3, 16, 16)).astype(np.float32)
    maps = rng.standard_normal((5, 1, 16, 16)).astype(np.float32)
    g = overlay_grid(
        images, maps, ["a"] * 5, ["a", "b", "a", "b", "a"], ["x"] * 5, ncols=2, title="t"
    )
    assert (
        isinstance(g, Image.Image)
        and g.mode == "RGB"
        and g.size[0] == 6 + 2 * (2 * (16 + 2 + 16) + 6)
    )
    signed, positive = heatmap(maps), heatmap(np.abs(maps))
    assert signed.shape == (5, 16, 16, 3) and signed.dtype == np.uint8
    assert not np.array_equal(signed, positive)
    flat = heatmap(np.zeros((1, 1, 4, 4)))
    assert (flat == flat[0, 0, 0]).all()  # a constant map is one colour
    curves = {
        "gradcam": {
            "deletion": np.linspace(1, 0, 17)[None].repeat(3, 0),
            "insertion": np.linspace(0, 1, 17),
        }
    }
    assert curve_plot({**curves, "random": {"deletion": np.full(17, 0.5)}}).size[0] > 300
    assert image_grid(images, ["u0", "u1", "u2", "u3", "u4"], ncols=5).size[1] > 32
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    assert pick_rows(8, 3, groups) == [0, 3, 6] and pick_rows(8, 4, groups) == [0, 1, 3, 6]
    assert pick_rows(8, 4) == [0, 2, 4, 6] and pick_rows(3, 16) == [0, 1, 2]


def test_sink_logs_and_spools(tmp_path, empty_mlflow_store):
    uri = empty_mlflow_store(tmp_path, "db.sqlite")
    target = RunTarget(uri, experiment_name="sink", run_name="r")
    sink = EvidenceSink(target)
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    sink.submit(
        Record(step=3, metrics={"x/a|b": 0.5}, tags={"t": "v"}, render=lambda: {"pic/one": img})
    )
    assert sink.close() and sink.problems() == []
    client = MlflowClient(uri)
    run = client.get_run(target.run_id)
    assert run.data.metrics == {"x/a_b": 0.5} and run.data.tags["t"] == "v"
    assert run.data.tags["mlflow.runName"] == "r"
    assert any(
        a.path.startswith("images/pic~one+step+3+")
        for a in client.list_artifacts(target.run_id, "images")
    )

    # an unreachable server: everything stays in the spool, in order, and can be sent later
    dead = RunTarget("http://127.0.0.1:9", run_id=target.run_id)
    spool = tmp_path / "spool"
    sink = EvidenceSink(dead, spool, health_timeout=0.5)
    sink.submit(Record(step=4, metrics={"x/a_b": 0.25}, render=lambda: {"pic/one": img}))
    sink.submit(Record(step=5, metrics={"x/a_b": 0.125}))
    assert not sink.close() and sink.pending() == 2
    problems = sink.problems()
    assert problems and "does not answer its health check" in problems[0]
    assert replay_spool(spool, uri=uri) == 2
    assert [m.step for m in client.get_metric_history(target.run_id, "x/a_b")] == [3, 4, 5]


def test_a_render_failure_keeps_the_metrics(tmp_path, empty_mlflow_store):
    uri = empty_mlflow_store(tmp_path, "db.sqlite")
    sink = EvidenceSink(RunTarget(uri), background=False)

    def broken():
        raise ValueError("no picture")

    sink.submit(Record(step=0, metrics={"m": 1.0}, render=broken))
    assert "no picture" in sink.problems()[0]
    assert MlflowClient(uri).get_run(sink.target.run_id).data.metrics == {"m": 1.0}


# ----------------------------------------------------------------- one definition per number
def test_a_callback_run_and_an_audit_run_log_the_same_numbers_under_the_same_names(
    probes, tracking_uri
):
    """Same weights, same probes: the training run's ``audit/<m>/<name>`` is the audit run's ``<m>/<name>``."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import MLFlowLogger

    from audit.callbacks import AttributionCallback
    from audit.pipeline import run_audit
    from audit.training import Classifier, SnowWolfDataModule

    pl.seed_everything(0, workers=True, verbose=False)
    module = Classifier(
        {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]}, lr=1e-2
    )
    logger = MLFlowLogger(experiment_name="same-numbers", tracking_uri=tracking_uri)
    cb = AttributionCallback(probes, every_n_epochs=1, module="net", render=0, strict=True)
    assert (cb.steps, cb.baseline) == (16, "zero")  # the engine's (conf/engine/default.yaml)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[cb],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = SnowWolfDataModule(n_train=32, n_val=16, correlation=0.9, size=32, seed=0, batch_size=16)
    trainer.fit(module, datamodule=data)  # the pass at the end of the epoch sees the final weights
    logged = MlflowClient(tracking_uri).get_run(logger.run_id).data.metrics

    engine = {"attribution_probes": len(probes), "sanity_probes": 0, "max_batch": cb.max_batch}
    audited = run_audit(module.net, probes, {"engine": engine}).metrics
    for m in ("gradcam", "input_x_gradient", "lrp"):
        for name in ("deletion_auc", "lerf_auc", "srg", "relevance_mass"):
            assert logged[f"audit/{m}/{name}"] == pytest.approx(audited[f"{m}/{name}"], abs=1e-6), (
                m,
                name,
            )
        assert f"{m}/srg/low" in audited  # the gate's interval, next to the shared mean


def test_other_curve_settings_get_other_names(model, probes):
    ev = collect(
        model, probes, ["gradcam"], ["deletion", "lerf", "insertion"], steps=8, baseline="blur"
    )
    s = summarize(ev, probes)
    assert {
        "gradcam/deletion_auc.blur.s8",
        "gradcam/lerf_auc.blur.s8",
        "gradcam/srg.blur.s8",
    } <= set(s)
    assert not {"gradcam/deletion_auc", "gradcam/srg"} & set(s)
    s = summarize(collect(model, probes, ["gradcam"], ["deletion", "lerf"]), probes)
    assert s["gradcam/srg"] == pytest.approx(
        s["gradcam/lerf_auc"] - s["gradcam/deletion_auc"], abs=1e-6
    )
    from audit.callbacks import AttributionCallback

    with pytest.raises(ValueError, match="baseline must be one of"):
        AttributionCallback(probes, baseline="black")
