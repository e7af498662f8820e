"""Linear cross-entropy: `F.cross_entropy(hidden @ weight.T + bias, target)` without holding N x V.

Placeholder for the fused-kernel issue: only the eager formula lives here so far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        valid = target != ignore_index
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).pow(2) * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1)
