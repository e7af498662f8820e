"""Compiled Triton linear cross-entropy kernels against the fp64 eager oracle (needs CUDA; skipped without it).

Shapes: N tokens, D width, V vocab. Errors are max |got - want| / max |want| per tensor (loss, dH, dW, dbias).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels, not the interpreter"),
]

from test_kernels import OPTIONS, TOL, make, rel_errors, upstream_for  # noqa: E402

from encoder.kernels import linear_cross_entropy  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# fp32 tiles use input_precision="ieee"; half tiles feed tl.dot as they are and the upstream dlogits are rounded to
# the input dtype before the gradient dots, so allow a little more than the CPU interpreter needs.
GPU_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _run(impl, hidden, weight, bias, target, reduction, upstream, **options):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], reduction=reduction, impl=impl, **options)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], upstream.to(loss))
    return [loss.double().cpu(), *(g.double().cpu() for g in grads)], [t for t in leaves if t is not None], grads


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", [(47, 31, 123), (1, 64, 1000), (1000, 256, 5003)])
def test_triton_cuda_matches_oracle(shape, option, reduction, dtype):
    dt = DTYPES[dtype]
    hidden, weight, b, target = make(*shape, dt, ignore_every=5 if shape[0] > 1 else 0)
    g = upstream_for(reduction, target)
    cpu = [t.double() if t is not None else None for t in (hidden, weight, b)]
    want, _, _ = _run("eager", *cpu, target, reduction, g, **OPTIONS[option])
    cuda = [t.cuda() if t is not None else None for t in (hidden, weight, b)]
    got, leaves, grads = _run("triton", *cuda, target.cuda(), reduction, g.cuda(), **OPTIONS[option])
    for leaf, grad in zip(leaves, grads):
        assert grad.dtype == leaf.dtype
    errs = rel_errors(got, want)
    assert max(errs) < max(GPU_TOL[dt], TOL[dt]), errs


def test_triton_cuda_all_ignored_and_auto():
    hidden, weight, b, target = (t.cuda() for t in make(64, 32, 100, torch.bfloat16))
    target[:] = -100
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    loss = linear_cross_entropy(*leaves[:2], target, bias=leaves[2])  # impl="auto" -> triton on CUDA
    loss.backward()
    assert loss.item() == 0.0
    assert all((t.grad == 0).all() for t in leaves)


def test_triton_cuda_memory_fp32_caption_shape():
    """fp32: peak above inputs + gradients stays within 10% (the fp32 accumulators are the gradients)."""
    n, d, v = 8192, 768, 32000
    hidden = torch.randn(n, d, device="cuda", requires_grad=True)
    weight = (torch.randn(v, d, device="cuda") * 0.02).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda")
    linear_cross_entropy(hidden, weight, target).backward()  # warm-up: compile the kernels
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, target).backward()
    torch.cuda.synchronize()
    inputs_and_grads = 2 * (hidden.numel() + weight.numel()) * 4 + target.numel() * 8
    peak = torch.cuda.max_memory_allocated()
    assert peak <= 1.1 * inputs_and_grads, (peak / 2**20, inputs_and_grads / 2**20)
