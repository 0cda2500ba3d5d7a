"""The activation-maximization callback's defaults (layer=None, units=None) fit any net.

With ``callbacks=default`` and ``net=resnet18_small`` the callback used to stop the fit
("layer 'features.9' not found"): its layer was SmallCNN's. Now the layer is the last
channels-first feature map of a blank image's forward pass, found at fit start (the
logits when there is none, as for a ViT), and the units are its first four channels.
"""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from audit.callbacks import ActivationMaximizationCallback
from audit.models import build_model
from audit.training.demo import compose_train
from audit.training.train import train


@pytest.mark.parametrize(
    ("name", "kwargs", "layer", "units"),
    [
        (
            "small_cnn",
            {},
            "features",
            [0, 1, 2, 3],
        ),  # its last conv block, features.9 its last module
        ("resnet18_small", {}, "layer4", [0, 1, 2, 3]),
        (
            "small_vit",
            {"image_size": 32, "patch_size": 8},
            "logits",
            [0, 1],
        ),  # tokens have no channels axis
    ],
)
def test_default_layer_and_units_per_net(name, kwargs, layer, units):
    net = build_model(name, num_classes=2, **kwargs).train()
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    cb = ActivationMaximizationCallback(size=32, steps=1)
    key = cb.state_key
    cb._check_model(net)
    assert (cb.layer, cb.units) == (layer, units)
    assert (
        cb.state_key == key
    )  # the same before and after fit start: a checkpoint's state still matches
    assert net.training and all(
        torch.equal(m.running_mean, b) for m, b in zip(bn, before, strict=True)
    )


def test_a_layer_with_fewer_channels_than_four_gives_them_all():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    net(torch.zeros(1, 3, 16, 16))
    cb = ActivationMaximizationCallback(size=16, steps=1)
    cb._check_model(net)
    assert (cb.layer, cb.units) == ("0", [0, 1])
    named = ActivationMaximizationCallback("logits", size=16, steps=1)
    named._check_model(net)
    assert named.units == [0, 1]  # the two classes


def test_given_layer_and_units_are_kept_and_checked():
    net = build_model("small_cnn", num_classes=2)
    cb = ActivationMaximizationCallback("features.3", units=[5], size=32, steps=1)
    cb._check_model(net)
    assert (cb.layer, cb.units) == ("features.3", [5])
    with pytest.raises(ValueError, match="layer 'layer4' not found"):
        ActivationMaximizationCallback("layer4", size=32)._check_model(net)
    with pytest.raises(ValueError, match="units must be a non-empty list"):
        ActivationMaximizationCallback(units=[])


def test_resnet18_trains_with_callbacks_default(tracking_uri):
    # the bench's command for ResNet-18, at the tests' small size
    cfg = compose_train(
        [
            "net=resnet18_small",
            "callbacks=default",
            "data.n_train=32",
            "data.n_val=16",
            "data.size=24",
            "data.batch_size=16",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "eval_probes.n_per_group=2",
            "callbacks.attribution.probes.n_per_group=1",
            "callbacks.spurious.probes.n_per_group=1",
            "callbacks.actmax.steps=2",
        ]
    )
    result = train(cfg)
    metrics = MlflowClient(tracking_uri).get_run(result.run_id).data.metrics
    assert {k for k in metrics if k.startswith("audit/actmax/")} == {
        f"audit/actmax/layer4/unit_{u}" for u in range(4)
    }
