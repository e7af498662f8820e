"""Linear cross-entropy: `F.cross_entropy(hidden @ weight.T + bias, target)` without holding N x V.

    loss = linear_cross_entropy(hidden[N, D], weight[V, D], target[N], bias=None, ignore_index=-100,
                                reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, impl="auto")

N tokens (leading dims of hidden/target are flattened, and restored for reduction="none"), D width, V vocab.
Options: z_loss adds z_loss * lse^2 per non-ignored token; softcap applies c * tanh(logit / c) before the softmax;
label smoothing follows F.cross_entropy (the smoothing term is the mean over classes of -log p).

Implementations (`impl`, selected in configs by the `loss_impl` key):
- "triton": fused Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1), see triton_kernels.py;
- "torch":  chunked torch autograd function (CPU path and fallback), see chunked.py;
- "eager":  the plain formula holding N x V logits; the test oracle, see eager.py;
- "auto":   "triton" for CUDA tensors when Triton imports, "torch" otherwise.

Under torch.autocast the inputs are cast to the autocast dtype first, as F.linear would; otherwise hidden, weight
and bias must share one dtype. Gradients come back in the input dtype.

Deviations from F.cross_entropy, the same in every impl: the loss is fp32 (fp64 for fp64 inputs) whatever the
input dtype; reduction="mean" over all-ignored targets gives 0 with zero gradients (F.cross_entropy gives NaN);
class weights are not supported. The torch path checks target range (one host sync); Triton does not (no sync).
"""

from __future__ import annotations

import os

import torch

from .chunked import ChunkedLinearCrossEntropy, LossOptions
from .eager import linear_cross_entropy_eager

__all__ = ["IMPLS", "linear_cross_entropy", "triton_available"]

IMPLS = ("auto", "triton", "torch", "eager")
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_available(device: torch.device | None = None) -> bool:
    """True when the Triton kernels can run: CUDA + triton, or TRITON_INTERPRET=1 for CPU tensors."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device is not None and device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {IMPLS}, got {impl!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: want hidden [..., D] and weight [V, D], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden width {hidden.shape[-1]} != weight width {weight.shape[1]}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"linear_cross_entropy: target shape {tuple(target.shape)} must be hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: target must hold class indices (int64/int32), got {target.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: hidden and weight must share one float dtype, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"linear_cross_entropy: bias must be [{weight.shape[0]}] of {hidden.dtype}, got "
                         f"{tuple(bias.shape)} of {bias.dtype}")
    if len({t.device for t in (hidden, weight, target) + (() if bias is None else (bias,))}) != 1:
        raise ValueError("linear_cross_entropy: hidden, weight, target and bias must be on one device")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"linear_cross_entropy: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 or None, got {softcap}")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation `impl` stands for on `device` ("auto" -> "triton" on CUDA, "torch" otherwise)."""
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if impl == "triton" and not triton_available(device):
        raise ValueError("linear_cross_entropy: impl='triton' needs CUDA tensors and triton (or TRITON_INTERPRET=1 "
                         "set before import, for tests on CPU)")
    return impl


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
    """Cross-entropy of `hidden @ weight.T + bias` against `target`; see the module docstring."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # as F.linear would: compute in the autocast dtype
        dt = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        return _linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
                                     softcap, impl)


def _linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                          impl) -> torch.Tensor:
    _check(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, impl)
    impl = resolve_impl(impl, hidden.device)
    lead = hidden.shape[:-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1).long()
    opt = LossOptions(int(ignore_index), reduction, float(label_smoothing), float(z_loss),
                      None if softcap is None else float(softcap))
    if impl == "eager":
        loss = linear_cross_entropy_eager(hidden, weight, target, bias, opt.ignore_index, reduction,
                                          opt.label_smoothing, opt.z_loss, opt.softcap)
    elif impl == "torch":
        _check_range(target, weight.shape[0], opt.ignore_index)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        fused = needs_grad and reduction != "none"
        loss = ChunkedLinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), bias, target, opt, fused)
    else:
        from .triton_kernels import linear_cross_entropy_triton

        loss = linear_cross_entropy_triton(hidden, weight, target, bias, opt)
    return loss.reshape(lead) if reduction == "none" else loss


def _check_range(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Out-of-range targets would silently gather garbage in the chunked path (one host sync; fine on CPU)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: target values must be in [0, {vocab}) or ignore_index={ignore_index}")
