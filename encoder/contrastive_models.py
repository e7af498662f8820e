"""The baselines: OpenVision (v1) = contrastive + parallel caption decoder, and CLIP = contrastive only.

Shared towers (B batch, N patches, Dv ViT width, Dt text width, Dd decoder width, E embedding width):
  pixels [B, 3, H, W] -> ViT -> tokens [B, 1 + N, Dv] -> mean of patch tokens -> final LN -> Linear(Dv -> E)
      = image_embeds [B, E]
  text [B, L] (L <= context) -> TextEncoder (bidirectional, pooled at eos) -> Linear(Dt -> E) = text embeds [B, E]

CLIP: one text per image, the full caption (truncated to the text context).
OpenVision v1: two texts per image, the alt-text and one random sentence of the caption (drawn by the loader);
the contrastive loss is the mean of the two. Caption branch: prefix = [Linear(Dv -> Dd) of the last-block patch
tokens (cls dropped, no final LN, as OpenVision 2); Linear(Dt -> Dd) of the alt-text encoder tokens] [B, N + L, Dd],
then Q learnable queries [B, Q, Dd] under the prefix-LM mask (pads of the alt-text masked as keys) -> hidden at
the queries [B, Q, Dd]; query i predicts caption token i + 1 (targets: `shift_targets(tokens)` padded with -100
or cut to Q), all in parallel (no teacher forcing). The same `CaptionLoss` as OpenVision 2 applies the head.

Deviations: no token dropping in v1 (none in the paper); the text encoder masks pads (see encoder/text.py);
the decoder has no token embedding table (it never reads caption tokens).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder import models
from encoder.config import ModelConfig
from encoder.decoder import PrefixDecoder
from encoder.layers import prefix_lm_mask
from encoder.ov2 import IGNORE, shift_targets
from encoder.text import TextEncoder
from encoder.vit import ViT


class ContrastiveTowers(nn.Module):
    """ViT + pooled image head + text encoder (with its head); the part CLIP and OpenVision v1 share."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vit = ViT(cfg.vit)
        self.image_head = nn.Linear(cfg.vit.width, cfg.embed_dim, bias=False)
        nn.init.xavier_uniform_(self.image_head.weight)
        self.text = TextEncoder(cfg.text, cfg.embed_dim, vocab_size=cfg.decoder.vocab_size)

    def image_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.vit.pooled(tokens))

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, E] L2-normalised image features (zero-shot classification)."""
        return F.normalize(self.image_embeds(self.vit(pixels)["tokens"]), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """[B, E] L2-normalised text features of raw strings."""
        return F.normalize(self.text.embed_texts(texts, self.image_head.weight.device), dim=-1)


class CLIP(ContrastiveTowers):
    def forward(self, pixels: torch.Tensor, captions: list[str], **_) -> dict:
        text = self.text(self.text.tokenize(captions, pixels.device))
        return {"image_embeds": self.image_embeds(self.vit(pixels)["tokens"]),
                "text_embeds": [self.text.head(text["pooled"])]}


class OpenVision1(ContrastiveTowers):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.decoder = PrefixDecoder(cfg.decoder)
        self.decoder.embed = None  # v1 feeds queries, not caption tokens: no token embedding table
        self.image_proj = nn.Linear(cfg.vit.width, cfg.decoder.width, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.decoder.width, bias=False)
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.decoder.width) * 0.02)
        nn.init.xavier_uniform_(self.image_proj.weight)
        nn.init.xavier_uniform_(self.text_proj.weight)

    def caption_hidden(self, patches: torch.Tensor, alt: dict) -> torch.Tensor:
        """patches [B, N, Dv], alt-text encoder output -> hidden at the queries [B, Q, Dd]."""
        prefix = torch.cat([self.image_proj(patches), self.text_proj(alt["tokens"])], dim=1)
        B, K = prefix.shape[:2]
        x = torch.cat([prefix, self.queries.expand(B, -1, -1).to(prefix.dtype)], dim=1)
        keep = torch.cat([torch.ones(B, patches.shape[1], dtype=torch.bool, device=x.device), alt["keep"],
                          torch.ones(B, self.queries.shape[1], dtype=torch.bool, device=x.device)], dim=1)
        causal = self.decoder.cfg.mask == "causal"
        mask = prefix_lm_mask(K, x.shape[1], causal_prefix=causal, device=x.device)[None, None] & keep[:, None, None]
        for block in self.decoder.blocks:  # PrefixDecoder's blocks under a mask that also hides alt-text pads
            x = block(x, mask)
        return self.decoder.norm(x[:, K:])

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, alts: list[str], sentences: list[str],
                **_) -> dict:
        vit_tokens = self.vit(pixels)["tokens"]
        alt = self.text(self.text.tokenize(alts, pixels.device))
        sentence = self.text(self.text.tokenize(sentences, pixels.device))
        _, targets = shift_targets(tokens)
        Q = self.queries.shape[1]
        targets = F.pad(targets[:, :Q], (0, max(0, Q - targets.shape[1])), value=IGNORE)
        return {
            "image_embeds": self.image_embeds(vit_tokens),
            "text_embeds": [self.text.head(alt["pooled"]), self.text.head(sentence["pooled"])],
            "caption_hidden": self.caption_hidden(vit_tokens[:, 1:], alt),
            "caption_targets": targets,
            "caption_head": self.decoder.head.weight,
        }


models.register("clip", CLIP)
models.register("ov1", OpenVision1)
