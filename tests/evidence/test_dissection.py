"""Network dissection (audit.evidence.dissection, audit.rules.dissection): known answers, guarantees, audit and report."""

from __future__ import annotations

import copy
import html
import json

import pytest
import torch
from torch import nn

from audit.config import AuditConfigError
from audit.datasets import snow_wolf
from audit.engine.model import AttributionError, hook_count
from audit.evidence.dissection import Dissection, dissect, dissection_raw, probe_contexts, to_raw
from audit.models import SmallCNN
from audit.pipeline import run_audit
from audit.probes import ProbeSet
from audit.report.write import render_html, render_markdown
from audit.rules import decide
from audit.rules import dissection as rules

SIZE = 16


class _Regions(nn.Module):
    """Unit 0 = the red channel (the object is red), unit 1 = the green channel (the
    background), unit 2 = the blue channel (noise), unit 3 dead; GAP + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1, bias=False)
        with torch.no_grad():
            w = torch.zeros(4, 3, 1, 1)
            w[0, 0] = w[1, 1] = w[2, 2] = 1.0
            self.features.weight.copy_(w)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[2.0, 0.0, 0.1, 0.5], [0.0, 3.0, 0.1, 0.5]]))
            self.fc.bias.copy_(torch.tensor([0.3, -0.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.features(x))).flatten(1))


def _region_probes(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)
    for i in range(n):
        top, left = torch.randint(0, SIZE - 8, (2,), generator=g).tolist()
        masks[i, 0, top : top + 8, left : left + 8] = True  # a quarter of the image
    x = torch.zeros(n, 3, SIZE, SIZE)
    x[:, 0] = masks[:, 0].float()
    x[:, 1] = (~masks[:, 0]).float()
    x[:, 2] = torch.rand(n, SIZE, SIZE, generator=g)
    labels = torch.arange(n) % 2
    return x, masks, labels


def test_known_answer_object_and_background_units():
    x, masks, labels = _region_probes()
    d = dissect(_Regions(), x, masks, labels, quantile=0.2)
    # the maps are at the masks' size: upsampling is the identity, the regions are exact
    assert d.iou_object[0] == pytest.approx(1.0)
    assert d.iou_context[0] == pytest.approx(0.0)
    assert d.iou_context[1] == pytest.approx(1.0)
    assert d.iou_object[1] == pytest.approx(0.0)
    assert d.iou_contexts.shape == (1, 4) and d.contexts == ["context"]
    # noise: its top fifth lies on the object about as often as the object's area says
    assert 0.05 < float(d.iou_object[2]) < 0.3
    assert (
        float(d.iou_object[3]) == 0.0 and float(d.iou_context[3]) == 0.0
    )  # dead: its floor never fires
    assert d.context_units() == [1]
    assert d.exact


def test_gap_linear_share_is_exact():
    x, masks, labels = _region_probes()
    model = _Regions()
    d = dissect(model, x, masks, labels)
    with torch.no_grad():
        mean = model.relu(model.features(x)).mean(dim=(2, 3))  # [N, K]
        w = model.fc.weight
    assert d.completeness_error < 1e-6
    for c in range(2):
        rows = labels == c
        contrib = (w[c] * mean[rows]).clamp_min(0).sum(dim=0).double()
        torch.testing.assert_close(d.share[c], contrib / contrib.sum())
    # unit 1 is the only positive support of class 1 besides the constant units 2 and 3
    assert float(d.share[1, 1]) > 0.8
    assert float(d.carried([1])[1]) == pytest.approx(float(d.share[1, 1]))


def test_first_order_estimate_is_measured_for_a_nonlinear_head():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * SIZE * SIZE, 2),
    )
    x, masks, labels = _region_probes()
    d = dissect(model, x, masks, labels, layer="1")
    assert (
        d.completeness_error > 1e-3
    )  # tanh after the layer: gradient x activation is not the logit change
    assert not d.exact


def test_named_contexts_give_one_iou_each():
    x, masks, labels = _region_probes(n=12)
    contexts = torch.arange(12) % 3 == 0  # a third of the probes in context "b"
    d = dissect(_Regions(), x, masks, labels, contexts=contexts.long(), context_names=["a", "b"])
    assert d.contexts == ["a", "b"]
    # unit 1 fires on every background: each named context holds part of its region
    assert float(d.iou_contexts[0, 1]) > float(d.iou_contexts[1, 1]) > 0.2
    assert d.areas["a"] + d.areas["b"] == pytest.approx(d.areas["context"])


def test_no_side_effects_and_inference_mode():
    x, masks, labels = _region_probes()
    model = SmallCNN(2, widths=(4, 8))
    model.train()
    state = copy.deepcopy(model.state_dict())
    before_x = x.clone()
    hooks = hook_count(model)
    with torch.inference_mode():
        d = dissect(model, x, masks, labels)
    assert model.training and all(m.training for m in model.modules())
    assert hook_count(model) == hooks
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(x, before_x)
    assert d.layer == "features"


def test_chunking_does_not_change_the_result():
    x, masks, labels = _region_probes(n=10)
    model = SmallCNN(2, widths=(4, 8)).eval()
    a = dissect(model, x, masks, labels, max_batch=None)
    b = dissect(model, x, masks, labels, max_batch=3)
    for f in ("threshold", "share"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-6)
    # a pixel within float rounding (1e-8) of its unit's threshold may land on either side
    # when the batch differs: one pixel of a unit's ~600 moves an IoU by ~0.002
    for f in ("iou_object", "iou_context"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=3e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"masks": None}, "needs object masks"),
        ({"masks": torch.zeros(12, 1, 8, 8, dtype=torch.bool)}, "masks must be"),
        ({"layer": "nope"}, "layer 'nope' not found"),
        ({"layer": "fc"}, "must output a map"),
        ({"labels": torch.full((12,), 5)}, "not a class index"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels must hold one integer"),
        ({"quantile": 1.5}, "quantile must lie in"),
        ({"contexts": torch.zeros(12, dtype=torch.long)}, "need context_names"),
    ],
)
def test_bad_inputs(kwargs, message):
    x, masks, labels = _region_probes()
    args = {"masks": masks, "labels": labels, **kwargs}
    with pytest.raises(AttributionError, match=message):
        dissect(_Regions(), x, args.pop("masks"), args.pop("labels"), **args)


def _probes(n_per_group: int = 3) -> ProbeSet:
    return snow_wolf.probe_set(n_per_group=n_per_group, size=32, seed=3)


def _engine(**over) -> dict:
    from audit.defaults import default_config

    engine = default_config()["engine"]
    engine["dissection"].update(over)
    return engine


def test_raw_block_is_json_and_rules_read_it():
    ps = _probes()
    ctx, names = probe_contexts(ps)
    assert names == ["grass", "snow"] and ctx is not None
    block = dissection_raw(SmallCNN(2, widths=(4, 8)).eval(), ps, _engine())
    json.dumps(block, allow_nan=False)  # plain numbers only
    assert (
        block["layer"] == "features"
        and block["units"] == 8
        and set(block["iou_contexts"]) == {"grass", "snow"}
    )
    (c,) = rules.check(block, {})
    assert c.verdict is None and c.kind == "dissection" and "units of features" in c.finding
    assert rules.metrics(block)["dissection/context_units"] == len(rules.context_units(block))


def test_a_missing_layer_the_user_named_is_a_config_error():
    with pytest.raises(AuditConfigError, match="engine.dissection.layer"):
        dissection_raw(SmallCNN(2, widths=(4, 8)).eval(), _probes(), _engine(layer="layer4"))


def test_a_model_it_cannot_handle_is_recorded():
    class Flat(nn.Module):  # no feature map at all
        def forward(self, x):
            return x.flatten(1)[:, :2]

    block = dissection_raw(Flat(), _probes(), _engine())
    assert "error" in block and "no channels-first feature map" in block["error"]
    (c,) = rules.check(block, {})
    assert c.verdict is None and "could not run" in c.finding


def _block_with_context_units() -> dict:
    x, masks, labels = _region_probes()
    d = dissect(_Regions(), x, masks, labels)
    return to_raw(d, ["wolf", "husky"], probes=12)


def test_the_check_never_changes_the_verdict():
    from audit.defaults import default_config

    gate = default_config()["gate"]
    ps = _probes(6)
    pred = ps.labels.clone()
    from audit.pipeline import behaviour_raw

    raw = {"behaviour": behaviour_raw(ps, pred)}
    verdict, checks = decide(raw, gate)
    with_block = dict(raw, dissection=_block_with_context_units())
    verdict2, checks2 = decide(with_block, gate)
    assert verdict2 == verdict
    extra = [c for c in checks2 if c.kind == "dissection"]
    assert len(extra) == 1 and not extra[0].decisive and "1 of the 4 units" in extra[0].finding
    assert [c.finding for c in checks2 if c.kind != "dissection"] == [c.finding for c in checks]
    assert decide(dict(raw, dissection={"error": "x"}), gate)[0] == verdict


def test_audit_report_shows_the_units_and_their_images():
    ps = _probes(4)
    model = SmallCNN(2, widths=(4, 8)).eval()
    cfg = {
        "engine": {
            "methods": [],
            "sanity_probes": 0,
            "dissection": {"iou_threshold": 0.0, "show": 3, "actmax_steps": 2},
        }
    }
    res = run_audit(model, ps, cfg)
    block = res.raw["dissection"]
    assert "error" not in block
    units = rules.context_units(block)
    assert units, "iou_threshold 0 lists every unit whose best concept is a context"
    pics = res.pictures["dissection"]
    assert pics["units"] == units[:3] and pics["images"].shape == (len(pics["units"]), 3, 32, 32)
    page = render_html(res)
    assert 'id="dissection"' in page and "activation maximization of the context units" in page
    for u in units[:3]:
        assert f"<td class='num'>{u}</td>" in page
    (check,) = [c for c in res.checks if c.kind == "dissection"]
    assert check.finding in res.findings and html.escape(check.finding.split(";")[0]) in page
    # report.md lists the deciding findings and the concept evidence (this one), and counts the others
    md = render_markdown(res)
    listed = [c for c in res.checks if not c.decisive and c.kind in ("dissection", "concepts")]
    others = len(res.checks) - sum(c.decisive for c in res.checks) - len(listed)
    assert f"Full report with {others} further finding(s)" in md
    assert "**Concept evidence**" in md and f"- `{check.finding}" in md
    assert "dissection/context_units" in res.metrics
    json.dumps(res.to_dict(), allow_nan=False)
    assert "pictures" not in res.to_dict()


def test_dataclass_context_units_match_the_rules():
    x, masks, labels = _region_probes()
    d: Dissection = dissect(_Regions(), x, masks, labels)
    assert d.context_units() == rules.context_units(to_raw(d, ["a", "b"]))


@pytest.mark.slow
def test_demo_models_shortcut_has_context_units_clean_does_not():
    from audit.training.demo import compose_train
    from audit.training.train import train

    ps = snow_wolf.probe_set(n_per_group=64, size=64, seed=2024)
    ctx, names = probe_contexts(ps)
    found = {}
    for corr in ("0.99", "0.5"):
        result = train(compose_train([f"data.correlation={corr}", "logger=none"]))
        net = result.module.net.eval()
        d = dissect(net, ps.images, ps.masks, ps.labels, contexts=ctx, context_names=names)
        units = d.context_units()
        found[corr] = (len(units), d.carried(units), result)
    n_short, share_short, short = found["0.99"]
    n_clean, share_clean, _ = found["0.5"]
    assert short.max_gap > 0.3, (
        "the shortcut model must have learned the shortcut for the comparison to mean anything"
    )
    assert n_short >= 2 * max(n_clean, 1)
    assert float(share_short.max()) > 0.5
    assert float(share_clean.max()) < 0.5 * float(share_short.max())


# --------------------------------------------------------------------------- the callback
def test_callback_logs_the_series_every_epoch(tracking_uri):
    import pytorch_lightning as pl
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    from audit.callbacks import DissectionCallback
    from audit.training import Classifier, SnowWolfDataModule

    probes = snow_wolf.probe_set(2, size=32, seed=3)
    logger = MLFlowLogger(experiment_name="dissection-cb", tracking_uri=tracking_uri)
    cb = DissectionCallback(
        probes, every_n_epochs=1, module="net", iou_threshold=0.0, show=2, steps=2, strict=True
    )
    pl.seed_everything(0, workers=True, verbose=False)
    module = Classifier(
        {"_target_": "audit.models.SmallCNN", "num_classes": 2, "widths": [8, 16]}, lr=1e-2
    )
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        module,
        datamodule=SnowWolfDataModule(
            n_train=32, n_val=8, correlation=0.9, size=32, seed=0, batch_size=16
        ),
    )
    assert hook_count(module) == 0
    client = MlflowClient(tracking_uri)
    run_id = logger.run_id
    for key in (
        "audit/dissection/context_units",
        "audit/dissection/context_share/wolf",
        "audit/dissection/context_share/husky",
    ):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == [0, 1], key  # one point per epoch
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    for step in (
        0,
        1,
    ):  # the context units' activation-maximization grid, per epoch, under the key itself
        assert any(
            p.startswith(f"images/audit~dissection+step+{step}+") and p.endswith(".png")
            for p in images
        ), images
    assert cb._passes == 2


def test_callback_config_instantiates_and_checks_its_arguments():
    from hydra.utils import instantiate

    from audit.callbacks import DissectionCallback
    from audit.training.demo import compose_train

    cfg = compose_train(
        ["callbacks=dissection", "data.size=32", "callbacks.dissection.probes.n_per_group=2"]
    )
    cb = instantiate(cfg.callbacks.dissection)
    assert isinstance(cb, DissectionCallback) and cb.layer is None and cb.quantile == 0.2
    with pytest.raises(ValueError, match="quantile"):
        DissectionCallback(_probes(), quantile=0.0)
    with pytest.raises(ValueError, match="show"):
        DissectionCallback(_probes(), show=-1)
