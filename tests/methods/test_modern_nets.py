"""The small ViT and ConvNeXt: built from their Hydra configs, trained with the callbacks, loaded and audited."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from audit.datasets import snow_wolf
from audit.gate.loading import DEFAULT_ALLOWED_TARGETS, build_network, load_model, log_model_safely
from audit.methods.gradcam import gradcam_layer
from audit.models import MODELS, build_model, small_convnext, small_vit
from audit.pipeline import run_audit
from audit.training.demo import compose_train
from audit.training.train import train

NETS = ["small_vit", "small_convnext"]
# the activation-maximization callback's layer and units on each net with the config's
# defaults (layer: null, units: null), found at fit start
ACTMAX = {"small_vit": ("logits", [0, 1]), "small_convnext": ("features", [0, 1, 2, 3])}
TINY = [
    "data.n_train=64",
    "data.n_val=16",
    "data.size=32",
    "data.batch_size=32",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "eval_probes.n_per_group=2",
    "callbacks=default",
    "callbacks.attribution.probes.n_per_group=2",
    "callbacks.spurious.probes.n_per_group=2",
    "callbacks.actmax.steps=2",
    "callbacks.actmax.every_n_epochs=1",
]


@pytest.mark.parametrize("name", NETS)
def test_config_composes_and_gives_logits_at_64px(name):
    cfg = compose_train([f"net={name}"])
    assert cfg.net._target_ == f"audit.models.{name}"
    module = instantiate(cfg.module, _recursive_=False).eval()
    with torch.no_grad():
        out = module(torch.rand(3, 3, 64, 64))
    assert out.shape == (3, 2)
    # what the audit job rebuilds from net.json: the resolved config under the default allow-list
    net = build_network(OmegaConf.to_container(cfg.net, resolve=True), DEFAULT_ALLOWED_TARGETS)
    assert type(net) is type(module.net)
    assert sum(p.numel() for p in net.parameters()) < 500_000  # small enough for 2 CPU cores


def test_zoo_and_defaults():
    assert MODELS["small_vit"] is small_vit and MODELS["small_convnext"] is small_convnext
    x = torch.rand(2, 3, 64, 64)
    assert build_model("small_convnext", num_classes=3).eval()(x).shape == (2, 3)
    vit32 = small_vit(num_classes=5, image_size=32, patch_size=4).eval()
    assert vit32(x[..., :32, :32]).shape == (2, 5)
    # Grad-CAM's defaults: the last block's ln_1 (tokens on the 8x8 patch grid), the conv stages
    assert gradcam_layer(small_vit().eval(), x) == "encoder.layers.encoder_layer_3.ln_1"
    assert gradcam_layer(small_convnext().eval(), x) == "features"
    # torchvision's own ConvNeXt (LayerNorm in the stem and the downsampling) on request
    assert type(small_convnext(norm="layer").features[0][1]).__name__ == "LayerNorm2d"
    for bad in (dict(patch_size=7), dict(num_heads=5), dict(num_classes=0)):
        with pytest.raises(ValueError):
            small_vit(**bad)
    for bad in (
        dict(widths=[8, 16], depths=[1]),
        dict(widths=[], depths=[]),
        dict(widths=[8], depths=[0]),
        dict(norm="group"),
    ):
        with pytest.raises(ValueError):
            small_convnext(**bad)


@pytest.mark.parametrize("name", NETS)
def test_trains_with_the_callbacks_then_loads_and_audits(name, tracking_uri, tmp_path):
    cfg = compose_train([f"net={name}", *TINY])
    result = train(cfg)
    metrics = MlflowClient(tracking_uri).get_run(result.run_id).data.metrics
    for key in ("audit/gradcam/deletion_auc", "audit/lrp/srg", "audit/spurious/context_gap"):
        assert key in metrics, key
    layer, units = ACTMAX[name]  # found at fit start from the config's nulls
    assert {k for k in metrics if k.startswith("audit/actmax/")} == {
        f"audit/actmax/{layer}/unit_{u}" for u in units
    }

    # the demo's registry layout, loaded as the audit job loads it (default allow-list)
    net = result.module.net.eval()
    uri, _ = log_model_safely(
        net,
        OmegaConf.to_container(cfg.net, resolve=True),
        run_id=result.run_id,
        tracking_uri=tracking_uri,
    )
    loaded = load_model({"kind": "mlflow", "uri": uri}, tracking_uri=tracking_uri).model
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))

    # every default method explains the model (none recorded as an error); a tiny audit
    probes = snow_wolf.probe_set(2, size=32, seed=5)
    res = run_audit(loaded, probes, {"engine": {"sanity_probes": 2, "also_baselines": []}})
    assert res.verdict in ("PASS", "FAIL", "INCONCLUSIVE")
    for m in ("gradcam", "input_x_gradient", "lrp"):
        assert "error" not in res.raw["methods"][m], res.raw["methods"][m]
        assert f"{m}/srg/low" in res.metrics
