"""Eager linear cross-entropy: the plain formula, used as the test oracle.

Shapes: hidden [N, D] (N tokens, D width), weight [V, D] (V vocab), bias [V], target [N] -> loss.
It holds the full N x V logits (in fp32, or fp64 for fp64 inputs), so it is only for tests and small inputs.

Deviations from `F.cross_entropy(hidden @ weight.T + bias, target, ...)`, shared by every impl:
- the loss comes back in fp32 (fp64 for fp64 inputs), not in the input dtype;
- reduction="mean" with every target ignored gives 0 (and zero gradients), not NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_eager(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> torch.Tensor:
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden, weight, bias).to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).pow(2) * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)
