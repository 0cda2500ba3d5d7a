"""LRP's general backend: the rules for modern blocks (AttnLRP, identity, uniform, fixed gates)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _families import FAMILIES, build, calibrate, images
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from audit.engine.model import AttributionError, hook_count
from audit.methods import COMPOSITES, explain
from audit.methods._lrp_general import RelevanceMode, _mha, fixed_gates, sdpa_rule
from audit.methods._lrp_layers import inspect_layers, pair_batchnorms


def _frozen(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


# ------------------------------------------------------------------ forward values unchanged
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_rules_change_no_forward_value(name: str) -> None:
    """Every replaced operation computes the same values; only its backward is the rule."""
    m, size = build(name)
    x = images(2, size)
    with torch.no_grad():
        plain = m(x)
    _frozen(m)
    with fixed_gates(m), RelevanceMode():
        ruled = m(x.clone().requires_grad_(True))
    torch.testing.assert_close(ruled, plain, atol=1e-5, rtol=1e-5)
    assert all("forward" not in mod.__dict__ for mod in m.modules())


# ------------------------------------------------------------------ known answers
class _ModernBiasFree(nn.Module):
    """Patch conv -> GELU -> LayerNorm -> product of two branches -> x / const -> attention-free
    token mixing -> mean -> linear; no biases anywhere, so relevance is conserved exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4, bias=False)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(8, bias=False)
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.mix = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.act(self.embed(x)).flatten(2).transpose(1, 2)  # [N, T, C]
        t = self.norm(t)
        t = self.a(t) * F.silu(self.b(t))  # a gated product of two input-dependent branches
        t = F.normalize(t, dim=-1) * 3.0 + self.mix(t)
        t = t.transpose(1, 2) @ torch.softmax(torch.ones(t.shape[1], 1), 0)  # fixed token weights
        return self.head(t.squeeze(-1))


def test_identity_uniform_and_constant_divisor_rules_conserve_the_logit() -> None:
    torch.manual_seed(0)
    m = _ModernBiasFree().eval()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
    x = images(3, 16)
    target = torch.tensor([0, 1, 2])
    logits = m(x).gather(1, target[:, None]).squeeze(1)
    rel = explain("lrp", m, x, target, composite="epsilon", epsilon=1e-9, stabilizer=1e-9)
    torch.testing.assert_close(rel.sum(dim=(1, 2, 3)), logits.detach(), rtol=1e-4, atol=1e-6)
    # the gradient instead of the rules would not conserve it
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m(xg).gather(1, target[:, None]).sum(), xg)
    assert not torch.allclose((g * xg).sum(dim=(1, 2, 3)), logits.detach(), rtol=1e-2)


def test_softmax_gets_attnlrps_rule() -> None:
    """``R_x = x * (R_y - s * sum(R_y))`` (AttnLRP, Prop. 3.2) where ``R_y = y * g``."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, requires_grad=True)
    w = torch.randn(5)
    with RelevanceMode():
        y = torch.softmax(x, -1)
        out = (y * w).sum()
    (g,) = torch.autograd.grad(out, x)
    s = torch.softmax(x.detach(), -1)
    r_y = s * w
    expected = x.detach() * (r_y - s * r_y.sum(-1, keepdim=True))
    torch.testing.assert_close(x.detach() * g, expected)


def test_a_product_of_two_input_dependent_factors_splits_relevance_in_half() -> None:
    a = torch.tensor([[2.0, -1.0]], requires_grad=True)
    b = torch.tensor([[3.0, 4.0]], requires_grad=True)
    with RelevanceMode():
        y = (a * b).sum() + (a.unsqueeze(1) @ b.unsqueeze(2)).sum()
    ga, gb = torch.autograd.grad(y, (a, b))
    r = (a * b).detach() * 2  # each product's relevance y * 1, twice
    torch.testing.assert_close(a.detach() * ga, r / 2)
    torch.testing.assert_close(b.detach() * gb, r / 2)


def test_elementwise_nonlinearities_pass_relevance_unchanged() -> None:
    x = torch.tensor([[-2.0, -0.5, 0.3, 1.7]], requires_grad=True)
    for f in (F.gelu, F.silu, F.hardswish, torch.tanh, F.mish, lambda t: F.elu(t), lambda t: t**3):
        with RelevanceMode(eps=1e-12):
            y = f(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(x.detach() * g, y.detach(), msg=str(f))


def test_a_constant_divided_by_the_input_is_refused() -> None:
    x = torch.rand(1, 3, requires_grad=True)
    with pytest.raises(AttributionError, match="dividing a constant by an input-dependent tensor"):
        with RelevanceMode():
            _ = 1.0 / x


# ------------------------------------------------------------------ attention, rebuilt
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float", "padding"])
def test_multi_head_attention_rebuilt_equals_torch(batched: bool, mask: str | None) -> None:
    torch.manual_seed(0)
    mha = _frozen(nn.MultiheadAttention(8, 2))
    L, N = 5, 3
    q = torch.randn(L, N, 8) if batched else torch.randn(L, 8)
    kw: dict = {}
    if mask == "bool":
        kw["attn_mask"] = torch.rand(L, L) > 0.7
        kw["attn_mask"].fill_diagonal_(False)
    elif mask == "float":
        kw["attn_mask"] = torch.randn(L, L)
    elif mask == "padding" and batched:
        kw["key_padding_mask"] = torch.zeros(N, L, dtype=torch.bool)
        kw["key_padding_mask"][:, -1] = True
    for avg in (True, False):
        ref_out, ref_w = mha(q, q, q, average_attn_weights=avg, **kw)
        args = (
            q,
            q,
            q,
            8,
            2,
            mha.in_proj_weight,
            mha.in_proj_bias,
            None,
            None,
            False,
            0.0,
            mha.out_proj.weight,
            mha.out_proj.bias,
            False,
        )
        out, w = _mha(*args, need_weights=True, average_attn_weights=avg, **kw)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["plain", "bool", "float", "causal", "scale"])
def test_scaled_dot_product_attention_rebuilt_equals_torch(case: str) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 5)
    kw: dict = {
        "bool": {"attn_mask": torch.rand(6, 7) > 0.3},
        "float": {"attn_mask": torch.randn(6, 7)},
        "causal": {"is_causal": True},
        "scale": {"scale": 0.3},
        "plain": {},
    }[case]
    if case == "bool":
        kw["attn_mask"][:, 0] = True
    if case == "causal":
        k, v = k[:, :, :6], v[:, :, :6]
    torch.testing.assert_close(
        sdpa_rule(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw)
    )


# ------------------------------------------------------------------ blocks
def test_squeeze_excitation_gate_is_a_fixed_multiplier() -> None:
    """All relevance reaches the gated features; none enters the gate's branch."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.se = SqueezeExcitation(8, 4)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
            h = torch.relu(self.conv(x))
            h = self.se(h) if scale is None else h * scale
            return self.fc(h.mean(dim=(2, 3)))

    class Fixed(nn.Module):  # the same network with the gate's value as a constant
        def __init__(self, net: Net, scale: torch.Tensor) -> None:
            super().__init__()
            self.net, self.scale = net, scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x, self.scale)

    torch.manual_seed(0)
    net = Net().eval()
    x = images(1, 16)
    with torch.no_grad():
        scale = net.se._scale(torch.relu(net.conv(x)))
    got = explain("lrp", net, x, 1, backend="general")
    ref = explain("lrp", Fixed(net, scale), x, 1, backend="general")
    torch.testing.assert_close(got, ref)


def test_densenet_batchnorms_merge_only_into_the_conv_they_read() -> None:
    m, size = build("densenet")
    plan = inspect_layers(m)
    pairs = pair_batchnorms(m, plan, images(1, size))
    named = {mod: n for n, mod in m.named_modules()}
    got = {named[bn]: named[lin] for bn, lin in pairs.items()}
    assert got["features.norm0"] == "features.conv0"
    layer = "features.denseblock2.denselayer2"
    assert got[f"{layer}.norm2"] == f"{layer}.conv1"
    # norm1 reads the concatenation of all earlier features, not the conv registered before it
    assert f"{layer}.norm1" not in got and "features.transition1.norm" not in got
    rel = explain("lrp", m, images(2, size), 0)
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0


def test_a_batchnorm_registered_out_of_order_is_merged_where_it_runs() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)  # registered after conv1, applied after conv2
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(self.conv2(torch.relu(self.conv1(x)))).relu().mean(dim=(2, 3)))

    class Ordered(nn.Module):
        def __init__(self, odd: Odd) -> None:
            super().__init__()
            self.conv1, self.conv2, self.bn, self.fc = odd.conv1, odd.conv2, odd.bn, odd.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(self.conv2(torch.relu(self.conv1(x)))).relu().mean(dim=(2, 3)))

    torch.manual_seed(0)
    odd = calibrate(Odd(), 16)
    x = images(2, 16)
    for composite in COMPOSITES:
        got = explain("lrp", odd, x, 1, composite=composite, backend="general")
        ref = explain("lrp", Ordered(odd), x, 1, composite=composite, backend="fast")
        torch.testing.assert_close(got, ref, msg=composite)


# ------------------------------------------------------------------ the general backend elsewhere
@pytest.mark.parametrize("composite", COMPOSITES)
def test_general_equals_fast_on_resnet(composite: str) -> None:
    m, size = build("resnet")
    x = images(2, 64)
    torch.testing.assert_close(
        explain("lrp", m, x, composite=composite, backend="general"),
        explain("lrp", m, x, composite=composite, backend="fast"),
    )


def test_general_equals_zennit_where_zennits_pass_rule_applies() -> None:
    """A GELU/Hardswish CNN without residuals: zennit's Pass rule is the identity rule."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.GELU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.Hardswish(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 8),
        nn.SiLU(),
        nn.Linear(8, 3),
    )
    m = calibrate(m, 16)
    x = images(2, 16)
    for composite in COMPOSITES:
        torch.testing.assert_close(
            explain("lrp", m, x, composite=composite, backend="general"),
            explain("lrp", m, x, composite=composite, backend="zennit"),
            atol=1e-5,
            rtol=1e-4,
            msg=composite,
        )


@pytest.mark.parametrize("name", ["vit", "swin_v2", "convnext", "efficientnet", "maxvit"])
def test_general_backend_leaves_the_model_as_it_was(name: str) -> None:
    m, size = build(name)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    explain("lrp", m, images(2, size), 0)
    assert hook_count(m) == 0 and all("forward" not in mod.__dict__ for mod in m.modules())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.overrides._is_torch_function_mode_enabled()
