"""Decoder-only caption transformer with a prefix (the OpenVision 2 / CapPa-style "concat" fusion).

prefix [B, K, Dd] (projected image tokens, already in decoder width) ++ text embeddings [B, T, Dd]
-> depth x pre-LN block (tanh GELU) under a prefix-LM mask (plain causal as an option) -> final LayerNorm
-> hidden [B, T, Dd] at the text positions. The untied head Linear(Dd -> V, no bias) is applied by the
loss (`encoder.kernels.linear_cross_entropy`) so that the N x V logits never exist during training.
Text tokens get no position embedding (as the paper); order comes from the causal mask alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from encoder.models.layers import Block, prefix_lm_mask


@dataclass
class DecoderConfig:
    width: int = 256
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 1024
    vocab_size: int = 32_000
    max_len: int = 128  # caption tokens, bos and eos included
    mask: str = "prefix"  # "prefix" (prefix-LM) | "causal" (plain causal over [image; text])


class PrefixDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.mask not in ("prefix", "causal"):
            raise ValueError(f"unknown decoder mask {cfg.mask!r}; choose 'prefix' or 'causal'")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_dim, eps=1e-6, approximate="tanh") for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=cfg.width**-0.5)
        for block in self.blocks:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, prefix: torch.Tensor, text: torch.Tensor, return_prefix: bool = False) -> torch.Tensor:
        """prefix [B, K, Dd], text [B, T, Dd] (embedded tokens or queries) -> hidden [B, T, Dd].

        With `return_prefix` the prefix positions are returned too: [B, K + T, Dd].
        """
        K = prefix.shape[1]
        x = torch.cat([prefix, text.to(prefix.dtype)], dim=1)
        mask = prefix_lm_mask(K, x.shape[1], causal_prefix=self.cfg.mask == "causal", device=x.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x if return_prefix else x[:, K:])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)
