"""Answer-token loss for LLaVA training, through `encoder.kernels.linear_cross_entropy` (never holds T x V logits).

    batch: input_ids [B,T], attention_mask [B,T], labels [B,T] (-100 = not an answer token), pixel_values [B,3,H,W]
    LlavaModel -> final hidden states h [B,T,D]; the next-token shift happens here and only here:
    h[:, :-1] predicts labels[:, 1:]; only positions with a real target go through the LM head. A batch without
    images still runs the image path (on a blank image, weight 0): every rank gives every parameter a gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from bridge.processor import IGNORE


class AnswerLoss(nn.Module):
    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = impl

    def forward(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from encoder.kernels import linear_cross_entropy

        hidden, target, keep = answer_positions(model, batch)
        loss = linear_cross_entropy(hidden, model.lm_head.weight, target, bias=model.lm_head.bias, impl=self.impl)
        if batch["pixel_values"] is None:
            loss = loss + 0.0 * blank_image_features(model).sum()
        return {"lm_loss": loss, "tokens": keep.sum()}


def answer_positions(model, batch: dict[str, torch.Tensor]):
    """(final hidden states [K, D] at the K positions that predict an answer token, their targets [K], the mask
    keep [B, T-1] that picked them): the next-token shift, here and only here."""
    out = model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                      attention_mask=batch["attention_mask"], use_cache=False)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    return out.last_hidden_state[:, :-1][keep], target[keep], keep


def blank_image_features(model) -> torch.Tensor:
    """The image path (tower, projector) run on one blank image. A text-only micro-batch adds it to the loss with
    weight 0, so that every rank gives every trainable parameter a gradient each step, as FSDP2's reduce-scatter
    needs (a rank whose batch skipped the projector would reduce fewer gradients than the others and hang them)."""
    vision = model.config.vision_config
    size = vision.image_size
    param = next(model.model.multi_modal_projector.parameters())
    pixels = torch.zeros(1, getattr(vision, "num_channels", 3), size, size, device=param.device, dtype=param.dtype)
    features = model.model.get_image_features(pixel_values=pixels)
    features = getattr(features, "pooler_output", features)
    return torch.cat([f.reshape(-1) for f in features]) if isinstance(features, (list, tuple)) else features
