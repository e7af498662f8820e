"""Losses as modules returning {"<name>_loss": tensor}; the trainer sums every `*_loss` entry.

CaptionLoss: weight x token-mean cross-entropy over non-ignored caption targets (weight 2 in both papers),
computed by `encoder.kernels.linear_cross_entropy` from the decoder's hidden states and head weight, so
the [B * T, V] logits are never materialised (impl chosen by the config key `loss_impl`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from encoder.kernels import linear_cross_entropy


class CaptionLoss(nn.Module):
    def __init__(self, weight: float = 2.0, impl: str = "auto"):
        super().__init__()
        self.weight = weight
        self.impl = impl

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden, targets = out["caption_hidden"], out["caption_targets"]
        loss = linear_cross_entropy(hidden.flatten(0, 1), out["caption_head"], targets.flatten(), impl=self.impl)
        return {"caption_loss": self.weight * loss}
