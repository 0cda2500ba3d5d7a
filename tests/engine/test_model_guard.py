"""audit.engine.model: the state guard every explainer and metric runs under."""

from __future__ import annotations

import pytest
import torch

from audit.engine.model import (
    AttributionError,
    hook_count,
    preserved,
    resolve_layer,
    resolve_target,
)
from audit.models import SmallCNN, resnet18_small


def test_preserved_restores_everything_the_block_touches():
    model = SmallCNN(widths=[4, 8]).train()
    model.features[0].weight.requires_grad_(False)
    grad = torch.ones_like(model.fc.weight)
    model.fc.weight.grad = grad
    bn = model.features[1]
    stats = bn.running_mean.clone()
    with torch.no_grad():
        with preserved(model) as m:
            assert not m.training and torch.is_grad_enabled()
            m.train()
            m(torch.rand(4, 3, 8, 8))  # train-mode forward moves BN running stats
            for p in m.parameters():
                p.requires_grad_(True)
                p.grad = torch.zeros_like(p)
        assert not torch.is_grad_enabled()
    assert model.training and all(mod.training for mod in model.modules())
    assert not model.features[0].weight.requires_grad and model.fc.weight.requires_grad
    assert model.fc.weight.grad is grad and model.features[0].weight.grad is None
    assert torch.equal(bn.running_mean, stats)


def test_the_reused_batchnorm_snapshot_follows_changes_made_between_blocks():
    """preserved() reuses its BatchNorm snapshot while no buffer moved; training in between must refresh it."""
    model = SmallCNN(widths=[4, 8]).eval()
    bn = model.features[1]
    x = torch.rand(4, 3, 8, 8)

    def train_step():
        model.train()
        with torch.no_grad():
            model(x + torch.rand_like(x))
        model.eval()

    for direct in (False, True):
        with preserved(model):
            model(x)  # first block: snapshot taken (and cached)
        if direct:
            with torch.no_grad():
                bn.running_var.mul_(2.0)  # a direct write, no forward
        else:
            train_step()  # the training the callbacks watch moves the statistics
        now = [b.clone() for b in bn.buffers()]
        with preserved(model) as m:
            m.train()
            m(x * 3.0)  # moves them again inside the block
        assert all(torch.equal(a, b) for a, b in zip(bn.buffers(), now, strict=True))


def test_preserved_freezes_and_restores_shared_modules_and_tied_weights():
    """One walk of the tree sees a module registered twice and a weight tied to another once."""
    shared = torch.nn.Linear(4, 4)
    head = torch.nn.Linear(4, 4, bias=False)
    head.weight = shared.weight  # tied
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, head, torch.nn.BatchNorm1d(4))
    model[4].eval()  # a mixed model: one submodule in eval mode, the rest training
    shared.bias.requires_grad_(False)
    with preserved(model, freeze=True) as m:
        assert not any(p.requires_grad for p in m.parameters())
        assert not any(mod.training for mod in m.modules())
        m(torch.rand(3, 4)).sum()
        shared.weight.requires_grad_(True)  # the block changes a shared weight: restored
    assert (
        shared.weight.requires_grad and head.weight.requires_grad and not shared.bias.requires_grad
    )
    # Sequential, the shared Linear (once), ReLU, head, BatchNorm
    assert [mod.training for mod in model.modules()] == [True, True, True, True, False]
    with preserved(model.eval()) as m:  # all in eval mode: left as it is
        assert not any(mod.training for mod in m.modules())
    assert not any(mod.training for mod in model.modules())


def test_preserved_removes_and_reports_a_leftover_hook():
    model = SmallCNN(widths=[4])
    with pytest.raises(RuntimeError, match="1 hook"), preserved(model):
        model.fc.register_forward_hook(lambda *a: None)
    assert hook_count(model) == 0


def test_preserved_works_under_inference_mode():
    model = SmallCNN(widths=[4])
    with torch.inference_mode(), preserved(model):
        x = torch.rand(2, 3, 8, 8, requires_grad=True)
        model(x).sum().backward()
        assert x.grad is not None


def test_resolve_target_and_layer_errors():
    logits = torch.zeros(3, 2)
    assert resolve_target(None, torch.tensor([[0.0, 1.0]])).tolist() == [1]
    assert resolve_target(1, logits).tolist() == [1, 1, 1]
    with pytest.raises(
        AttributionError, match=r"target 2 \(row 0\) is not a class index; the model has 2 outputs"
    ):
        resolve_target(2, logits)
    with pytest.raises(AttributionError, match=r"logits \[N, classes\]"):
        resolve_target(0, torch.zeros(3))
    with pytest.raises(
        AttributionError, match="layer 'layer5' not found; top-level modules are: conv1"
    ):
        resolve_layer(resnet18_small(), "layer5")


def test_a_model_loaded_under_inference_mode_gets_curves_and_a_clear_explainer_error():
    """Inference tensors have no version counter and no autograd: forward-only metrics run,
    explainers say what is wrong and how to fix it (instead of torch's internal error)."""
    from audit.methods import explain
    from audit.metrics import deletion_curve

    torch.manual_seed(0)
    normal = SmallCNN(widths=(4, 8)).eval()
    with torch.inference_mode():
        frozen = SmallCNN(widths=(4, 8)).eval()
        frozen.load_state_dict(normal.state_dict())
    x, maps = torch.rand(2, 3, 16, 16), torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(
        deletion_curve(frozen, x, 0, maps, steps=4)[0],
        deletion_curve(normal, x, 0, maps, steps=4)[0],
    )
    for method in ("gradcam", "saliency", "lrp"):
        with pytest.raises(
            AttributionError, match=r"built or loaded under torch.inference_mode\(\)"
        ):
            explain(method, frozen, x, 0)
