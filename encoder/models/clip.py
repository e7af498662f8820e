"""CLIP: contrastive only; and the towers it shares with OpenVision (v1).

Shapes (B batch, N patches, Dv ViT width, Dt text width, E embedding width):
  pixels [B, 3, H, W] -> ViT -> tokens [B, 1 + N, Dv] -> mean of patch tokens -> final LN -> Linear(Dv -> E)
      = image_embeds [B, E]
  text_tokens [B, L] (L <= context; the caption tokenised by the data collate) -> TextEncoder (bidirectional,
      pooled at eos) -> Linear(Dt -> E) = text_embeds [B, E]
The loss is `encoder.losses.ContrastiveLoss` (learnable temperature, features gathered across ranks).
CLIP has one text per image: the full caption, truncated to the text context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder.models.text import TextEncoder
from encoder.models.vit import ViT
from encoder.tokenizer import get_tokenizer

if TYPE_CHECKING:
    from encoder.config import ModelConfig


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

    def text_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, E] (not normalised)."""
        return self.text.head(self.text(tokens)["pooled"])

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, E] L2-normalised image features (zero-shot classification)."""
        return F.normalize(self.image_embeds(self.vit(pixels)["tokens"]), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """[B, E] L2-normalised features of raw strings (zero-shot prompts), tokenised as the training collate does."""
        tokens = get_tokenizer()(list(texts), self.text.cfg.context).to(self.image_head.weight.device)
        return F.normalize(self.text_embeds(tokens), dim=-1)


class CLIP(ContrastiveTowers):
    """Takes the model config (`vit`, `text`, `embed_dim`); the batch's `text_tokens`."""

    @staticmethod
    def text_inputs(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
        """{batch key: (sample text, token length)} that the collate tokenises for this model."""
        return {"text_tokens": ("caption", cfg.text.context)}

    def forward(self, pixels: torch.Tensor, text_tokens: torch.Tensor, **_) -> dict:
        return {"image_embeds": self.image_embeds(self.vit(pixels)["tokens"]),
                "text_embeds": [self.text_embeds(text_tokens)]}
