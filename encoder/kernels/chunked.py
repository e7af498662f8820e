"""Chunked torch linear cross-entropy (CPU path and fallback): never holds N x V.

Shapes: hidden [N, D] (N tokens, D width), weight [V, D] (V vocab), bias [V], target [N].
Only the non-ignored tokens are processed, C of them at a time (C x V x 4 bytes ~ 128 MiB, reused buffer):

    logits = h_c @ W.T + b          (one matmul into the reused buffer)
    z      = c * tanh(logits / c)   (softcap, optional)
    lse    = max(z) - log(max(softmax(z)))   softmax in place; max(p) = 1/sum(exp(z - max)) exactly
    loss   = (1 - eps) (lse - z_t) + eps (lse - mean_j z_j) + z_loss * lse^2
    dz     = a p - s (1 - eps) onehot(t) - s eps / V,   a = s (1 + 2 z_loss lse),  s = per-token scale

Two modes, chosen per call:
- fused (reduction "mean"/"sum" with a gradient needed): the gradient is built during the forward pass, so each
  chunk's logits are computed once and three matmuls are done in all (logits, dH, dW). dH and dW (input-sized)
  are kept until backward, which only multiplies them by the scalar upstream gradient.
- recompute (reduction "none" with a gradient, or no gradient): the forward keeps the per-token lse, and the
  backward recomputes each chunk's logits. reduction="none" needs this: its upstream gradient is per token,
  and dW = sum_i g_i dz_i^T h_i cannot be rebuilt from per-token pieces of input size.

Without softcap the gradient terms are factored so that no extra pass over C x V is needed: the row scale a is
applied to h_c (for dW) and to the rows of p @ W (for dH); the one-hot term is a gather / index_add over C rows,
and the smoothing term is a rank-one update added once at the end. Gradients accumulate in fp32 (fp64 for fp64
inputs) and come back in the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_BYTES = 128 << 20  # size of the reused C x V logits buffer


@dataclass(frozen=True)
class LossOptions:
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None


def chunk_rows(vocab: int, n_tokens: int) -> int:
    """Tokens per chunk: the largest power of two with C x V x 4 bytes <= CHUNK_BYTES (at least 16)."""
    rows = max(16, CHUNK_BYTES // (4 * max(vocab, 1)))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n_tokens))


class _Grads:
    """fp32 (or fp64) accumulators for dW, dbias and the rank-one smoothing terms."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, need_w: bool, need_b: bool):
        vocab, width = weight.shape
        self.dw = torch.zeros(vocab, width, dtype=dtype, device=weight.device) if need_w else None
        self.db = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_b and bias is not None else None
        self.h_sum = torch.zeros(width, dtype=dtype, device=weight.device)  # sum_i s_i h_i (smoothing term of dW)
        self.s_sum = torch.zeros((), dtype=dtype, device=weight.device)  # sum_i s_i (smoothing term of db)

    def finish(self, eps: float, vocab: int) -> None:
        if eps and self.dw is not None:
            self.dw.sub_(self.h_sum[None, :], alpha=eps / vocab)
        if eps and self.db is not None:
            self.db.sub_(self.s_sum, alpha=eps / vocab)


def _chunk(hc, weight, bias, tc, opt: LossOptions, buf, buf2, scale=None, grads=None, w_colsum=None, need_h=True):
    """One chunk of C valid tokens: returns (loss [C], lse [C], dH [C, D] or None); accumulates into `grads`."""
    rows, vocab = hc.shape[0], weight.shape[0]
    z = buf[:rows]
    if bias is None:
        torch.mm(hc, weight.T, out=z)
    else:
        torch.addmm(bias, hc, weight.T, out=z)
    tanh = None
    if opt.softcap is not None:
        tanh = buf2[:rows]
        torch.div(z, opt.softcap, out=tanh).tanh_()
        torch.mul(tanh, opt.softcap, out=z)
    eps, zl = opt.label_smoothing, opt.z_loss
    z_t = z.gather(1, tc[:, None]).squeeze(1)
    z_mean = z.sum(1) / vocab if eps else None
    zmax = z.amax(1)
    torch.softmax(z, -1, out=z)  # in place: z now holds p
    lse = zmax - z.amax(1).log()
    loss = lse - z_t
    if eps:
        loss = (1 - eps) * loss + eps * (lse - z_mean)
    if zl:
        loss = loss + zl * lse * lse
    if scale is None:
        return loss, lse, None

    p = z
    a = scale * (1 + 2 * zl * lse) if zl else scale
    s_hot = scale * (1 - eps)
    dh = None
    if tanh is None:  # factored: no further pass over C x V
        if need_h:
            dh = torch.mm(p, weight) * a[:, None]
            dh.sub_(weight.index_select(0, tc) * s_hot[:, None])
            if eps:
                dh.sub_(torch.outer(scale, w_colsum), alpha=eps / vocab)
        if grads.dw is not None:
            grads.dw.addmm_(p.T, hc * a[:, None])
            grads.dw.index_add_(0, tc, hc * s_hot[:, None], alpha=-1)
            if eps:
                grads.h_sum.add_(scale @ hc)
        if grads.db is not None:
            grads.db.add_(p.T @ a)
            grads.db.index_add_(0, tc, s_hot, alpha=-1)
            grads.s_sum.add_(scale.sum())
    else:  # softcap: dx = dz * (1 - tanh^2), built in place
        p.mul_(a[:, None])
        p.scatter_add_(1, tc[:, None], -s_hot[:, None])
        if eps:
            p.sub_(scale[:, None], alpha=eps / vocab)
        p.mul_(tanh.square_().neg_().add_(1))
        if need_h:
            dh = torch.mm(p, weight)
        if grads.dw is not None:
            grads.dw.addmm_(p.T, hc)
        if grads.db is not None:
            grads.db.add_(p.sum(0))
    return loss, lse, dh


def _valid_index(target: torch.Tensor, opt: LossOptions) -> torch.Tensor | None:
    """Indices of non-ignored tokens, or None when every token counts (then chunks are plain slices)."""
    valid = target != opt.ignore_index
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _run(hidden, weight, bias, target, opt, idx, scale=None, need=(False, False, False)):
    """Loop over chunks of valid tokens; returns (per-valid-token loss, lse, dH, grads)."""
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    need_h, need_w, need_b = need
    w = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    n_valid = hidden.shape[0] if idx is None else idx.numel()
    vocab = weight.shape[0]
    rows = chunk_rows(vocab, max(n_valid, 1))
    buf = torch.empty(rows, vocab, dtype=cdt, device=hidden.device)
    buf2 = torch.empty_like(buf) if opt.softcap is not None else None
    losses, lses = [], []
    grads = _Grads(weight, bias, cdt, need_w, need_b) if scale is not None else None
    dh = torch.zeros_like(hidden) if need_h else None
    w_colsum = w.sum(0) if scale is not None and opt.label_smoothing else None
    for start in range(0, n_valid, rows):
        stop = min(start + rows, n_valid)
        if idx is None:
            hc, tc = hidden[start:stop].to(cdt), target[start:stop]
        else:
            ic = idx[start:stop]
            hc, tc = hidden.index_select(0, ic).to(cdt), target.index_select(0, ic)
        sc = None if scale is None else scale[start:stop]
        loss, lse, dhc = _chunk(hc, w, b, tc, opt, buf, buf2, sc, grads, w_colsum, need_h)
        losses.append(loss)
        lses.append(lse)
        if dhc is not None:
            if idx is None:
                dh[start:stop] = dhc
            else:
                dh.index_copy_(0, ic, dhc.to(dh.dtype))
    if grads is not None:
        grads.finish(opt.label_smoothing, vocab)
    empty = hidden.new_zeros(0, dtype=cdt)
    loss = torch.cat(losses) if losses else empty
    lse = torch.cat(lses) if lses else empty
    return loss, lse, dh, grads


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Autograd function over the chunk loop; see the module docstring for the two modes."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, opt: LossOptions, fused: bool):
        idx = _valid_index(target, opt)
        n_tok = hidden.shape[0]
        n_valid = n_tok if idx is None else idx.numel()
        cdt = torch.promote_types(hidden.dtype, torch.float32)
        ctx.opt, ctx.fused = opt, fused
        need = tuple(ctx.needs_input_grad[:3])
        if fused:
            per_token = 1.0 / max(n_valid, 1) if opt.reduction == "mean" else 1.0
            scale = torch.full((n_valid,), per_token, dtype=cdt, device=hidden.device)
            loss, _, dh, grads = _run(hidden, weight, bias, target, opt, idx, scale, need)
            dw = grads.dw.to(weight.dtype) if grads.dw is not None else None
            db = grads.db.to(bias.dtype) if grads.db is not None else None
            if dh is None and need[0]:
                dh = torch.zeros_like(hidden)
            ctx.grads = (dh, dw, db)
            return (loss.sum() * per_token).reshape(())
        loss, lse, _, _ = _run(hidden, weight, bias, target, opt, idx)
        ctx.save_for_backward(hidden, weight, bias, target, lse, idx)
        out = torch.zeros(n_tok, dtype=cdt, device=hidden.device)
        if idx is None:
            out.copy_(loss)
        else:
            out.index_copy_(0, idx, loss)
        if opt.reduction == "sum":
            return out.sum()
        if opt.reduction == "mean":
            return out.sum() / max(n_valid, 1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return ChunkedLinearCrossEntropy._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        if ctx.fused:  # out of place, so that a retained graph can run backward again
            out = tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads)
            return (*out, None, None, None)
        hidden, weight, bias, target, lse, idx = ctx.saved_tensors
        opt = ctx.opt
        n_valid = hidden.shape[0] if idx is None else idx.numel()
        cdt = lse.dtype
        if opt.reduction == "none":
            scale = grad_out.to(cdt) if idx is None else grad_out.to(cdt).index_select(0, idx)
        else:
            per_token = 1.0 / max(n_valid, 1) if opt.reduction == "mean" else 1.0
            scale = (grad_out.to(cdt) * per_token).expand(n_valid).contiguous()
        need = tuple(ctx.needs_input_grad[:3])
        _, _, dh, grads = _run(hidden, weight, bias, target, opt, idx, scale, need)
        dw = grads.dw.to(weight.dtype) if grads.dw is not None else None
        db = grads.db.to(bias.dtype) if grads.db is not None else None
        return dh, dw, db, None, None, None
