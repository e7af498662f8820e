"""The GPU check (`make gpu-check`): one script, under 10 minutes on one H100/H200, that runs what only a GPU can
check and records its timings in one folder of JSON + Markdown.

    make gpu-check                                  # -> benchmarks/results/gpu_check/{summary.md,summary.json,*.log}
    python -m benchmarks.bench.gpu_check --out /tmp/gc --only bridge_eval

Checks, in order (each in its own process, with its own time limit; a failure is recorded and the next runs):
    kernel_tests   the Triton fused linear cross-entropy kernels against the oracle (tests/test_kernels_gpu.py)
    kernels        `ov2 bench kernels` at the paper's shapes: ours vs eager, torch.compile, cut-cross-entropy and
                   Liger-Kernel (each where installed)
    pretrain_l14   20 steps of ov2-l14 in bf16 at the paper's image size, micro-batch halved from 256 until it fits
    train_cost     `ov2 bench train` OV2 vs OV1 (and CLIP) at L/14 in bf16
    bridge_eval    a 5-step bridge (both stages) and a 20-question evaluation (ov2_gqa) on the device
On a machine without CUDA it runs what it can (bridge_eval, on the CPU) and lists every other check as skipped,
with the reason. Exit code: 0 when nothing that ran failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench.results import RESULTS
from ov2.cli import doc_parser, fail

PY = [sys.executable]


def _checks(out: Path) -> list[dict]:
    """name, command, seconds allowed, whether it needs CUDA."""
    work = out / "work"
    ov2 = [*PY, "-m", "ov2"]
    return [
        {"name": "kernel_tests", "cuda": True, "limit": 120,
         "cmd": [*PY, "-m", "pytest", "-q", "tests/test_kernels_gpu.py"]},
        {"name": "kernels", "cuda": True, "limit": 150,
         "cmd": [*ov2, "bench", "kernels", "--device", "cuda", "--repeats", "3", "--out", str(out / "kernels"),
                 "--force"]},
        {"name": "pretrain_l14", "cuda": True, "limit": 150,
         "cmd": [*PY, "-m", "benchmarks.bench.gpu_check", "--pretrain-l14", str(work / "ov2-l14")]},
        {"name": "train_cost", "cuda": True, "limit": 120,
         "cmd": [*ov2, "bench", "train", "--preset", "l14", "--paper-towers", "--batch", "64", "--steps", "3",
                 "--no-headroom", "--out", str(out), "--name", "cost_train_cuda", "--force"]},
        {"name": "bridge_eval", "cuda": False, "limit": 240,
         "cmd": [*ov2, "bridge", "train", "--encoder", "preset:ov2-tiny", "--llm", "smollm2", "--out",
                 str(work / "bridge"), "--stage1.steps=5", "--stage2.steps=5", "--eval_samples=0",
                 "--stage1.progress=false", "--stage2.progress=false", "--chat_template=chatml"],
         "then": [*ov2, "eval", str(work / "bridge" / "model"), "--tasks", "ov2_gqa", "--limit", "20", "--out",
                  str(work / "eval")]},
    ]


def pretrain_l14(out: str) -> int:
    """20 bf16 steps of ov2-l14 (1 at 84 px, 19 at the paper's 224 px) at the largest micro-batch (256, 128, ...)
    that fits on this GPU."""
    import torch

    batch = 256
    while batch >= 8:
        args = [*PY, "-m", "ov2", "train", "--preset", "ov2-l14", "--out", f"{out}-b{batch}", "--bf16=true",
                "--stages.0.steps=1", "--stages.1.steps=19", f"--stages.0.batch_size={batch}",
                f"--stages.1.batch_size={batch}", "--ckpt_every=1000",
                "--data.workers=8"]
        res = subprocess.run(args, capture_output=True, text=True)
        if res.returncode == 0:
            print(json.dumps({"micro_batch": batch, "gpu": torch.cuda.get_device_name(0)}))
            return 0
        if "out of memory" not in (res.stderr + res.stdout).lower():
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        batch //= 2
    print("no micro-batch of 8 or more fits", file=sys.stderr)
    return 1


def run_checks(out: Path, only: list[str] | None = None) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for check in _checks(out):
        name = check["name"]
        if only and name not in only:
            continue
        if check["cuda"] and not cuda:
            rows.append({"check": name, "status": "skipped", "seconds": 0.0, "note": "needs a CUDA GPU"})
            continue
        start, log = time.time(), out / f"{name}.log"
        status, note = "ok", ""
        with open(log, "w") as f:
            for cmd in [check["cmd"], *([check["then"]] if "then" in check else [])]:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                try:
                    res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         timeout=max(1, check["limit"] - (time.time() - start)))
                except subprocess.TimeoutExpired:
                    status, note = "failed", f"over its {check['limit']} s limit"
                    break
                if res.returncode != 0:
                    status, note = "failed", f"exit code {res.returncode} (see {log.name})"
                    break
        rows.append({"check": name, "status": status, "seconds": round(time.time() - start, 1), "note": note})
        print(f"{name}: {status} in {rows[-1]['seconds']} s {note}", file=sys.stderr)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# GPU check on {meta['device']}", "", f"`{meta['command']}`, {meta['when']}.", "",
             "| check | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['seconds']} | {r['note']} |" for r in rows]
    skipped = [r["check"] for r in rows if r["status"] == "skipped"]
    if skipped:
        lines += ["", f"Skipped here (no CUDA GPU): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = doc_parser("gpu-check", __doc__)
    parser.add_argument("--out", default=os.path.join(RESULTS, "gpu_check"), help="the results folder")
    parser.add_argument("--only", default="", help="comma list of checks to run (default: all)")
    parser.add_argument("--pretrain-l14", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pretrain_l14:
        return pretrain_l14(args.pretrain_l14)
    import torch

    only = [c for c in args.only.split(",") if c]
    known = [c["name"] for c in _checks(Path(args.out))]
    if set(only) - set(known):
        return fail("gpu-check", f"unknown checks {sorted(set(only) - set(known))}; choose from {', '.join(known)}")
    rows = run_checks(Path(args.out), only)
    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})",
            "command": "python -m benchmarks.bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
            "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    text = markdown(rows, meta)
    (Path(args.out) / "summary.md").write_text(text)
    (Path(args.out) / "summary.json").write_text(json.dumps({"meta": meta, "checks": rows}, indent=1))
    print(text)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
