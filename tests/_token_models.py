"""Small token models for the Grad-CAM-on-tokens and attention-rollout tests (CPU, milliseconds).

* :func:`small_vit`: torchvision's ``VisionTransformer`` at 32 px, 8 px patches (4x4
  grid + class token), its zero-initialised head re-drawn so gradients are non-zero.
* :class:`TokenViT`: a ViT-like model on ``nn.MultiheadAttention`` with or without a
  class token (mean pooling then), whose attention can also be computed by hand
  (``manual=True``): the hand path exposes the softmax attention ``A`` of every layer
  as an ordinary tensor of the graph, so a test can take d(logit)/dA itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


def small_vit(seed: int = 0, num_layers: int = 2) -> VisionTransformer:
    torch.manual_seed(seed)
    m = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=2,
    )
    nn.init.normal_(
        m.heads.head.weight, std=0.02
    )  # torchvision zero-initialises it: every gradient would be 0
    return m.eval()


def images(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hand_attention(
    mha: nn.MultiheadAttention, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of a batch-first ``mha`` without masks, by hand: ``(output, A [N, heads, T, T])``."""
    n, t, d = x.shape
    h = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(n, t, h, d // h).transpose(1, 2) for z in (q, k, v))
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
    out = (a @ v).transpose(1, 2).reshape(n, t, d)
    return mha.out_proj(out), a


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(
        self, x: torch.Tensor, attentions: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        y = self.ln_1(x)
        if attentions is None:
            # the default need_weights=True: the caller gets weights averaged over heads
            y, weights = self.attn(y, y, y)
            assert weights is not None and weights.shape == (x.shape[0], x.shape[1], x.shape[1])
        else:
            y, a = hand_attention(self.attn, y)
            attentions.append(a)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TokenViT(nn.Module):
    """Patch embedding, optional class token, ``depth`` blocks, a head on the class token or the token mean."""

    def __init__(
        self,
        size: int = 32,
        patch: int = 8,
        dim: int = 16,
        heads: int = 2,
        depth: int = 2,
        classes: int = 3,
        class_token: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(0.5 * torch.randn(1, 1, dim)) if class_token else None
        self.pos = nn.Parameter(0.5 * torch.randn(1, (size // patch) ** 2 + int(class_token), dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.manual = False
        self.attentions: list[torch.Tensor] = []  # the hand path's A per layer (last forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv_proj(x).flatten(2).transpose(1, 2)
        if self.class_token is not None:
            t = torch.cat([self.class_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.pos
        self.attentions = []
        for block in self.blocks:
            t = block(t, self.attentions if self.manual else None)
        t = self.norm(t)
        return self.head(t[:, 0] if self.class_token is not None else t.mean(dim=1))
