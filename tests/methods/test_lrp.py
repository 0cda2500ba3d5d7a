"""LRP: conservation laws, the fast backend against zennit, reversibility, unsupported layers."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from audit.engine.model import AttributionError, hook_count
from audit.methods import COMPOSITES, explain
from audit.models import Normalized, SmallCNN

BACKENDS = ("fast", "general", "zennit")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _bn(model: nn.Module, seed: int = 0, shift: bool = True) -> nn.Module:
    """BatchNorm statistics calibrated on a batch (activations of order 1, as after training),
    random gamma; random beta, or ``shift=False``: mean and beta 0 (merged biases are 0)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(images(8, 32, seed=99))
    for m in bns:
        n = m.num_features
        m.momentum = 0.1
        m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
        if shift:
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
        else:
            m.running_mean.zero_()
            m.bias.data.zero_()
    return model.eval()


def resnet(shift: bool = True, seed: int = 0, double: bool = False) -> nn.Module:
    """A fresh copy of a (cached) torchvision ResNet-18 with 3 classes."""
    return copy.deepcopy(_resnet(shift, seed, double))


@functools.cache
def _resnet(shift: bool, seed: int, double: bool) -> nn.Module:
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=3)
    if not shift:
        m.fc.bias.data.zero_()
    m = _bn(m, seed, shift)
    return m.double() if double else m


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _bn(SmallCNN(num_classes=3, widths=(4, 8, 8)), seed)


def vgg_like(shift: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
    m = nn.Sequential(
        *block(3, 8),
        *block(8, 8),
        nn.MaxPool2d(2),
        *block(8, 16),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 16, bias=False),
        nn.ReLU(),
        nn.Linear(16, 3, bias=False),
    )
    return _bn(m, seed, shift)


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _relative(total: torch.Tensor, logit: torch.Tensor) -> float:
    return float(((total - logit).abs() / logit.abs()).max())


# ------------------------------------------------------------------ conservation
@st.composite
def bias_free_relu_nets(draw):
    c1, c2 = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    k = draw(st.sampled_from([1, 3, 5]))
    pool = draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Identity()]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    net = nn.Sequential(
        nn.Conv2d(3, c1, k, padding=k // 2, bias=False),
        nn.ReLU(),
        pool,
        nn.Conv2d(c1, c2, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * c2, 3, bias=False),
    )
    return net.eval(), draw(st.integers(0, 2))


@settings(max_examples=20, deadline=None)
@given(net_target=bias_free_relu_nets(), backend=st.sampled_from(BACKENDS))
def test_epsilon_conserves_the_logit_on_bias_free_relu_nets(net_target, backend: str) -> None:
    net, target = net_target
    x = images(2, 8)
    with torch.no_grad():
        logit = net(x)[:, target]
    assume(bool((logit.abs() > 1e-3).all()))
    # the law is exact as epsilon -> 0; zennit's default 1e-6 is absolute and absorbs up to
    # 1e-6/|z| of a unit's relevance, which is not small for the tiny random nets drawn here
    rel = explain(
        "lrp", net, x, target, composite="epsilon", epsilon=1e-9, stabilizer=1e-9, backend=backend
    )
    assert _relative(rel.sum(dim=(1, 2, 3)), logit) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("composite", [c for c in COMPOSITES if c != "epsilon_alpha2_beta1"])
@pytest.mark.parametrize("build", [vgg_like, resnet], ids=["vgg_bn", "resnet18_bn"])
def test_conservation_with_batchnorm_when_merged_biases_are_zero(
    build, composite: str, backend: str
) -> None:
    """BatchNorm with mean 0 and beta 0 merges into a bias-free layer: relevance must be conserved.

    The BatchNorms still scale every channel (random gamma, calibrated variance), so a
    merge that ignored them, or a residual addition that copied relevance to both
    branches, would break the sum; only the 1e-6 stabilizers absorb a little.
    (alpha2-beta1 is left out: it conserves only where a unit also has negative
    contributions, otherwise its beta term vanishes and relevance grows by alpha.)
    """
    m, x = build(shift=False), images()
    with torch.no_grad():
        logit = m(x)[:, 1]
    rel = explain("lrp", m, x, 1, composite=composite, backend=backend)
    assert _relative(rel.sum(dim=(1, 2, 3)), logit) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_absorption_accounted_on_resnet(backend: str) -> None:
    """With merged biases b, LRP-epsilon (eps -> 0) of a piecewise-linear net is input x gradient, and

        sum(R) + sum over BatchNorms of b_merged * d logit / d (BatchNorm output) + fc bias = logit

    (Euler's identity on the linear region). Everything the biases absorb is accounted for.
    """
    m, x = resnet(shift=True), images()
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    outs: list[torch.Tensor] = []
    # the hook hands a clone on, so torchvision's in-place `+=` and ReLU leave `o` as the BN output
    handles = [
        bn.register_forward_hook(lambda _m, _i, o: outs.append(o) or o.clone()) for bn in bns
    ]
    try:
        logits = m(x)
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(logits[:, 2].sum(), outs)
    absorbed = m.fc.bias[2].detach().expand(2).clone()
    for bn, g in zip(bns, grads, strict=True):
        b = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        absorbed += (g * b.detach()[None, :, None, None]).sum(dim=(1, 2, 3))
    rel = explain(
        "lrp", m, x, 2, composite="epsilon", epsilon=1e-9, stabilizer=1e-9, backend=backend
    )
    assert _relative(rel.sum(dim=(1, 2, 3)) + absorbed, logits[:, 2].detach()) < 1e-4
    assert _relative(absorbed, logits[:, 2].detach()) > 1e-2  # the biases matter in this test


# ------------------------------------------------------------------ the stabilizer
def test_the_stabilizer_is_zennits_at_usual_scales_and_shrinks_with_tiny_activations() -> None:
    from audit.methods._lrp_fast import UNIT_SCALE, stabilizer

    z = torch.tensor(
        [[0.5, -2e-3, 0.0], [1e-14, -4e-14, 0.0], [0.0, 0.0, 0.0], [UNIT_SCALE, 0.0, 0.0]]
    )
    e = stabilizer(z, 1e-6).flatten()
    assert e[0] == torch.tensor(1e-6) and e[3] == torch.tensor(
        1e-6
    )  # exactly zennit's from UNIT_SCALE up
    assert torch.isclose(
        e[1], torch.tensor(4e-14 * 1e-6 / UNIT_SCALE)
    )  # as if the row were rescaled
    assert 0 < e[2] < 1e-30  # an all-zero row: no 0 / 0
    assert torch.equal(
        stabilizer(z[1:2], 1e-6), stabilizer(z, 1e-6)[1:2]
    )  # per row: no batch mixing
    assert stabilizer(z, 0.25)[0] == 0.25  # a large epsilon is the user's choice, kept as given
    assert float(stabilizer(z, 0.0).abs().max()) == 0.0


# ------------------------------------------------------------------ fast backend == zennit
@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("build", [resnet, small_cnn], ids=["resnet18", "small_cnn"])
def test_fast_backend_equals_zennit(build, composite: str) -> None:
    m, x = build(), images()
    fast = explain("lrp", m, x, composite=composite, backend="fast")
    ref = explain("lrp", m, x, composite=composite, backend="zennit")
    # the epsilon rule divides by small pre-activations: float32 rounding is amplified there
    tol = 1e-4 if composite == "epsilon" else 1e-5
    assert float((fast - ref).abs().max()) <= tol * float(ref.abs().max())


def test_rule_cache_follows_every_change_of_the_weights() -> None:
    """The fast backend reuses its merged, clamped weights only while the parameters are unchanged."""
    from audit.methods import lrp as lrp_module

    m, x = small_cnn(), images()

    def fresh() -> torch.Tensor:
        lrp_module._RULES.clear()
        return explain("lrp", m, x, backend="fast")

    first = fresh()
    assert torch.equal(explain("lrp", m, x, backend="fast"), first)  # served from the cache
    changes = [
        # an optimizer step (in place), new BatchNorm statistics, a new parameter object,
        # a loaded state dict (copied in place)
        lambda: torch.optim.SGD(m.parameters(), lr=0.01).step(),
        lambda: m.features[4].running_mean.add_(0.5),
        lambda: setattr(m.features[0], "weight", nn.Parameter(m.features[0].weight.detach() * -1)),
        lambda: m.load_state_dict(small_cnn(seed=5).state_dict()),
    ]
    before = first
    for i, change in enumerate(changes):
        explain("lrp", m, x, backend="fast")  # cache the current weights
        with torch.no_grad():
            for p in m.parameters():
                p.grad = torch.ones_like(p)  # for the optimizer step; cleared below
            change()
            for p in m.parameters():
                p.grad = None
        got = explain("lrp", m, x, backend="fast")
        assert float(got.abs().max()) > 0  # a live network: equal maps would mean something
        assert torch.equal(got, fresh()), f"change {i} was served stale relevance"
        assert not torch.equal(got, before), f"change {i} did not change the maps"
        before = got


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma_box"])
def test_deferred_sign_check_learns_signed_inputs_and_recomputes(
    monkeypatch, composite: str
) -> None:
    """The GPU path (input signs assumed, checked once at the end) run on the CPU.

    Layer '3' reads a conv's output directly (negative values): its sign is assumed, and
    the first call finds it wrong and runs again; later calls use the general form there
    at once. '2' reads a ReLU's output and '6' a max pooling of one: the autograd graph
    proves them non-negative, so they are never checked. Maps equal the per-layer
    check's and zennit's.
    """
    from audit.methods import _lrp_fast

    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).eval()
    x = images(2, 8)
    immediate = explain("lrp", m, x, composite=composite, backend="fast")
    ref = explain("lrp", m, x, composite=composite, backend="zennit")
    assert _lrp_fast._SIGNED_INPUTS.get(m, set()) == set()  # the per-layer check learns nothing

    monkeypatch.setattr(_lrp_fast, "DEFERRED_SIGN_CHECK", {"cpu"})
    passes, checked = [], []
    handle = m[9].register_forward_pre_hook(lambda *_: passes.append(1))
    recheck = _lrp_fast.FastLRP.recheck

    def spy(self) -> bool:
        checked.extend(name for name, _ in self.assumed)
        return recheck(self)

    monkeypatch.setattr(_lrp_fast.FastLRP, "recheck", spy)
    try:
        first = explain("lrp", m, x, composite=composite, backend="fast")
        assert len(passes) == 2  # the assumption about '3' failed: one pass again
        # '0' reads the images in [0, 1]: assumed, checked and right (the box rule there
        # does not split by sign)
        assert checked == (["3"] if composite == "epsilon_gamma_box" else ["0", "3"])
        assert _lrp_fast._SIGNED_INPUTS[m] == {"3"}
        second = explain("lrp", m, x, composite=composite, backend="fast")
        assert len(passes) == 3  # learned: one pass
    finally:
        handle.remove()
    for got in (first, second):
        assert torch.allclose(got, immediate, rtol=1e-6, atol=1e-7 * float(immediate.abs().max()))
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # the general form at a layer that is wrongly assumed non-negative gives other maps:
    # the check above can fail
    _lrp_fast._SIGNED_INPUTS[m].clear()
    _lrp_fast._SIGNED_INPUTS[m].add("__none__")
    monkeypatch.setattr(_lrp_fast.FastLRP, "recheck", lambda self: False)
    wrong = explain("lrp", m, x, composite=composite, backend="fast")
    assert not torch.allclose(wrong, immediate, rtol=1e-3)


def test_fast_backend_equals_zennit_on_bottleneck_blocks() -> None:
    """The ResNet-50 block type (torchvision Bottleneck), with and without a downsample."""
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Bottleneck(16, 4),
        Bottleneck(16, 8, stride=2, downsample=down),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 3),
    )
    m[-1].bias.data.zero_()
    m, x = _bn(m, shift=False), images()  # merged biases 0: the epsilon rule must conserve
    for composite, tol in (("epsilon_plus_flat", 1e-5), ("epsilon", 1e-4)):
        fast = explain("lrp", m, x, composite=composite, backend="fast")
        ref = explain("lrp", m, x, composite=composite, backend="zennit")
        assert float((fast - ref).abs().max()) <= tol * float(ref.abs().max())
    with torch.no_grad():
        logit = m(x).max(dim=1).values
    assert _relative(fast.sum(dim=(1, 2, 3)), logit) < 1e-4


@pytest.mark.parametrize("composite", COMPOSITES)
def test_fast_backend_equals_zennit_float64_resnet(composite: str) -> None:
    m, x = resnet(double=True), images().double()
    fast = explain("lrp", m, x, composite=composite, backend="fast")
    ref = explain("lrp", m, x, composite=composite, backend="zennit")
    assert float((fast - ref).abs().max()) <= 1e-9 * float(ref.abs().max())


def test_close_to_pristine_zennit_resnet_canonizer() -> None:
    """Against zennit's own EpsilonPlusFlat + ResNetCanonizer (its merged BatchNorms keep eps: ~1e-4)."""
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    m, x = resnet(), images()
    ours = explain("lrp", m, x, 0)
    xx = x.clone().requires_grad_(True)
    with EpsilonPlusFlat(canonizers=[ResNetCanonizer()]).context(m):
        out = m(xx)
        seed = torch.zeros_like(out)
        seed[:, 0] = out[:, 0].detach()
        (ref,) = torch.autograd.grad(out, xx, seed)
    ref = ref.sum(dim=1, keepdim=True)
    assert float((ours - ref).abs().max()) <= 1e-3 * float(ref.abs().max())


def test_auto_backend_is_fast_when_supported_and_general_otherwise() -> None:
    m, x = small_cnn(), images()
    torch.testing.assert_close(explain("lrp", m, x), explain("lrp", m, x, backend="fast"))
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(2))
    gelu(x)
    with pytest.raises(AttributionError, match="fast LRP backend cannot run.*'1' \\(GELU\\)"):
        explain("lrp", gelu, x, backend="fast")
    torch.testing.assert_close(explain("lrp", gelu, x), explain("lrp", gelu, x, backend="general"))
    # zennit's Pass rule on the GELU is the general backend's identity rule
    torch.testing.assert_close(explain("lrp", gelu, x), explain("lrp", gelu, x, backend="zennit"))


# ------------------------------------------------------------------ wrappers and options
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalized_wrapper_is_looked_through(backend: str) -> None:
    inner, x = resnet(), images()
    wrapped = Normalized(inner, MEAN, STD)
    xn = (x - wrapped.mean) / wrapped.std
    torch.testing.assert_close(
        explain("lrp", wrapped, x, 1, backend=backend),
        explain("lrp", inner, xn, 1, backend=backend),
    )
    low, high = (
        (0 - torch.tensor(MEAN)) / torch.tensor(STD),
        (1 - torch.tensor(MEAN)) / torch.tensor(STD),
    )
    torch.testing.assert_close(
        explain("lrp", wrapped, x, 1, composite="epsilon_gamma_box", backend=backend),
        explain(
            "lrp", inner, xn, 1, composite="epsilon_gamma_box", low=low, high=high, backend=backend
        ),
    )


def test_option_errors() -> None:
    m, x = small_cnn(), images()
    with pytest.raises(
        AttributionError, match="unknown LRP composite 'epsilon_flat'.*epsilon_plus_flat"
    ):
        explain("lrp", m, x, composite="epsilon_flat")
    with pytest.raises(
        AttributionError, match="unknown LRP backend 'captum'.*auto, fast, general, graph, zennit"
    ):
        explain("lrp", m, x, backend="captum")
    with pytest.raises(AttributionError, match="low must not exceed high"):
        explain("lrp", m, x, composite="epsilon_gamma_box", low=1.0, high=0.0)


# ------------------------------------------------------------------ reversibility
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("build", [resnet, small_cnn], ids=["resnet18", "small_cnn"])
def test_model_is_left_exactly_as_it_was(build, backend: str) -> None:
    m, x = build(), images()
    with torch.no_grad():
        out_before = m(x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    params = {k: (p, p.requires_grad) for k, p in m.named_parameters()}
    modules = dict(m.named_modules())
    explain("lrp", m, x, backend=backend)
    assert hook_count(m) == 0
    assert dict(m.named_modules()) == modules  # no canonizer_sum left
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    assert {k: (p, p.requires_grad) for k, p in m.named_parameters()} == params
    assert all(p.grad is None for p in m.parameters())
    after = m.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert all(mod.eps == 1e-5 for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    with torch.no_grad():
        assert torch.equal(m(x), out_before)


def test_model_is_restored_after_an_error_mid_forward() -> None:
    m, x = small_cnn(), images()
    with torch.no_grad():
        m.fc.bias[0] = float("inf")
    with pytest.raises(AttributionError, match="NaN or Inf"):
        explain("lrp", m, x, backend="fast")
    assert hook_count(m) == 0 and all("forward" not in mod.__dict__ for mod in m.modules())


# ------------------------------------------------------------------ unsupported layers
class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class _WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.attn = nn.MultiheadAttention(4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).permute(2, 0, 1)
        return self.fc(self.attn(t, t, t)[0].mean(0))


def _head(*mods: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), *mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (_head(nn.LayerNorm([4, 32, 32])), r"layer '1' \(LayerNorm\).*parameters \(weight, bias\)"),
        (_WithAttention(), r"layer 'attn' \(MultiheadAttention\).*in_proj_weight"),
        (_head(_Scale()), r"layer '1' \(_Scale\).*parameters \(gain\)"),
        (_head(_Square()), r"layer '1' \(_Square\): no layer rule is known"),
        (_head(nn.GroupNorm(2, 4)), r"layer '1' \(GroupNorm\)"),
    ],
    ids=["layernorm", "attention", "custom_with_params", "custom_without_params", "groupnorm"],
)
@pytest.mark.parametrize("backend", ("fast", "zennit"))
def test_layers_without_a_layer_rule_are_named(
    model: nn.Module, pattern: str, backend: str
) -> None:
    """The module-level backends name the layer and point to the general backend, which explains them."""
    with pytest.raises(
        AttributionError,
        match=f"the {backend} LRP backend cannot explain {pattern}.*backend='general'",
    ):
        explain("lrp", model, images(), backend=backend)
    rel = explain("lrp", model, images())  # auto: the general backend's operation rules
    assert rel.shape == (2, 1, 32, 32) and torch.isfinite(rel).all()


def test_passthrough_declares_a_parameter_free_layer() -> None:
    m = _head(nn.ReLU(), nn.Upsample(scale_factor=1))
    with pytest.raises(AttributionError, match="Upsample"):
        explain("lrp", m, images(), backend="zennit")
    assert explain("lrp", m, images(), passthrough=(nn.Upsample,), backend="zennit").shape == (
        2,
        1,
        32,
        32,
    )


def test_fast_backend_refuses_a_misplaced_batchnorm() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)  # registered after conv1, but applied after conv2
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.bn(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(h.mean(dim=(2, 3)))

    m = Odd().eval()
    with pytest.raises(
        AttributionError,
        match=r"BatchNorm 'bn' does not alone read the output of the layer registered before it.*backend='general'",
    ):
        explain("lrp", m, images(), backend="fast")
    assert hook_count(m) == 0 and all("forward" not in mod.__dict__ for mod in m.modules())


class _SharedConvOutput(nn.Module):
    """conv1's output is read by the BatchNorm registered after it *and* by a pooled shortcut
    (MaxViT's first MBConv): merging the BatchNorm into conv1 would feed the shortcut normalized
    values. Bias-free, BatchNorm without shift: the epsilon rule conserves the logit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 2.0)
            self.bn.running_var.uniform_(
                0.1, 0.5
            )  # far from 1: the two readers see different values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = torch.relu(self.bn(h)) + self.pool(h)
        return self.fc(torch.relu(self.conv2(h)).mean(dim=(2, 3)))


def test_a_batchnorm_is_merged_only_into_a_layer_whose_output_it_alone_reads() -> None:
    m, x = _SharedConvOutput().eval(), images(2, 8)
    with torch.no_grad():
        logit = m(x)[:, 1]
    for backend in ("auto", "general"):
        rel = explain(
            "lrp", m, x, 1, composite="epsilon", epsilon=1e-9, stabilizer=1e-9, backend=backend
        )
        assert _relative(rel.sum(dim=(1, 2, 3)), logit) < 1e-4, backend  # the model's own logit
    with pytest.raises(
        AttributionError, match=r"BatchNorm 'bn' does not alone read.*backend='general' or 'auto'"
    ):
        explain("lrp", m, x, 1, backend="fast")
    assert all("forward" not in mod.__dict__ for mod in m.modules())


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("composite", COMPOSITES)
def test_cuda_fast_equals_zennit(composite: str) -> None:
    # float64: in float32 cuDNN may run the convolutions in TF32 (10-bit mantissa), and
    # the two backends' different operation orders then differ by ~1e-3 relative
    m, x = resnet().cuda().double(), images().cuda().double()
    fast = explain("lrp", m, x, composite=composite, backend="fast")
    ref = explain("lrp", m, x, composite=composite, backend="zennit")
    assert fast.device.type == "cuda"
    assert float((fast - ref).abs().max()) <= 1e-8 * float(ref.abs().max())
    if composite != "epsilon":
        # float32 (TF32 convolutions) stays within 2% of float64 for the composites with
        # sign-aware rules; the pure epsilon rule divides by near-zero pre-activations and
        # was seen 9% off (max-abs) on an H100, so it is only checked in float64 above
        m32, x32 = resnet().cuda(), images().cuda()
        fast32 = explain("lrp", m32, x32, composite=composite, backend="fast").double()
        assert float((fast32 - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
