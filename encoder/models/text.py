"""Text encoder of the contrastive baselines (OpenVision v1, CLIP): bidirectional, pooled at the last token.

tokens [B, L] (bos ... eos, pad 0, L <= context) -> token embedding + learned position embedding [B, L, Dt]
-> depth x pre-LN block (exact GELU), bidirectional, pads masked out as keys -> final LayerNorm
-> tokens [B, L, Dt] and pooled [B, Dt] = the hidden state at the last real token (eos). The contrastive
head Linear(Dt -> E, no bias) is `head`; the models apply it.

Deviation: big_vision pools at position -1 of a sequence padded to the full context without a padding mask;
here pads are masked and the pooled token is the eos, so a text's features do not depend on how much the
batch around it was padded (identical for padding to the longest text or to the context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from encoder.models.layers import Block
from encoder.tokenizer import PAD, VOCAB_ROWS


@dataclass
class TextConfig:
    """Text encoder of the contrastive baselines (bidirectional, pooled at the last token)."""

    width: int = 256
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 1024
    context: int = 80


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, vocab_size: int = VOCAB_ROWS):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_dim, eps=1e-6) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.head = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens [B, L] -> {"tokens": [B, L, Dt] (after the final LN), "pooled": [B, Dt], "keep": [B, L] bool}."""
        B, L = tokens.shape
        if L > self.cfg.context:
            raise ValueError(f"text of {L} tokens is longer than the text context {self.cfg.context}")
        keep = tokens != PAD
        x = self.embed(tokens) + self.pos_embed[:, :L]
        mask = keep[:, None, None, :]  # [B, 1, 1, L]: every position may attend to every real token
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        last = keep.sum(dim=1).clamp(min=1) - 1  # tokens are contiguous: bos ... eos, then pads
        pooled = x[torch.arange(B, device=x.device), last]
        return {"tokens": x, "pooled": pooled, "keep": keep}
