"""Linear cross-entropy benchmark: median forward+backward time and peak memory of each method, as ratios to eager.

    python -m benchmarks.bench.kernels           # full grid (CPU: ~30-40 min on 2 cores); also `ov2 bench kernels`
    python -m benchmarks.bench.kernels --quick         # caption shape at N=8192 only (CPU: ~3 min)
    python -m benchmarks.bench.kernels --methods ours,cce --ns 4096

Shapes: hidden [N, D] (N tokens, D width), weight [V, D] (V vocab): the caption head (D=768, V=32,000,
N = 4k..32k) and the bridge head (D=576, V=49,152, SmolLM2). Each (method, shape) runs in its own fresh
process (`--one`), so peak memory is clean: peak resident set (VmHWM) on CPU, torch.cuda.max_memory_allocated
on CUDA. Methods:

    eager        F.cross_entropy(h @ W.T, y)                          (holds N x V logits)
    compile      torch.compile of the same formula
    torch_lce    F.linear_cross_entropy with default options
    chunk_loop   a plain loop over 1,024-token chunks, each under activation checkpointing
    cce          cut-cross-entropy: impl="torch_compile" on CPU, its Triton kernel ("cce") on CUDA
    liger        Liger's fused linear cross-entropy (CUDA only, when liger-kernel is installed)
    ours         encoder.kernels.linear_cross_entropy (impl="auto": chunked torch on CPU, Triton on CUDA)

A method whose optional package (cut-cross-entropy, liger-kernel) is not installed is recorded as skipped, with the
reason, not as a failure.

Results go to benchmarks/results/kernels_{cpu,cuda}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

from benchmarks.bench.results import RESULTS, ROOT, OutputExists, check_writable, write_results
from ov2.cli import ArgumentParser, fail, positive
from ov2.runfolder import peak_rss_mb

SHAPES = {"caption": (768, 32000), "bridge": (576, 49152)}
DEFAULT_NS = {"caption": [4096, 8192, 16384, 32768], "bridge": [4096, 8192]}
CPU_METHODS = ["eager", "compile", "torch_lce", "chunk_loop", "cce", "ours"]
CUDA_METHODS = ["eager", "compile", "torch_lce", "chunk_loop", "cce", "liger", "ours"]
OPTIONAL = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}  # method -> the module it needs (not a dependency)


def missing(method: str) -> str | None:
    """Why `method` cannot run here for want of its optional package, or None."""
    import importlib.util

    module = OPTIONAL.get(method)
    return f"{module} is not installed" if module and importlib.util.find_spec(module) is None else None


def _loss_fn(method: str, device: str):
    """A function (h, W, y) -> scalar loss for `method`."""
    import torch
    import torch.nn.functional as F

    if method == "eager":
        return lambda h, w, y: F.cross_entropy((h @ w.T).float(), y)
    if method == "compile":
        return torch.compile(lambda h, w, y: F.cross_entropy((h @ w.T).float(), y))
    if method == "torch_lce":
        return lambda h, w, y: F.linear_cross_entropy(h, w, y)
    if method == "chunk_loop":
        from torch.utils.checkpoint import checkpoint

        def chunk_sum(hc, w, yc):
            return F.cross_entropy((hc @ w.T).float(), yc, reduction="sum")

        def loop(h, w, y):
            chunks = zip(h.split(1024), y.split(1024))
            parts = [checkpoint(chunk_sum, hc, w, yc, use_reentrant=False) for hc, yc in chunks]
            return torch.stack(parts).sum() / y.numel()

        return loop
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        impl = "cce" if device == "cuda" else "torch_compile"
        return lambda h, w, y: cce(h, w, y, impl=impl)
    if method == "liger":
        if device != "cuda":
            raise RuntimeError("liger runs on CUDA only")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: liger(w, h, y)
    if method == "ours":
        from encoder.kernels import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y)
    raise ValueError(f"unknown method {method!r}")


def run_one(method: str, n: int, d: int, v: int, dtype: str, repeats: int, device: str) -> dict:
    """Time `repeats` forward+backward passes (after one warm-up) in this process; report the median and peak."""
    import psutil
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dt).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) * 0.02).to(device=device, dtype=dt).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen).to(device)
    fn = _loss_fn(method, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    base_rss = psutil.Process().memory_info().rss
    times, losses = [], []
    for i in range(repeats + 1):
        hidden.grad = weight.grad = None
        if device == "cuda" and i == 1:
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        loss = fn(hidden, weight, target)
        loss.backward()
        sync()
        if i:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_mb() * 2**20
    return {"method": method, "n": n, "d": d, "v": v, "dtype": dtype, "device": device,
            "time_s": statistics.median(times),
            "times_s": times, "peak_bytes": peak, "base_bytes": base_rss if device == "cpu" else None,
            "loss": losses[-1], "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}


def _child(method, n, d, v, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench.kernels", "--one", method, "--n", str(n), "--d", str(d),
           "--v", str(v),
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--device", args.device]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "d": d, "v": v, "error": f"timeout after {args.timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        return {"method": method, "n": n, "d": d, "v": v, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _failure(row: dict) -> str | None:
    """Why a measured row is not a result (the process failed, or a time or loss is not a finite number)."""
    if "error" in row:
        return row["error"]
    bad = [k for k in ("time_s", "peak_bytes", "loss") if not math.isfinite(float(row.get(k, math.nan)))]
    return f"{', '.join(bad)} not finite ({', '.join(f'{k}={row.get(k)}' for k in bad)})" if bad else None


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Linear cross-entropy benchmark ({meta['device']}, {meta['dtype']})", "",
             f"{meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; forward+backward, median of the "
             "timed runs after one warm-up; each method in a fresh process. Peak = "
             + ("max resident set of the process (includes ~0.3-0.5 GB for torch itself and the inputs)."
                if meta["device"] == "cpu" else "torch.cuda.max_memory_allocated."), "",
             "Load = the 1-minute load average when the process ended (other jobs on the machine slow every method).",
             "", "| shape | N | method | time (s) | runs | time / eager | peak (GB) | peak / eager | loss | load |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = {m: i for i, m in enumerate(CUDA_METHODS)}
    rows = sorted(rows, key=lambda r: (-r["v"], r["n"], order.get(r["method"], 99)))
    eager = {(r["d"], r["v"], r["n"]): r for r in rows if r["method"] == "eager" and "skipped" not in r}
    for r in rows:
        shape = next((k for k, s in SHAPES.items() if s == (r["d"], r["v"])), f"D={r['d']} V={r['v']}")
        if "skipped" in r:
            lines.append(f"| {shape} | {r['n']} | {r['method']} | {r['skipped']} | | | | | | |")
            continue
        ref = eager.get((r["d"], r["v"], r["n"]))
        t_ratio = f"{r['time_s'] / ref['time_s']:.2f}" if ref else "-"
        m_ratio = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else "-"
        load = r.get("load_avg", float("nan"))
        lines.append(f"| {shape} | {r['n']} | {r['method']} | {r['time_s']:.2f} | {len(r['times_s'])} | {t_ratio} | "
                     f"{r['peak_bytes'] / 1e9:.2f} | {m_ratio} | {r['loss']:.4f} | {load:.1f} |")
    return "\n".join(lines) + "\n"


def _parse(argv):
    p = ArgumentParser(prog="ov2 bench kernels", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--methods", default=None, help="comma list (default: all for the device)")
    p.add_argument("--shapes", default="caption,bridge", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--ns", default=None, help="comma list of N (default: per shape, see DEFAULT_NS)")
    p.add_argument("--quick", action="store_true", help="caption shape at N=8192 only")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=positive(int), default=3)
    p.add_argument("--timeout", type=positive(float), default=900, help="seconds per (method, shape) process")
    p.add_argument("--max-eager-n", type=positive(int), default=32768, help="skip eager/compile/torch_lce above this N")
    p.add_argument("--out", default=None, help="results stem (default benchmarks/results/kernels_<device>)")
    p.add_argument("--append", action="store_true", help="merge into existing results (same method+shape: replace)")
    p.add_argument("--force", action="store_true", help="replace existing results")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--v", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _plan(args) -> tuple[list[str], list[str], list[int] | None]:
    """(methods, shapes, Ns) from the arguments; ValueError naming a bad one."""
    known = CUDA_METHODS if args.device == "cuda" else CPU_METHODS
    methods = [m for m in args.methods.split(",") if m] if args.methods else known
    shapes = ["caption"] if args.quick else [s for s in args.shapes.split(",") if s]
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise ValueError(f"--methods: unknown method {bad[0] if bad else '(none given)'!r} on {args.device}; "
                         f"choose from {', '.join(known)}")
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        raise ValueError(f"--shapes: unknown shape {bad[0] if bad else '(none given)'!r}; choose from "
                         f"{', '.join(SHAPES)}")
    ns = None
    if args.ns:
        try:
            ns = [int(x) for x in args.ns.split(",")]
        except ValueError:
            raise ValueError(f"--ns: expected a comma list of positive integers, got {args.ns!r}") from None
        if min(ns) < 1:
            raise ValueError(f"--ns: every N must be at least 1, got {args.ns!r}")
    return methods, shapes, ns


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    prog = "ov2 bench kernels"
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail(prog, "--device cuda: no CUDA device here (torch.cuda.is_available() is false)")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.d, args.v, args.dtype, args.repeats, args.device)))
        return 0
    try:
        methods, shapes, given_ns = _plan(args)
    except ValueError as err:
        return fail(prog, err)
    meta = {"device": args.device, "dtype": args.dtype, "repeats": args.repeats, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs"
            if args.device == "cpu" else torch.cuda.get_device_name()}
    stem = args.out or os.path.join(RESULTS, f"kernels_{args.device}")
    try:
        check_writable(os.path.dirname(stem), os.path.basename(stem), args.force or args.append, ("json", "md"))
    except OutputExists as err:
        return fail(prog, err)
    rows, failed = [], []
    if args.append and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            rows = json.load(f)["rows"]
    absent = {m: missing(m) for m in methods if missing(m)}
    for method, why in absent.items():
        print(f"{method}: skipped ({why})", file=sys.stderr, flush=True)
    for shape in shapes:
        d, v = SHAPES[shape]
        ns = given_ns or ([8192] if args.quick else DEFAULT_NS[shape])
        for n in ns:
            for method in methods:
                if method in absent:
                    rows = [r for r in rows if (r["method"], r["n"], r["d"], r["v"]) != (method, n, d, v)]
                    rows.append({"method": method, "n": n, "d": d, "v": v, "skipped": absent[method]})
                    continue
                if method in ("eager", "compile", "torch_lce") and n > args.max_eager_n:
                    if not any((r["method"], r["n"], r["d"], r["v"]) == (method, n, d, v) for r in rows):
                        rows.append({"method": method, "n": n, "d": d, "v": v, "skipped": "not run (N > max-eager-n)"})
                    continue
                row = _child(method, n, d, v, args)
                why = _failure(row)
                if why:  # a failure is said, never recorded as a result
                    failed.append(f"{shape} N={n} {method}: {why}")
                    print(f"{shape:8s} N={n:6d} {method:11s} FAILED: {why}", file=sys.stderr, flush=True)
                    continue
                rows = [r for r in rows if (r["method"], r["n"], r["d"], r["v"]) != (method, n, d, v)] + [row]
                print(f"{shape:8s} N={n:6d} {method:11s} {row['time_s']:.2f} s, {row['peak_bytes'] / 1e9:.2f} GB",
                      flush=True)
                _save(stem, rows, meta)  # after every process, so an interrupted run keeps what it measured
    if absent:
        _save(stem, rows, meta)
    if any("time_s" in r for r in rows):
        print(to_markdown(rows, meta))
        print(f"saved {stem}.md and {stem}.json")
    if failed:
        return fail(prog, f"{len(failed)} measurement(s) failed, not recorded: {'; '.join(failed)}", 1)
    return 0


def _save(stem: str, rows: list[dict], meta: dict) -> None:
    write_results(os.path.dirname(stem), os.path.basename(stem), rows, to_markdown(rows, meta), True,
                  formats=("json", "md"), meta=meta)


if __name__ == "__main__":
    sys.exit(main())
