"""DeconvNet, guided backpropagation and Guided Grad-CAM: known answers, ReLU forms, errors, sanity.

The common contract (no side effects, no_grad / inference_mode, max_batch, targets out
of range, NaN logits) runs for these methods in tests/methods/test_methods.py (they are in its
``ALL``). The slow tests train a snow-wolf model and reproduce Adebayo et al. (2018).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from audit.engine.model import AttributionError, hook_count
from audit.methods import METHODS, explain
from audit.models import SmallCNN, resnet18_small, small_convnext, small_vit

GUIDED = ("guided_backprop", "deconvnet", "guided_gradcam")


def images(n: int = 4, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=3, widths=(4, 8, 8)).eval()


def resnet18(seed: int = 0) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=3).eval()


class OneHidden(nn.Module):
    """``fc2(relu(fc1(x)))`` on flattened 8x8 images; the ReLU as a module, a function, or in place."""

    def __init__(self, relu: str = "module", skip: bool = False, hidden: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 8 * 8, hidden)
        self.fc2 = nn.Linear(hidden, 3)
        self.act = nn.ReLU(inplace=relu == "module_inplace")
        self.relu, self.skip = relu, skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x.flatten(1))
        if self.relu.startswith("module"):
            a = self.act(h)  # with skip, `h` also feeds the sum below
        elif self.relu == "functional":
            a = F.relu(h)
        elif self.relu == "functional_inplace":
            a = F.relu(h.clone(), True)  # inplace passed by position
        elif self.relu == "tensor_inplace":
            a = h.clone()
            a.relu_()  # the result is not assigned: the model relies on the in-place change
        else:
            raise ValueError(self.relu)
        return self.fc2(a + h if self.skip else a)


def by_hand(m: OneHidden, x: torch.Tensor, target: torch.Tensor, rule: str) -> torch.Tensor:
    """The rule written out for ``OneHidden``: max over channels of |W1^T g|."""
    with torch.no_grad():
        h = m.fc1(x.flatten(1))  # [N, hidden]
        up = m.fc2.weight[target]  # gradient arriving at the ReLU's output, [N, hidden]
        if rule == "guided_backprop":
            g = up.clamp(min=0) * (h > 0)
        elif rule == "deconvnet":
            g = up.clamp(min=0)
        else:  # the plain gradient
            g = up * (h > 0)
        if m.skip:  # a + h: the pre-activation's own path adds the plain gradient
            g = g + up
        return (g @ m.fc1.weight).reshape(-1, 3, 8, 8).abs().amax(dim=1, keepdim=True)


# ------------------------------------------------------------------ registry, shape
def test_the_three_methods_are_registered_with_their_options() -> None:
    assert set(GUIDED) <= set(METHODS)
    with pytest.raises(AttributionError, match="its options are: layer, max_batch, memory_budget"):
        explain("guided_gradcam", small_cnn(), images(), layr="features")
    with pytest.raises(AttributionError, match="its options are: max_batch, memory_budget"):
        explain("guided_backprop", small_cnn(), images(), layer="features")


@pytest.mark.parametrize("method", GUIDED)
def test_maps_have_the_input_shape_and_are_finite_and_nonnegative(method: str) -> None:
    m, x = small_cnn(), images(3, 16)
    out = explain(method, m, x)
    assert out.shape == (3, 1, 16, 16) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all()) and bool((out >= 0).all()) and bool((out > 0).any())


# ------------------------------------------------------------------ known answers
@pytest.mark.parametrize(
    "relu", ["module", "module_inplace", "functional", "functional_inplace", "tensor_inplace"]
)
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_one_hidden_layer_equals_the_rule_by_hand(method: str, relu: str) -> None:
    torch.manual_seed(0)
    m, x = OneHidden(relu).eval(), images(5)
    target = torch.tensor([0, 1, 2, 1, 0])
    expected = by_hand(m, x, target, method)
    torch.testing.assert_close(explain(method, m, x, target), expected)
    # the rule is not the plain gradient on this net (else the test could not fail)
    assert not torch.allclose(expected, by_hand(m, x, target, "gradient"))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_a_pre_activation_used_twice_gets_the_rule_only_on_the_relu_path(method: str) -> None:
    """``fc2(relu(h) + h)``: the rule acts on the ReLU call, the skip path keeps the plain gradient.

    captum hooks the ReLU's input tensor, so it clamps the sum of both paths' gradients:
    its maps differ from the rule here (checked, so the reason in guided.py stays true).
    """
    from captum.attr import Deconvolution, GuidedBackprop

    torch.manual_seed(3)
    m, x = OneHidden("module", skip=True).eval(), images(5)
    target = torch.tensor([0, 1, 2, 1, 0])
    expected = by_hand(m, x, target, method)
    torch.testing.assert_close(explain(method, m, x, target), expected)
    ref = {"guided_backprop": GuidedBackprop, "deconvnet": Deconvolution}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum warns that it sets hooks
        theirs = ref(m).attribute(x.clone().requires_grad_(True), target=target)
    assert not torch.allclose(theirs.abs().amax(dim=1, keepdim=True), expected)


def test_captum_leaves_a_functional_relu_plain() -> None:
    """Why guided.py has its own rule: captum hooks nn.ReLU modules only."""
    from captum.attr import GuidedBackprop

    torch.manual_seed(0)
    m, x = OneHidden("functional").eval(), images(5)
    target = torch.tensor([0, 1, 2, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = GuidedBackprop(m).attribute(x.clone().requires_grad_(True), target=target)
    theirs = theirs.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(theirs, by_hand(m, x, target, "gradient"))  # silently plain
    assert not torch.allclose(theirs, explain("guided_backprop", m, x, target))


@pytest.mark.parametrize("layer", [None, "features.3"])
def test_guided_gradcam_is_guided_backprop_times_gradcam(layer: str | None) -> None:
    m, x = small_cnn(), images(4, 16)
    target = torch.tensor([2, 0, 1, 2])
    opts = {} if layer is None else {"layer": layer}
    expected = explain("guided_backprop", m, x, target) * explain("gradcam", m, x, target, **opts)
    got = explain("guided_gradcam", m, x, target, **opts)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, explain("guided_backprop", m, x, target))
    # target None: both factors explain the argmax of the same forward pass
    pred = m(x).argmax(dim=1)
    torch.testing.assert_close(
        explain("guided_gradcam", m, x, None, **opts), explain("guided_gradcam", m, x, pred, **opts)
    )


# ------------------------------------------------------------------ torchvision ResNet-18
def test_resnet18_inplace_reused_relus_match_captum_and_leave_no_trace() -> None:
    """torchvision's BasicBlock calls one ReLU(inplace=True) twice; each call gets the rule."""
    from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam

    m, x = resnet18(), images(3, 32)
    target = torch.tensor([0, 2, 1])
    with torch.no_grad():
        logits = m(x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ref_in = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs = {
            "guided_backprop": GuidedBackprop(m).attribute(ref_in, target=target),
            "deconvnet": Deconvolution(m).attribute(ref_in, target=target),
            "guided_gradcam": GuidedGradCam(m, m.layer3).attribute(
                ref_in, target=target, interpolate_mode="bilinear"
            ),
        }
    for method, ref in refs.items():
        opts = {"layer": "layer3"} if method == "guided_gradcam" else {}
        got = explain(method, m, x, target, **opts)
        assert got.shape == (3, 1, 32, 32) and bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, ref.abs().amax(dim=1, keepdim=True), rtol=1e-4, atol=1e-7)
    # the model is as it was: no hooks, the same weights and statistics, the same outputs
    assert hook_count(m) == 0
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert all(r.inplace for r in m.modules() if isinstance(r, nn.ReLU))
    with torch.no_grad():
        torch.testing.assert_close(m(x), logits)


@pytest.mark.parametrize("method", GUIDED)
def test_chunks_of_one_give_the_maps_of_the_whole_batch(method: str) -> None:
    m, x = resnet18_small(3).eval(), images(4, 16)
    whole = explain(method, m, x, [0, 1, 2, 0])
    torch.testing.assert_close(explain(method, m, x, [0, 1, 2, 0], max_batch=1), whole)
    # and a chunk chosen by a tiny memory budget
    torch.testing.assert_close(explain(method, m, x, [0, 1, 2, 0], memory_budget=1), whole)


# ------------------------------------------------------------------ models the rule does not cover
class LeakyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(torch.relu(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", GUIDED)
def test_models_without_relu_or_with_other_activations_are_refused(method: str) -> None:
    x = images(2, 32)
    for model in (
        small_vit(3, image_size=32, patch_size=8, num_layers=1, hidden_dim=32, mlp_dim=32),
        small_convnext(3, widths=(8, 16), depths=(1, 1)),
    ):
        with pytest.raises(
            AttributionError,
            match=rf"{method} is defined on ReLU networks, and this "
            r"model applies gelu and no ReLU.*ResNets",
        ):
            explain(method, model.eval(), x)
        assert hook_count(model) == 0
    with pytest.raises(AttributionError, match=r"also applies leaky_relu"):
        explain(method, LeakyNet().eval(), x)
    linear = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 32 * 32, 3)).eval()
    with pytest.raises(
        AttributionError, match=r"applies no ReLU in its forward pass.*plain gradient"
    ):
        explain(method, linear, x)


def test_guided_gradcam_bad_layer_is_gradcams_error() -> None:
    with pytest.raises(AttributionError, match="layer 'layer5' not found"):
        explain("guided_gradcam", small_cnn(), images(2, 16), layer="layer5")
    with pytest.raises(AttributionError, match="spatial map.*'fc'"):
        explain("guided_gradcam", small_cnn(), images(2, 16), layer="fc")


# ------------------------------------------------------------------ sanity on a tiny model
@pytest.mark.parametrize("method", ["guided_backprop", "guided_gradcam"])
def test_randomization_changes_the_maps_of_a_shallow_net(method: str) -> None:
    """As tests/metrics/test_sanity.py checks saliency and Grad-CAM: the maps depend on the weights.

    deconvnet is left out: on this 2-block random net its maps stay at a similarity of
    about 0.5 to the randomized net's (its backward ignores the forward pass's ReLU
    masks, the one place where the input enters); judging that is the gate's sanity
    filter's job, not a property this test can assert.
    """
    from audit.metrics import randomization_sanity

    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, widths=(4, 8)).eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    r = randomization_sanity(method, model, x, layers=["fc", "features"])
    assert r.method == method and r.similarity < 0.5, r.to_dict()
    assert hook_count(model) == 0


# ------------------------------------------------------------------ slow: Adebayo et al. on a trained model
@pytest.fixture(scope="module")
def shortcut_model() -> nn.Module:
    """A snow-wolf SmallCNN trained on the background shortcut (correlation 0.99), shrunk for a test."""
    from audit.training.demo import compose_train
    from audit.training.train import train

    result = train(
        compose_train(
            [
                "data.correlation=0.99",
                "logger=none",
                "data.n_train=2000",
                "trainer.max_epochs=4",
                "trainer.enable_progress_bar=false",
                "eval_probes.n_per_group=32",
            ]
        )
    )
    assert result.max_gap > 0.5, "the model did not learn the background shortcut"
    return result.module.net.eval()


def _cascade(method: str, model: nn.Module, probes) -> list[float]:
    from audit.metrics import randomization_sanity

    r = randomization_sanity(method, model, probes.images, probes.labels, mode="cascade", seed=0)
    assert r.layers[:3] == ["fc", "features.10", "features.9"]  # logits, then the last conv block
    return [max(a, b) for a, b in zip(r.mean, r.mean_abs, strict=True)]


@pytest.mark.slow
def test_guided_backprop_survives_cascading_randomization_longer(shortcut_model) -> None:
    """The paper's finding, quantitatively: guided backprop's maps stay close to the trained
    model's while the top layers are randomized, far longer than saliency's and Grad-CAM's."""
    from audit.datasets import snow_wolf

    probes = snow_wolf.probe_set(n_per_group=8, size=64, seed=2024)
    sims = {
        m: _cascade(m, shortcut_model, probes) for m in ("guided_backprop", "saliency", "gradcam")
    }
    gbp, sal, cam = sims["guided_backprop"], sims["saliency"], sims["gradcam"]
    # the classifier alone (fc) and the last conv block (its BatchNorm and conv) randomized
    for step in (0, 2):
        assert gbp[step] > max(sal[step], cam[step]) + 0.15, sims
    assert gbp[0] > 0.7, sims  # after the logits' layer, guided backprop barely changes
    # over the whole cascade (mean of the steps) guided backprop stays the most similar
    mean = {m: sum(v) / len(v) for m, v in sims.items()}
    assert mean["guided_backprop"] > max(mean["saliency"], mean["gradcam"]) + 0.1, mean
    # every layer randomized: it has decayed on this 4-block net, but stays above Grad-CAM
    assert gbp[-1] > cam[-1] + 0.15 and gbp[-1] < gbp[0] - 0.3, sims


def _audit(model: nn.Module, probes, methods: list[str], **engine):
    from audit.pipeline import run_audit

    return run_audit(
        model,
        probes,
        {
            "engine": {
                "methods": methods,
                "attribution_probes": 16,
                "sanity_probes": 16,
                "also_baselines": [],
                **engine,
            }
        },
    )


def _expected_similarity(model: nn.Module, probes, method: str) -> float:
    """The gate's number, recomputed: the full randomization on the gate's rows and labels."""
    from audit.engine.rows import pick_rows
    from audit.metrics import randomization_sanity

    rows = pick_rows(len(probes), 16, probes.groups)
    return randomization_sanity(
        method, model, probes.images[rows], probes.labels[rows], mode="full", seed=0
    ).similarity


@pytest.mark.slow
def test_the_gate_drops_guided_backprop_where_it_fails_the_sanity_check() -> None:
    """A deep ReLU net (ResNet-18, random weights): guided backprop's maps hardly depend on the
    weights (it largely reconstructs the input, Nie et al. 2018), so the filter drops it."""
    from audit.datasets import snow_wolf

    torch.manual_seed(0)
    model = resnet18_small(2).eval()
    probes = snow_wolf.probe_set(n_per_group=4, size=32, seed=2024)
    result = _audit(model, probes, ["guided_backprop", "saliency"], attribution_probes=8, steps=4)
    checks = {c.name: c for c in result.checks}
    sane = checks["sanity/guided_backprop"]
    sim = _expected_similarity(model, probes, "guided_backprop")
    assert sim >= 0.5 and sane.numbers["similarity"] == pytest.approx(sim)
    assert sane.numbers["used"] is False
    assert sane.finding.startswith(
        f"guided_backprop is not used as evidence: its maps barely change when every layer is "
        f"randomized (similarity {sim:.2f}, must stay below 0.50)"
    )
    assert "guided_backprop" not in checks["methods"].numbers["used"]
    assert any(
        f.startswith("guided_backprop is not used as evidence: its maps barely change")
        for f in result.findings
    )
    # the same probes and seed: saliency's maps do change with the weights, and pass
    assert checks["sanity/saliency"].numbers["used"] is True


@pytest.mark.slow
def test_the_gate_judges_guided_backprop_on_the_trained_model_by_its_measured_similarity(
    shortcut_model,
) -> None:
    """On the trained 4-block SmallCNN the full randomization does change guided backprop's
    maps (the cascade above decays to its end): the gate's sanity verdict is what was measured."""
    from audit.datasets import snow_wolf

    probes = snow_wolf.probe_set(n_per_group=16, size=64, seed=2024)
    result = _audit(shortcut_model, probes, ["guided_backprop", "gradcam"])
    sane = next(c for c in result.checks if c.name == "sanity/guided_backprop")
    sim = _expected_similarity(shortcut_model, probes, "guided_backprop")
    assert sane.numbers["similarity"] == pytest.approx(sim)
    assert sane.numbers["used"] is (sim < 0.5)
    word = "passes the randomization sanity check" if sim < 0.5 else "is not used as evidence"
    assert sane.finding.startswith(f"guided_backprop {word}")
