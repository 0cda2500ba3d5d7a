"""Gradient-weighted attention rollout (Chefer et al. 2021): shape, known answers, no side effects, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _token_models import TokenViT, images, small_vit
from torch import nn
from torchvision.models import resnet18
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import SwinTransformer

from audit.engine.model import AttributionError, hook_count
from audit.methods import METHODS, explain


def hand_rollout(
    model: TokenViT, x: torch.Tensor, target: list[int], start: int = 0
) -> torch.Tensor:
    """The rollout written out on the model's hand-computed attention (A is a plain tensor of the graph)."""
    with torch.no_grad():
        reference = model(x)
    model.manual = True
    try:
        logits = model(x)  # the parameters require grad: the graph reaches every A
    finally:
        model.manual = False
    torch.testing.assert_close(
        logits, reference, rtol=1e-5, atol=1e-5
    )  # the hand attention is the module's
    attentions = model.attentions
    grads = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), attentions)
    n, _, t, _ = attentions[0].shape
    eye = torch.eye(t)
    r = eye.expand(n, t, t)
    for a, g in list(zip(attentions, grads, strict=True))[start:]:
        r = r + (g * a).clamp(min=0).mean(dim=1) @ r
    relevance = r[:, 0, 1:] if model.class_token is not None else (r - eye).mean(dim=1)
    s = math.isqrt(relevance.shape[1])
    return F.interpolate(
        relevance.reshape(n, 1, s, s), size=x.shape[-2:], mode="bilinear", align_corners=False
    )


def test_registered_with_its_options() -> None:
    assert "attention_rollout" in METHODS
    with pytest.raises(AttributionError, match=r"unknown option.*layer.*start_layer, max_batch"):
        explain("attention_rollout", small_vit(), images(1), layer="encoder")


def test_maps_on_torchvision_vit_are_finite_nonnegative_and_chunking_free() -> None:
    m, x = small_vit(), images(4)
    target = [0, 1, 1, 0]
    maps = explain("attention_rollout", m, x, target)
    assert maps.shape == (4, 1, 32, 32) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert maps.flatten(1).amax(dim=1).gt(0).all()
    torch.testing.assert_close(
        explain("attention_rollout", m, x, target, max_batch=3), maps, rtol=1e-5, atol=1e-10
    )
    torch.testing.assert_close(
        explain("attention_rollout", m, x[2:], target[2:]), maps[2:], rtol=1e-5, atol=1e-10
    )


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("class_token", [True, False], ids=["class_token", "mean_pool"])
def test_equals_the_rollout_by_hand(depth: int, class_token: bool) -> None:
    m, x = TokenViT(depth=depth, class_token=class_token).eval(), images(3)
    target = [0, 2, 1]
    got = explain("attention_rollout", m, x, target)
    assert got.gt(0).any()
    torch.testing.assert_close(got, hand_rollout(m, x, target), rtol=1e-4, atol=1e-8)


def test_start_layer_leaves_the_earlier_layers_out() -> None:
    m, x = TokenViT(depth=3).eval(), images(2)
    expected = hand_rollout(m, x, [1, 1], start=2)
    torch.testing.assert_close(
        explain("attention_rollout", m, x, 1, start_layer=2), expected, rtol=1e-4, atol=1e-8
    )
    torch.testing.assert_close(
        explain("attention_rollout", m, x, 1, start_layer=-1), expected, rtol=1e-4, atol=1e-8
    )
    assert not torch.allclose(explain("attention_rollout", m, x, 1), expected)
    for bad in (3, -4):
        with pytest.raises(
            AttributionError, match=r"start_layer .* outside the model's 3 attention layers"
        ):
            explain("attention_rollout", m, x, start_layer=bad)
    with pytest.raises(AttributionError, match="start_layer must be an integer"):
        explain("attention_rollout", m, x, start_layer=1.0)


def test_the_map_sits_on_the_one_token_whose_attention_gradient_is_not_zero() -> None:
    """One layer; every token but patch k is zero (no biases, no positions), so its value is 0 and
    d(logit)/dA[class token, j] = 0 for every j != k: all the rollout's mass is on patch k."""
    m = TokenViT(depth=1, dim=8, classes=3).eval()
    with torch.no_grad():
        m.conv_proj.bias.zero_()
        m.pos.zero_()
        m.class_token.zero_()
        m.blocks[0].attn.in_proj_bias.zero_()
    row, col = 1, 2  # patch k = row * 4 + col of the 4x4 grid
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] = torch.rand(
        1, 3, 8, 8, generator=torch.Generator().manual_seed(0)
    )
    some = False
    for target in range(3):
        got = explain("attention_rollout", m, x, target)[0, 0]
        if not got.gt(0).any():  # relu(grad * A) <= 0 in every head for this class
            continue
        some = True
        peak = divmod(int(got.argmax()), 32)
        assert (peak[0] // 8, peak[1] // 8) == (row, col)
        # bilinear upsampling reaches at most the neighbouring patches; the rest is exactly zero
        far = torch.ones(32, 32, dtype=torch.bool)
        far[8 * (row - 1) : 8 * (row + 2), 8 * (col - 1) : 8 * (col + 2)] = False
        assert got[far].eq(0).all()
    assert some


def test_no_side_effects() -> None:
    m, x = TokenViT(depth=2).train(), images(3)
    attn = m.blocks[1].attn
    own_forward = attn.forward  # an instance attribute the user had set is put back

    def user_forward(*args, **kwargs):
        return own_forward(*args, **kwargs)

    attn.forward = user_forward
    flags = [p.requires_grad for p in m.parameters()]
    before = x.clone()
    hooks = hook_count(m)
    maps = explain("attention_rollout", m, x, 1)
    assert m.training and all(mod.training for mod in m.modules())
    assert [p.requires_grad for p in m.parameters()] == flags and all(
        p.grad is None for p in m.parameters()
    )
    assert hook_count(m) == hooks and torch.equal(x, before)
    assert attn.__dict__["forward"] is user_forward and "forward" not in m.blocks[0].attn.__dict__
    del attn.forward
    # the same under no_grad and inference_mode (explain's guarantees)
    with torch.no_grad():
        torch.testing.assert_close(explain("attention_rollout", m, x, 1), maps)
    with torch.inference_mode():
        torch.testing.assert_close(explain("attention_rollout", m, x, 1), maps)
    # an error after the forward pass leaves nothing behind either
    with pytest.raises(AttributionError):
        explain("attention_rollout", m, x, 1, start_layer=7)
    assert not [n for n, mod in m.named_modules() if "forward" in mod.__dict__]
    assert hook_count(m) == hooks


def test_refuses_models_without_global_self_attention() -> None:
    torch.manual_seed(0)
    x = images(1)
    with pytest.raises(
        AttributionError, match=r"needs global self-attention.*MultiheadAttention.*CNN.*use gradcam"
    ):
        explain("attention_rollout", resnet18(num_classes=2).eval(), x)
    swin = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=[4, 4],
        num_classes=2,
    ).eval()
    maxvit = MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[8, 16],
        block_layers=[1, 1],
        head_dim=4,
        stochastic_depth_prob=0.0,
        num_classes=2,
    ).eval()
    for model, own in (
        (swin, "ShiftedWindowAttention"),
        (maxvit, "RelativePositionalMultiHeadAttention"),
    ):
        with pytest.raises(
            AttributionError, match=rf"MultiheadAttention.*\({own}\).*windows.*use gradcam"
        ):
            explain("attention_rollout", model, x)


def test_tokens_off_the_patch_grid_are_refused() -> None:
    class Odd(nn.Module):  # self-attention over 3 tokens: no grid of a 32x32 image
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3 * 32 * 32, 3 * 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x.flatten(1)).view(-1, 3, 8)
            return self.head(self.attn(t, t, t, need_weights=False)[0][:, 0])

    with pytest.raises(
        AttributionError, match=r"runs over 3 tokens, which do not tile the 32x32 input"
    ):
        explain("attention_rollout", Odd().eval(), images(2))
