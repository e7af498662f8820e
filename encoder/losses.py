"""Losses as modules returning {"<name>_loss": tensor}; the trainer sums every `*_loss` entry. Each is built from
the training config by `from_config(cfg)`; the model registry (encoder/models/registry.py) names each family's.

CaptionLoss (OpenVision 2, OpenVision v1): weight x token-mean cross-entropy over non-ignored caption targets
(weight 2 in both papers), computed by `encoder.kernels.linear_cross_entropy` from the decoder's hidden states and
head weight, so the [B * T, V] logits are never materialised (impl chosen by the config key `loss_impl`).

ContrastiveLoss (CLIP, OpenVision v1): out["image_embeds"] [B, E] and out["text_embeds"] (a list of [B, E], one
per text of an image; OpenVision v1 has two: alt-text and one caption sentence) -> L2-normalised -> gathered across
ranks in rank order [G, E], G = sum of the ranks' B (gradients flow back to the local rows) -> logits
= s * img @ txt.T [G, G] -> (cross-entropy over rows + over columns) / 2 with the diagonal as targets -> mean over
the texts. s = exp(log_scale), initialised at 1/0.07 and clamped at 100 (open_clip's bound); a learnable parameter
of this module (no weight decay: the trainer decays only Linear/Conv weights).

Every rank computes the contrastive loss over the whole gathered batch, so under DDP (which averages gradients)
the all-reduce in `gather_with_grad`'s backward makes a step equal to one process on the global batch. Ranks may
hold different numbers of samples (dropped bad samples): rows are padded for the gather and the padding removed
after it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from encoder.kernels import linear_cross_entropy
from ov2 import distributed as dist

if TYPE_CHECKING:
    from encoder.config import TrainConfig


class CaptionLoss(nn.Module):
    def __init__(self, weight: float = 2.0, impl: str = "auto"):
        super().__init__()
        self.weight = weight
        self.impl = impl

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> CaptionLoss:
        return cls(cfg.model.caption_weight, impl=cfg.loss_impl)

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden, targets = out["caption_hidden"], out["caption_targets"]
        loss = linear_cross_entropy(hidden.flatten(0, 1), out["caption_head"], targets.flatten(), impl=self.impl)
        return {"caption_loss": self.weight * loss}


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[B_r, E] on each rank -> [sum_r B_r, E] in rank order; gradients flow to the local rows."""
    if dist.world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=dist.comm_device())
    sizes = [torch.zeros_like(n) for _ in range(dist.world_size())]
    torch_dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[0]))
    gathered = dist.gather_with_grad(padded)  # [world * longest, E]
    if all(s == longest for s in sizes):
        return gathered
    return torch.cat([gathered[r * longest: r * longest + s] for r, s in enumerate(sizes)])


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows, at least in float32 (bf16 autocast outputs are upcast)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows; image and text are [G, E] and already normalised."""
    logits = scale * image @ text.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ContrastiveLoss(nn.Module):
    def __init__(self, init_scale: float = 1 / 0.07, max_scale: float = 100.0, weight: float = 1.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1,), math.log(init_scale)))  # 1-D: FSDP2 cannot shard scalars
        self.max_log_scale = math.log(max_scale)
        self.weight = weight

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> ContrastiveLoss:
        return cls()

    def scale(self) -> torch.Tensor:
        """[1]: the clamped logit scale (inverse temperature)."""
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        texts = out["text_embeds"]
        texts = [texts] if torch.is_tensor(texts) else list(texts)
        image = gather_rows(_normalize(out["image_embeds"]))
        scale = self.scale()
        losses = [clip_loss(image, gather_rows(_normalize(t)), scale) for t in texts]
        return {"contrastive_loss": self.weight * torch.stack(losses).mean(), "logit_scale": scale.detach()[0]}
