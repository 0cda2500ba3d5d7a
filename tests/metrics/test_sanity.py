"""Cascading model-randomization sanity check and the batched Spearman correlation."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from audit.engine.model import AttributionError, hook_count
from audit.metrics import RandomizationResult, randomization_sanity, spearman
from audit.metrics.sanity import cascade_layers
from audit.models import SmallCNN


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=3, widths=(4, 8)).eval()


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain saliency: |d logit_target / d x| summed over channels."""
    x = x.detach().requires_grad_(True)
    out = model(x).gather(1, target[:, None]).sum()
    (g,) = torch.autograd.grad(out, x)
    return g.abs().sum(dim=1, keepdim=True)


def brightness(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Ignores the model entirely."""
    return x.mean(dim=1, keepdim=True)


# --------------------------------------------------------------------------- spearman
def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (5, 1, 7, 7), generator=g).float()  # many ties
    b = a + torch.randint(0, 4, (5, 1, 7, 7), generator=g).float()
    ours = spearman(a, b)
    ref = [spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic for i in range(5)]
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float32), atol=1e-6, rtol=0)
    x = torch.randn(3, 50, generator=g)
    torch.testing.assert_close(spearman(x, x), torch.ones(3))
    torch.testing.assert_close(spearman(x, -x), -torch.ones(3))
    torch.testing.assert_close(spearman(x, x.exp()), torch.ones(3))  # monotone: ranks only
    assert spearman(torch.ones(2, 9), x[:2, :9]).isnan().all()  # constant row: undefined
    with pytest.raises(AttributionError, match=r"same shape; got \(2, 9\) and \(2, 8\)"):
        spearman(x[:2, :9], x[:2, :8])


# --------------------------------------------------------------------------- known answers
def test_gradient_map_decorrelates_and_brightness_does_not():
    model, x = tiny_cnn(), images()
    grad = randomization_sanity(gradient, model, x)
    assert isinstance(grad, RandomizationResult)
    assert grad.layers == ["fc", "features.4", "features.3", "features.1", "features.0"]
    assert grad.spearman.shape == grad.spearman_abs.shape == (5, 4)
    assert grad.similarity < 0.5, grad.to_dict()
    assert grad.mean[0] < 0.9  # randomizing the logits alone already changes the map
    assert not grad.passes(threshold=grad.similarity)
    assert grad.passes(threshold=0.5)
    const = randomization_sanity(brightness, model, x)
    torch.testing.assert_close(const.spearman, torch.ones(5, 4))
    torch.testing.assert_close(const.spearman_abs, torch.ones(5, 4))
    assert const.similarity == pytest.approx(1.0) and not const.passes(threshold=0.5)
    d = const.to_dict()
    assert d["similarity"] == pytest.approx(1.0) and "spearman_abs/features.0" in d


def test_callers_model_is_unchanged():
    model, x = tiny_cnn(), images()
    model.train()
    model.features[0].weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 3.0)
    grad_obj = model.fc.weight.grad
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        randomization_sanity(gradient, model, x, seed=3)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert list(model.parameters()) == params  # same objects
    for p, v in zip(params, values, strict=True):
        assert torch.equal(p, v)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(m.training for m in model.modules())
    assert not model.features[0].weight.requires_grad and model.fc.weight.requires_grad
    assert model.fc.weight.grad is grad_obj and model.features[0].weight.grad is None
    assert hook_count(model) == 0


def test_seeded_private_randomization():
    model, x = tiny_cnn(), images()
    rng = torch.get_rng_state()
    a = randomization_sanity(gradient, model, x, seed=1)
    b = randomization_sanity(gradient, model, x, seed=1)
    c = randomization_sanity(gradient, model, x, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(a.spearman, b.spearman)
    assert not torch.equal(a.spearman, c.spearman)


def test_explicit_layers_and_targets():
    model, x = tiny_cnn(), images()
    seen: list[torch.Tensor] = []

    def recording(
        m: nn.Module, xx: torch.Tensor, target: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        seen.append(target.clone())
        return gradient(m, xx, target) * scale

    r = randomization_sanity(
        recording, model, x, target=2, layers=["fc", model.features], scale=2.0
    )
    assert r.layers == ["fc", "features"] and r.spearman.shape == (2, 4)
    assert all(torch.equal(t, torch.full((4,), 2)) for t in seen) and len(seen) == 3
    seen.clear()
    randomization_sanity(recording, model, x, layers="fc")
    assert all(
        torch.equal(t, model(x).argmax(dim=1)) for t in seen
    )  # None: the original prediction


def test_cascade_order_follows_execution_not_registration():
    class Reordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, runs last
            self.conv = nn.Conv2d(3, 4, 3)
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean(dim=(2, 3)))

    model = Reordered()
    assert cascade_layers(model, images(1, 8)) == ["head", "conv"]
    assert hook_count(model) == 0


def test_works_under_inference_mode():
    model = tiny_cnn()
    ref = randomization_sanity(gradient, model, images())
    with torch.inference_mode():
        r = randomization_sanity(gradient, model, images())
    torch.testing.assert_close(r.spearman, ref.spearman)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": ["layer9"]}, r"layer 'layer9' not found"),
        ({"layers": ["pool"]}, r"layer 'pool' has no parameters.*features.0"),
        ({"layers": ["fc", "fc"]}, r"layer 'fc' is listed twice"),
        ({"layers": []}, r"layers is empty"),
        ({"target": 7}, r"target 7 .*3 outputs"),
        ({"method": 42}, r"registered explainer name .* got int"),
        ({"method": lambda m, x, t: x.sum()}, r"maps \[N, ...\] with N = 4; got \(\)"),
        ({"method": lambda m, x, t: x[:2]}, r"N = 4; got \(2, 3, 16, 16\) for the original model"),
        ({"method": lambda m, x, t: x / 0.0 - x / 0.0}, r"NaN or Inf for the original model"),
        ({"seed": 1.5}, r"seed must be an integer; got 1.5"),
    ],
)
def test_errors_name_the_value(kwargs, match):
    args = {"method": gradient, "model": tiny_cnn(), "x": images()}
    args.update(kwargs)
    with pytest.raises(AttributionError, match=match):
        randomization_sanity(**args)


def test_maps_that_change_shape_are_rejected():
    calls = []

    def shrinking(m: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x[:, :1, : 16 - len(calls)]

    with pytest.raises(AttributionError, match=r"after randomizing 'fc'"):
        randomization_sanity(shrinking, tiny_cnn(), images())


# --------------------------------------------------------------------------- registered methods
def _explain():
    try:
        return importlib.import_module("audit.methods").explain
    except (ImportError, AttributeError):
        return None


@pytest.mark.skipif(_explain() is None, reason="audit.methods.explain is not available yet")
@pytest.mark.parametrize("method", ["saliency", "gradcam"])
def test_registered_methods_depend_on_the_weights(method):
    model, x = tiny_cnn(), images()
    r = randomization_sanity(method, model, x, layers=["fc", "features"])
    assert r.method == method and r.layers == ["fc", "features"]
    assert r.similarity < 0.5, r.to_dict()
    assert hook_count(model) == 0


def test_similarity_skips_an_undefined_variant():
    nan = float("nan")
    r = RandomizationResult("m", ["fc"], torch.tensor([[0.2, 0.4]]), torch.tensor([[nan, nan]]))
    assert r.final == pytest.approx(0.3) and r.similarity == pytest.approx(0.3)
    r = RandomizationResult("m", ["fc"], torch.tensor([[nan, 0.4]]), torch.tensor([[0.6, 0.8]]))
    assert r.final == pytest.approx(0.4) and r.similarity == pytest.approx(0.7)
    r = RandomizationResult("m", ["fc"], torch.tensor([[nan]]), torch.tensor([[nan]]))
    assert r.similarity != r.similarity and not r.passes(threshold=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, x = tiny_cnn(), images()
    ref = randomization_sanity(gradient, model, x, seed=5)
    r = randomization_sanity(gradient, model.cuda(), x.cuda(), seed=5)
    assert next(model.parameters()).is_cuda
    torch.testing.assert_close(r.spearman, ref.spearman, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- constant maps, modes
class DeadWhenRandomized(nn.Module):
    """Grad-CAM (on ``features``) of class 0 is the red channel; with random weights it is exactly 0.

    ``features`` is a 1x1 conv and a ReLU: channel 0 reads red, the other 15 are 0.
    The head gives class 0 the weight +1 on channel 0 and -10 on the others, so the
    original Grad-CAM of class 0 is ``relu(red / HW)``. The randomized head draws
    every weight from N(-9.7, 1.9) (the mean and spread of these weights): all
    negative, so every randomized map is ``relu(negative x non-negative) = 0``. An
    image whose red channel is constant gets a constant original map.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 2)
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[0, 0] = 1.0
            self.features[0].bias.zero_()
            self.fc.weight.fill_(-10.0)
            self.fc.weight[0, 0] = 1.0
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def flat_red(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x`` with a constant red channel in ``rows`` (a constant original Grad-CAM there)."""
    x = x.clone()
    x[rows, 0] = 0.5
    return x


@pytest.mark.skipif(_explain() is None, reason="audit.methods.explain is not available yet")
@pytest.mark.parametrize("mode", ["full", "cascade"])
def test_an_all_zero_randomized_gradcam_changed_completely(mode):
    model, x = DeadWhenRandomized().eval(), images(6)
    zeros = torch.zeros(6, dtype=torch.long)
    r = randomization_sanity("gradcam", model, x, target=zeros, mode=mode)
    assert r.mode == mode and r.layers == ["fc", "features.0"]
    assert r.constant_randomized.all() and not r.constant_original.any()
    assert r.n_constant_randomized == 6 and r.n_constant_original == 0
    # undefined for Spearman, but the map changed completely: similarity 0, and it passes
    torch.testing.assert_close(r.spearman, torch.zeros(len(r.steps), 6))
    torch.testing.assert_close(r.spearman_abs, torch.zeros(len(r.steps), 6))
    assert r.similarity == 0.0 and r.passes(threshold=0.5)
    assert r.to_dict()["constant_randomized"] == 6.0


def test_constant_original_maps_are_left_out():
    model, x = tiny_cnn(), images(6)
    calls: list[int] = []

    def blank_first_three(m: nn.Module, xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        maps = gradient(m, xx, t)
        if len(calls) == 1:  # the original model: constant maps on rows 0-2
            maps[:3] = 0.25
        return maps

    r = randomization_sanity(blank_first_three, model, x, mode="full")
    assert r.constant_original.tolist() == [True] * 3 + [False] * 3
    assert r.n_constant_original == 3 and r.n_constant_randomized == 0
    assert r.spearman[:, :3].isnan().all() and r.spearman_abs[:, :3].isnan().all()
    assert not r.spearman[:, 3:].isnan().any()
    rest = randomization_sanity(gradient, model, x[3:], target=model(x[3:]).argmax(1), mode="full")
    assert r.similarity == pytest.approx(rest.similarity, abs=1e-6)  # as if they were not there
    calls.clear()

    def all_blank(m: nn.Module, xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.zeros_like(xx[:, :1]) if len(calls) == 1 else gradient(m, xx, t)

    r = randomization_sanity(all_blank, model, x, mode="full")
    assert r.n_constant_original == 6
    assert math.isnan(r.similarity) and not r.passes(threshold=0.5)


def test_full_equals_the_last_cascade_step():
    model, x = tiny_cnn(), images()
    weights: dict[str, list[dict[str, torch.Tensor]]] = {"full": [], "cascade": []}

    def recording(mode: str):
        def fn(m: nn.Module, xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            weights[mode].append({k: v.clone() for k, v in m.state_dict().items()})
            return gradient(m, xx, t)

        return fn

    full = randomization_sanity(recording("full"), model, x, seed=4, mode="full")
    cascade = randomization_sanity(recording("cascade"), model, x, seed=4, mode="cascade")
    assert full.layers == cascade.layers and full.steps == ["all"]
    assert full.spearman.shape == (1, 4) and cascade.spearman.shape == (5, 4)
    for k, v in weights["full"][-1].items():  # the same random weights
        assert torch.equal(v, weights["cascade"][-1][k]), k
    assert torch.equal(full.spearman[0], cascade.spearman[-1])
    assert torch.equal(full.spearman_abs[0], cascade.spearman_abs[-1])
    assert full.similarity == cascade.similarity
    assert set(full.to_dict()) == {
        "similarity",
        "final",
        "final_abs",
        "constant_original",
        "constant_randomized",
        "spearman/all",
        "spearman_abs/all",
    }


@pytest.mark.parametrize(("mode", "calls"), [("full", 2), ("cascade", 6)])
def test_full_mode_explains_once_after_randomizing(mode, calls):
    model, x = tiny_cnn(), images()
    seen: list[int] = []

    def counting(m: nn.Module, xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        return gradient(m, xx, t)

    randomization_sanity(counting, model, x, mode=mode)
    assert len(seen) == calls  # the original, then one (full) or one per layer (5 layers)


def test_bad_mode_and_full_mode_shape_errors():
    with pytest.raises(AttributionError, match=r"mode must be one of full, cascade; got 'layers'"):
        randomization_sanity(gradient, tiny_cnn(), images(), mode="layers")
    calls = []

    def shrinking(m: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x[:, :1, : 16 - len(calls)]

    with pytest.raises(AttributionError, match=r"after randomizing every layer"):
        randomization_sanity(shrinking, tiny_cnn(), images(), mode="full")
