"""Answer-token loss for LLaVA training, through `encoder.kernels.linear_cross_entropy` (never holds T x V logits).

    batch: input_ids [B,T], attention_mask [B,T], labels [B,T] (-100 = not an answer token), pixel_values [B,3,H,W]
    LlavaModel -> final hidden states h [B,T,D]; the next-token shift happens here and only here:
    h[:, :-1] predicts labels[:, 1:]; only positions with a real target go through the LM head.
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

        out = model.model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
        )
        hidden = out.last_hidden_state[:, :-1]
        target = batch["labels"][:, 1:]
        keep = target != IGNORE
        loss = linear_cross_entropy(hidden[keep], model.lm_head.weight, target[keep], bias=model.lm_head.bias,
                                    impl=self.impl)
        return {"lm_loss": loss, "tokens": keep.sum()}
