"""OpenVision (v1): contrastive + parallel caption decoder (the baseline). Towers as CLIP (encoder/models/clip.py).

Shapes (B batch, N patches, Dv ViT width, Dt text width, Dd decoder width, E embedding width, Q queries):
  pixels [B, 3, H, W] -> ViT -> tokens [B, 1 + N, Dv] -> pooled image_embeds [B, E] (as CLIP)
  alt_tokens, sentence_tokens [B, L] (L <= context; the alt-text and one random sentence of the caption, drawn and
      tokenised by the data collate) -> TextEncoder -> text_embeds, one [B, E] per text; the contrastive loss is
      the mean of the two.
  Caption branch: prefix = [Linear(Dv -> Dd) of the last-block patch tokens (cls dropped, no final LN, as
      OpenVision 2); Linear(Dt -> Dd) of the alt-text encoder tokens] [B, N + L, Dd], then Q learnable queries
      [B, Q, Dd] under the prefix-LM mask (pads of the alt-text masked as keys) -> hidden at the queries [B, Q, Dd];
      query i predicts caption token i + 1 (targets: `shift_targets(tokens)` padded with -100 or cut to Q), all in
      parallel (no teacher forcing). The same `encoder.losses.CaptionLoss` as OpenVision 2 applies the head.

Deviations: no token dropping in v1 (none in the paper); the text encoder masks pads (see encoder/models/text.py);
the decoder has no token embedding table (it never reads caption tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder.models.clip import ContrastiveTowers
from encoder.models.decoder import PrefixDecoder
from encoder.models.layers import prefix_lm_mask
from encoder.models.ov2 import IGNORE, shift_targets

if TYPE_CHECKING:
    from encoder.config import ModelConfig


class OpenVision1(ContrastiveTowers):
    """Takes the model config (`vit`, `text`, `decoder`, `embed_dim`, `num_queries`); the batch's `tokens`,
    `alt_tokens` and `sentence_tokens`."""

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

    @staticmethod
    def text_inputs(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
        """{batch key: (sample text, token length)} that the collate tokenises for this model."""
        context = cfg.text.context
        return {"tokens": ("caption", cfg.decoder.max_len), "alt_tokens": ("alt", context),
                "sentence_tokens": ("sentence", context)}

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, alt_tokens: torch.Tensor,
                sentence_tokens: torch.Tensor, **_) -> dict:
        vit_tokens = self.vit(pixels)["tokens"]
        alt = self.text(alt_tokens)
        _, targets = shift_targets(tokens)
        Q = self.queries.shape[1]
        targets = F.pad(targets[:, :Q], (0, max(0, Q - targets.shape[1])), value=IGNORE)
        return {
            "image_embeds": self.image_embeds(vit_tokens),
            "text_embeds": [self.text.head(alt["pooled"]), self.text_embeds(sentence_tokens)],
            "caption_hidden": self.caption_hidden(vit_tokens[:, 1:], alt),
            "caption_targets": targets,
            "caption_head": self.decoder.head.weight,
        }
