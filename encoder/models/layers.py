"""Transformer pieces shared by the ViT, the caption decoders and the text encoder.

Shapes: B batch, L sequence length, D width. Pre-LN blocks: x + attn(norm1(x)), then x + mlp(norm2(x)).
`mask` follows `F.scaled_dot_product_attention`: a bool [L, L] or [B, 1, L, L] tensor, True = may attend.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.approximate = approximate  # "none" = exact GELU (ViT), "tanh" (caption decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float = 1e-6, approximate: str = "none"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim, approximate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def prefix_lm_mask(prefix: int, length: int, causal_prefix: bool = False, device=None) -> torch.Tensor:
    """[L, L] bool mask: the first `prefix` positions see each other, the rest are causal and see the prefix.

    With `causal_prefix=True` it is a plain causal mask over the whole sequence.
    """
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) if causal_prefix else (j <= i) | (j < prefix)
