"""Linear cross-entropy (encoder/kernels) against an fp64 eager oracle, on CPU.

- torch path (chunked): every option x reduction x bias, odd and multi-chunk shapes, fp32/bf16/fp16 inputs,
  all-ignored targets, per-token upstream gradients, micro-batch accumulation, no N x V tensor ever allocated.
- Triton kernels under TRITON_INTERPRET=1: one child process (`python tests/test_kernels.py --interpret`, the env
  var set before triton is imported) runs every case in INTERPRET_CASES and reports relative errors as JSON.
Errors are max |got - want| / max |want| per tensor (loss, dH, dW, dbias), with inputs rounded to the tested
dtype before the oracle sees them; tolerances per dtype are in TOL.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from encoder.kernels import chunked, linear_cross_entropy
from tests.helpers import assert_close_scaled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
OPTIONS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.0},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0},
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def make(n, d, v, dtype, *, bias=True, ignore_every=5, seed=0, lead=()):
    """Inputs already rounded to `dtype` (so the fp64 oracle sees the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, n, d, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.25).to(dtype)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    target = torch.randint(0, v, (*lead, n), generator=gen)
    if ignore_every:
        target.view(-1)[::ignore_every] = -100
    return hidden, weight, b, target


def loss_and_grads(impl, hidden, weight, bias, target, reduction, upstream, dtype=None, **options):
    """Loss and (dH, dW, dbias) in fp64, computing in `dtype` (default: the inputs' own)."""
    leaves = [None if t is None else t.to(dtype or t.dtype).detach().requires_grad_() for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], reduction=reduction, impl=impl, **options)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], upstream.to(loss.dtype))
    for leaf, g in zip([t for t in leaves if t is not None], grads):
        assert g.dtype == leaf.dtype
    return [loss.double(), *(g.double() for g in grads)]


def rel_errors(got, want):
    return [((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(got, want)]


def upstream_for(reduction, target, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if reduction == "none":
        return torch.randn(target.shape, generator=gen, dtype=torch.float64)  # not all ones
    return torch.tensor(1.7, dtype=torch.float64)


def compare(impl, shape, dtype, reduction, options, bias=True, ignore_every=5):
    hidden, weight, b, target = make(*shape, dtype, bias=bias, ignore_every=ignore_every)
    g = upstream_for(reduction, target)
    want = loss_and_grads("eager", hidden, weight, b, target, reduction, g, dtype=torch.float64, **options)
    got = loss_and_grads(impl, hidden, weight, b, target, reduction, g, **options)
    return rel_errors(got, want)


# ---------------------------------------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_eager_is_f_cross_entropy(reduction, smoothing):
    hidden, weight, b, target = make(64, 16, 37, torch.float64)
    want = F.cross_entropy(hidden @ weight.T + b, target, reduction=reduction, label_smoothing=smoothing)
    got = linear_cross_entropy(hidden, weight, target, bias=b, reduction=reduction, label_smoothing=smoothing,
                               impl="eager")
    assert_close_scaled(got, want, rel=1e-12)


# ------------------------------------------------------------------------------------------------------ torch path


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks (and a ragged last one) on test-sized inputs."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 64 * 4 * 517)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_torch_matches_oracle(option, reduction, bias, small_chunks):
    errs = compare("torch", (300, 40, 517), torch.float64, reduction, OPTIONS[option], bias=bias)
    assert max(errs) < TOL[torch.float64], errs
    errs = compare("torch", (300, 40, 517), torch.float32, reduction, OPTIONS[option], bias=bias)
    assert max(errs) < TOL[torch.float32], errs


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_torch_half_inputs(dtype, option):
    errs = compare("torch", (200, 48, 301), DTYPES[dtype], "mean", OPTIONS[option])
    assert max(errs) < TOL[DTYPES[dtype]], errs


@pytest.mark.parametrize("shape", [(1, 7, 11), (47, 31, 123), (2048, 64, 4000)])
def test_torch_shapes(shape):
    errs = compare("torch", shape, torch.float32, "mean", OPTIONS["all"], ignore_every=0 if shape[0] == 1 else 5)
    assert max(errs) < TOL[torch.float32], errs


def test_torch_leading_dims_and_no_grad():
    hidden, weight, b, target = make(9, 16, 50, torch.float32, lead=(3,))
    want = linear_cross_entropy(hidden, weight, target, bias=b, reduction="none", impl="eager")
    got = linear_cross_entropy(hidden, weight, target, bias=b, reduction="none", impl="torch")
    assert got.shape == (3, 9)
    assert_close_scaled(got, want, rel=1e-5)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, target, bias=b, impl="torch")
    assert_close_scaled(got, want.sum() / (target != -100).sum(), rel=1e-5)


@pytest.mark.parametrize("impl", ["torch", "eager"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero(impl, reduction):
    hidden, weight, b, target = make(20, 8, 30, torch.float32)
    target[:] = -100
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    loss = linear_cross_entropy(*leaves[:2], target, bias=leaves[2], reduction=reduction, impl=impl)
    loss.sum().backward()
    assert not loss.isnan().any() and (loss == 0).all()
    for leaf in leaves:
        assert leaf.grad is not None and (leaf.grad == 0).all()


def test_only_hidden_needs_grad_and_retain_graph():
    hidden, weight, b, target = make(40, 8, 30, torch.float32)
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, target, bias=b, impl="torch")
    (g1,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, hidden)
    want = torch.autograd.grad(linear_cross_entropy(hidden, weight, target, bias=b, impl="eager"), hidden)[0]
    assert_close_scaled(g1, want, rel=1e-5)
    assert torch.equal(g2, g1)


def test_autocast_casts_like_linear():
    hidden, weight, b, target = make(64, 16, 40, torch.float32)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(*leaves[:2], target, bias=leaves[2], impl="torch")
        loss.backward()
    want = linear_cross_entropy(*(t.detach().bfloat16().double() for t in leaves[:2]), target,
                                bias=leaves[2].detach().bfloat16().double(), impl="eager")
    assert loss.dtype == torch.float32 and all(t.grad.dtype == torch.float32 for t in leaves)
    assert_close_scaled(loss, want, rel=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_micro_batch_accumulation_equals_full_batch(reduction):
    hidden, weight, b, target = make(96, 16, 70, torch.float64)
    full = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    linear_cross_entropy(full[0], full[1], target, bias=full[2], reduction=reduction, impl="torch").backward()
    micro = [t.clone().requires_grad_() for t in (weight, b)]
    hid = hidden.clone().requires_grad_()
    n_valid = (target != -100).sum()
    for part in torch.arange(96).split(32):
        loss = linear_cross_entropy(hid[part], micro[0], target[part], bias=micro[1], reduction=reduction,
                                    impl="torch")
        if reduction == "mean":  # re-weight each micro-batch mean by its share of the valid tokens
            loss = loss * (target[part] != -100).sum() / n_valid
        loss.backward()
    for a, c in zip([hid, *micro], full):
        assert_close_scaled(a.grad, c.grad, rel=1e-12)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_never_holds_n_by_v(reduction, small_chunks):
    n, v = 512, 517
    hidden, weight, b, target = make(n, 16, v, torch.float32)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    with _LargestTensor() as mode:
        loss = linear_cross_entropy(*leaves[:2], target, bias=leaves[2], reduction=reduction, impl="torch",
                                    label_smoothing=0.1, softcap=5.0)
        loss.sum().backward()
    assert mode.largest <= chunked.chunk_rows(v, n) * v < n * v // 4


def test_argument_errors():
    hidden, weight, _, target = make(4, 8, 10, torch.float32)
    bad = [
        {"impl": "cuda"}, {"reduction": "avg"}, {"label_smoothing": 1.5}, {"z_loss": -1.0}, {"softcap": 0.0},
        {"bias": torch.zeros(11)},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="linear_cross_entropy"):
            linear_cross_entropy(hidden, weight, target, **kwargs)
    with pytest.raises(ValueError, match="width"):
        linear_cross_entropy(hidden[:, :7], weight, target)
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(hidden, weight, target[:3])
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(hidden.double(), weight, target)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        linear_cross_entropy(hidden, weight, torch.full((4,), 10), impl="torch")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="triton"):
            linear_cross_entropy(hidden, weight, target, impl="triton")


# ------------------------------------------------------------- Triton kernels compiled ahead of time (no GPU needed)

_SCALARS = {"N": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32", "ignore_index": "i32",
            "label_smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the real kernels")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_compile_for_sm90(dtype):
    """Lower both kernels (every option on) to a cubin for sm_90 with the ptxas bundled in the triton wheel."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from encoder.kernels import triton_kernels as tk

    bn, bv, bd, warps = tk.BLOCKS[4 if dtype == "fp32" else 2]
    common = {"HAS_BIAS": True, "HAS_SOFTCAP": True, "UPCAST": dtype == "fp32",
              "PRECISION": "ieee" if dtype == "fp32" else "tf32", "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}
    ptrs = {"H": f"*{dtype}", "W": f"*{dtype}", "B": f"*{dtype}", "T": "*i64", "LSE": "*fp32"}
    kernels = [
        (tk._lce_forward_kernel, {**ptrs, "LOSS": "*fp32"}, {"HAS_SMOOTHING": True}),
        (tk._lce_backward_kernel, {**ptrs, "GS": "*fp32", "DH": "*fp32", "DW": "*fp32", "DB": "*fp32"},
         {"NEED_DH": True, "NEED_DW": True, "NEED_DB": True}),
    ]
    for fn, pointers, flags in kernels:
        consts = {**common, **flags}
        types = {**pointers, **_SCALARS}
        names = fn.arg_names  # the kernel's parameter order
        signature = {name: "constexpr" if name in consts else types[name] for name in names}
        src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        compiled = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert compiled.asm["cubin"] and compiled.metadata.shared <= 100 * 1024


# --------------------------------------------------------------------------- Triton kernels under the interpreter

# (name, (N, D, V), dtype, reduction, option, bias, ignore_every); tiles are 16 x 32 x 16 in the interpreter.
INTERPRET_CASES = [
    (f"{dt}-{red}-{opt}", (47, 31, 123), dt, red, opt, True, 5)
    for dt, red, opt in itertools.product(["fp32"], ["mean", "sum", "none"], list(OPTIONS))
] + [
    (f"{dt}-{red}-{opt}", (47, 31, 123), dt, red, opt, True, 5)
    for dt, red, opt in itertools.product(["bf16", "fp16"], ["mean", "none"], ["plain", "all"])
] + [
    ("fp32-n1-v50", (1, 16, 50), "fp32", "mean", "all", True, 0),
    ("fp32-nobias-v64", (33, 20, 64), "fp32", "sum", "all", False, 3),
    ("bf16-nobias-v77", (20, 16, 77), "bf16", "none", "softcap", False, 4),
    ("fp32-all-ignored", (21, 16, 40), "fp32", "mean", "all", True, 1),
]


def _interpret_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting this process"
    out = {}
    for name, shape, dt, red, opt, bias, ignore_every in INTERPRET_CASES:
        hidden, weight, b, target = make(*shape, DTYPES[dt], bias=bias, ignore_every=ignore_every)
        g = upstream_for(red, target)
        if ignore_every == 1:  # all ignored: the result must be exactly zero, not NaN
            got = loss_and_grads("triton", hidden, weight, b, target, red, g, **OPTIONS[opt])
            out[name] = [float(t.detach().abs().max()) for t in got]
            continue
        out[name] = compare("triton", shape, DTYPES[dt], red, OPTIONS[opt], bias=bias, ignore_every=ignore_every)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpret_results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpret"], check=False, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=[c[0] for c in INTERPRET_CASES])
def test_triton_interpreter_matches_oracle(case, interpret_results):
    name, _, dt, *_ = case
    errs = interpret_results[name]
    if name.endswith("all-ignored"):
        assert errs == [0.0] * len(errs), errs
    else:
        assert all(e < TOL[DTYPES[dt]] for e in errs), (name, errs)


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpret_main()
