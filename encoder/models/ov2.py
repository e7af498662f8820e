"""OpenVision 2: ViT + caption decoder, caption loss only (`encoder.losses.CaptionLoss`).

pixels [B, 3, H, W] -> ViT -> last-block patch tokens [B, N, Dv] (cls dropped, no final LN)
-> random keep of floor(N x keep_ratio) tokens per sample, without replacement (training only unless
`keep_at_eval`) -> [B, K, Dv] -> Linear(Dv -> Dd, no bias) -> prefix of the decoder
-> caption tokens [B, T] (bos ... eos pad; the data collate tokenises): inputs tokens[:, :-1], targets
tokens[:, 1:] (pad -> -100) -> hidden [B, T - 1, Dd]. The loss (`encoder.losses.CaptionLoss`) applies the
untied head inside the fused linear cross-entropy. The ViT itself always sees every patch; dropping happens after
it, as in the paper.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from encoder.models.decoder import PrefixDecoder
from encoder.models.vit import ViT
from encoder.tokenizer import BOS, EOS, PAD

if TYPE_CHECKING:
    from encoder.config import ModelConfig

IGNORE = -100


def keep_random_tokens(tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, N, D] -> [B, floor(N * ratio), D]: a uniform random subset per sample, without replacement."""
    B, N, D = tokens.shape
    k = max(1, math.floor(N * ratio))
    if k >= N:
        return tokens
    idx = torch.rand(B, N, device=tokens.device).argsort(dim=1)[:, :k]
    return tokens.gather(1, idx[..., None].expand(B, k, D))


def shift_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one place where captions are shifted: inputs tokens[:, :-1], targets tokens[:, 1:] with pad -> -100."""
    targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == PAD, IGNORE)
    return tokens[:, :-1], targets


class OpenVision2(nn.Module):
    """Takes the model config (`vit`, `decoder`, `keep_ratio`, `keep_at_eval`); the batch's `tokens`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vit = ViT(cfg.vit)
        self.vit.norm.requires_grad_(False)  # OpenVision 2 never uses the final LN; it stays identity for export
        self.decoder = PrefixDecoder(cfg.decoder)
        self.projector = nn.Linear(cfg.vit.width, cfg.decoder.width, bias=False)
        nn.init.xavier_uniform_(self.projector.weight)
        self.keep_ratio = cfg.keep_ratio
        self.keep_at_eval = cfg.keep_at_eval

    @staticmethod
    def text_inputs(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
        """{batch key: (sample text, token length)} that the collate tokenises for this model."""
        return {"tokens": ("caption", cfg.decoder.max_len)}

    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, K, Dd]: projected patch tokens, randomly thinned when training."""
        patches = self.vit(pixels)["tokens"][:, 1:]
        if self.keep_ratio < 1.0 and (self.training or self.keep_at_eval):
            patches = keep_random_tokens(patches, self.keep_ratio)
        return self.projector(patches)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, **_) -> dict[str, torch.Tensor]:
        inputs, targets = shift_targets(tokens)
        hidden = self.decoder(self.image_prefix(pixels), self.decoder.embed(inputs))
        return {"caption_hidden": hidden, "caption_targets": targets, "caption_head": self.decoder.head.weight}

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, max_len: int = 64) -> torch.Tensor:
        """Greedy captions [B, <= max_len] starting with bos; rows stop at eos (then pad)."""
        prefix = self.image_prefix(pixels)
        out = torch.full((pixels.shape[0], 1), BOS, dtype=torch.long, device=pixels.device)
        done = torch.zeros(pixels.shape[0], dtype=torch.bool, device=pixels.device)
        for _ in range(max_len - 1):
            hidden = self.decoder(prefix, self.decoder.embed(out))[:, -1]
            nxt = self.decoder.logits(hidden).argmax(-1).masked_fill(done, PAD)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if done.all():
                break
        return out
