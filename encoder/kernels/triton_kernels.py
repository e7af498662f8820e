"""Triton linear cross-entropy: blockwise log-sum-exp forward, recompute backward; no N x V buffer.

Shapes: hidden [N, D] (N tokens, D width), weight [V, D] (V vocab), bias [V], target [N] -> per-token loss [N].

- forward, grid (cdiv(N, BLOCK_N),): each program owns BLOCK_N rows and walks V in BLOCK_V blocks; every logits
  tile [BLOCK_N, BLOCK_V] is a tl.dot over D in BLOCK_D steps, kept on chip; an online max / sum-exp gives the
  row's lse, and the target logit (and, for label smoothing, the row sum of logits) are picked up on the way.
  Writes lse [N] and the per-token loss [N] (0 for ignored tokens).
- backward, grid (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)): each program recomputes its logits tile, forms
  dlogits = g * (a p - (1 - eps) onehot - eps / V) (x (1 - tanh^2) under softcap) and atomically adds
  dlogits @ W[block] into dH and dlogits^T @ H[block] into dW (and its column sums into dbias), all fp32.
  Gradients are cast back to the input dtype.

Reductions are done outside the kernels with torch ops on device (mean divides by the non-ignored count, clamped
at 1), so a call never syncs with the host. fp16 / bf16 tiles go to tl.dot as they are, with fp32 accumulation;
fp32 tiles use input_precision="ieee" (no TF32), to keep F.cross_entropy's numbers. Under TRITON_INTERPRET=1
(CPU tests; must be set before this module is imported) every tile is upcast to fp32 before tl.dot, because the
interpreter multiplies bf16 bit patterns. Memory: inputs + gradients + fp32 accumulators for dH and dW (for
fp32 inputs the accumulators are the gradients) + O(N) for lse and loss.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunked import LossOptions

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps) by input element size; tiny tiles in the interpreter (~0.6 ms per program
# instance). Shared memory (checked by compiling for sm_80 and sm_90 without a GPU): <= ~100 KB for every dtype.
BLOCKS = {2: (64, 128, 64, 8), 4: (64, 128, 32, 8)}
INTERPRET_BLOCKS = (16, 32, 16, 1)


def blocks(dtype: torch.dtype) -> tuple[int, int, int, int]:
    return INTERPRET_BLOCKS if INTERPRET else BLOCKS[torch.empty((), dtype=dtype).element_size()]


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(H, W, B, rn, rv, n_mask, v_mask, D, stride_h, stride_w, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_N, BLOCK_V] fp32 tile of (capped) logits and its tanh (ones when no softcap)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_mask = rd < D
        h = tl.load(H + rn[:, None] * stride_h + rd[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + rv[:, None] * stride_w + rd[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + rv, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    t = acc
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)
        acc = softcap * t
    return acc, t


@triton.jit
def _lce_forward_kernel(H, W, B, T, LSE, LOSS, N, V, D, stride_h, stride_w, ignore_index,
                        label_smoothing, z_loss, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    tgt = tl.load(T + rn, mask=n_mask, other=ignore_index)
    row_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        v_mask = rv < V
        z, _ = _logits_tile(H, W, B, rn, rv, n_mask, v_mask, D, stride_h, stride_w, softcap, HAS_BIAS, HAS_SOFTCAP,
                            UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        z_t += tl.sum(tl.where(rv[None, :] == tgt[:, None], z, 0.0), axis=1)
        if HAS_SMOOTHING:
            z_tot += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        row_max = new_max
    lse = row_max + tl.log(row_sum)
    loss = lse - z_t
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_tot / V)
    loss += z_loss * lse * lse
    valid = n_mask & (tgt != ignore_index)
    tl.store(LSE + rn, lse, mask=n_mask)
    tl.store(LOSS + rn, tl.where(valid, loss, 0.0), mask=n_mask)


@triton.jit
def _lce_backward_kernel(H, W, B, T, LSE, GS, DH, DW, DB, N, V, D, stride_h, stride_w, ignore_index,
                         label_smoothing, z_loss, softcap,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_DH: tl.constexpr,
                         NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = rn < N
    v_mask = rv < V
    tgt = tl.load(T + rn, mask=n_mask, other=ignore_index)
    valid = n_mask & (tgt != ignore_index)
    scale = tl.where(valid, tl.load(GS + rn, mask=n_mask, other=0.0), 0.0)
    if tl.max(tl.abs(scale), axis=0) == 0.0:  # ignored or zero-gradient rows only
        return
    lse = tl.load(LSE + rn, mask=n_mask, other=0.0)
    z, t = _logits_tile(H, W, B, rn, rv, n_mask, v_mask, D, stride_h, stride_w, softcap, HAS_BIAS, HAS_SOFTCAP,
                        UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    p = tl.exp(z - lse[:, None])
    a = scale * (1.0 + 2.0 * z_loss * lse)
    g = a[:, None] * p - label_smoothing / V * scale[:, None]
    g -= tl.where(rv[None, :] == tgt[:, None], (1.0 - label_smoothing) * scale[:, None], 0.0)
    if HAS_SOFTCAP:
        g *= 1.0 - t * t
    g = tl.where(v_mask[None, :], g, 0.0)
    if NEED_DB:
        tl.atomic_add(DB + rv, tl.sum(g, axis=0), mask=v_mask)
    if not UPCAST:
        g = g.to(H.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_mask = rd < D
        if NEED_DH:
            w = tl.load(W + rv[:, None] * stride_w + rd[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(g, w, input_precision=PRECISION)
            tl.atomic_add(DH + rn[:, None] * D + rd[None, :], dh, mask=n_mask[:, None] & d_mask[None, :])
        if NEED_DW:
            h = tl.load(H + rn[:, None] * stride_h + rd[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(g), h, input_precision=PRECISION)
            tl.atomic_add(DW + rv[:, None] * D + rd[None, :], dw, mask=v_mask[:, None] & d_mask[None, :])


def _flags(hidden: torch.Tensor, opt: LossOptions) -> dict:
    upcast = INTERPRET or hidden.dtype == torch.float32
    return {"ignore_index": opt.ignore_index, "label_smoothing": opt.label_smoothing, "z_loss": opt.z_loss,
            "softcap": opt.softcap or 1.0, "HAS_SOFTCAP": opt.softcap is not None, "UPCAST": upcast,
            "PRECISION": "ieee" if hidden.dtype == torch.float32 or INTERPRET else "tf32"}


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-token loss [N] (fp32) from the Triton kernels; reductions are applied by the caller."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, opt: LossOptions):
        n, d = hidden.shape
        v = weight.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        bn, bv, bd, warps = blocks(hidden.dtype)
        b = bias if bias is not None else hidden  # dummy pointer when HAS_BIAS is False
        _lce_forward_kernel[(triton.cdiv(n, bn),)](
            hidden, weight, b, target, lse, loss, n, v, d, hidden.stride(0), weight.stride(0),
            HAS_BIAS=bias is not None, HAS_SMOOTHING=opt.label_smoothing > 0, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
            num_warps=warps, **_flags(hidden, opt))
        ctx.opt = opt
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        n, d = hidden.shape
        v = weight.shape[0]
        f32 = {"dtype": torch.float32, "device": hidden.device}
        dh = torch.zeros(n, d, **f32) if need_dh else None
        dw = torch.zeros(v, d, **f32) if need_dw else None
        db = torch.zeros(v, **f32) if need_db else None
        bn, bv, bd, warps = blocks(hidden.dtype)
        dummy = lse
        _lce_backward_kernel[(triton.cdiv(n, bn), triton.cdiv(v, bv))](
            hidden, weight, bias if bias is not None else hidden, target, lse, grad_loss.float().contiguous(),
            dummy if dh is None else dh, dummy if dw is None else dw, dummy if db is None else db,
            n, v, d, hidden.stride(0), weight.stride(0),
            HAS_BIAS=bias is not None, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, **_flags(hidden, ctx.opt))
        dh = dh.to(hidden.dtype) if dh is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None


def linear_cross_entropy_triton(hidden, weight, target, bias, opt: LossOptions) -> torch.Tensor:
    """Reduced loss (fp32) with F.cross_entropy semantics; no host sync, no N x V buffer."""
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"linear_cross_entropy(impl='triton'): fp16, bf16 or fp32 inputs, got {hidden.dtype}")
    loss = TritonLinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), bias, target.contiguous(), opt)
    if opt.reduction == "none":
        return loss
    if opt.reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != opt.ignore_index).sum().clamp(min=1)
