"""OpenVision 2 vs OpenVision (v1) vs CLIP trained by the same code with equal steps and batch: training time,
peak memory, Fashion-MNIST linear probe and zero-shot accuracy, in one Markdown table.

    python -m benchmarks.bench.baselines                                    # CPU: small towers, 400 x 64 at 32 px
    python -m benchmarks.bench.baselines --steps 50 --out /tmp/bl           # quicker smoke
    python -m benchmarks.bench.baselines --full-tiny --steps 400            # the tiny presets' own tower sizes

Each training runs in its own process (`python -m encoder train`); its peak resident memory is the one that process
records in its status.json (the kernel's high-water mark, VmHWM), the training's alone; on CUDA one would report
torch.cuda.max_memory_allocated.
The evaluation is `encoder.evaluate.evaluate` (2000 train / 1000 test images, plus the probe of the same ViT at
its initial weights). tests/test_baselines.py trains with exactly this recipe and asserts on the same numbers.
Writes RUN_DIR/<family>/ (runs), RUN_DIR/results.json and the table (default
benchmarks/results/baselines_cpu.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from benchmarks.bench.results import RESULTS, ROOT
from encoder.config import equal_budget_recipe
from encoder.models.registry import FAMILIES
from ov2.cli import ArgumentParser, fail, positive
from ov2.runfolder import read_status

COUNT, COUNT0 = positive(int), positive(int, zero=True)  # argparse types: > 0, >= 0


def train(preset: str, out: str, args: list[str]) -> dict:
    """Train in a child process: wall seconds, the child's own peak RSS (from its status.json), last metrics."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "encoder", "train", "--preset", preset, "--out", out, *args]
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "train.log")
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=err)
        _, status, _ = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"training {preset} failed, see {log}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    own = read_status(out)["peak_rss_mb"]  # the training's VmHWM (a child's ru_maxrss also counts ours)
    return {"train_seconds": round(seconds, 1), "peak_rss_mib": round(own),
            "train_elapsed_s": round(records[-1]["elapsed_s"], 1), "final_loss": round(records[-1]["loss"], 3)}


def table(rows: dict, note: str, size: str = "micro") -> str:
    lines = [
        ("| model | train wall (s) | loop time (s) | peak RSS (MiB) | final loss | FMNIST probe | random-init probe "
         "| FMNIST zero-shot |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, r in rows.items():
        lines.append(f"| {family}-{size} | {r['train_seconds']} | {r['train_elapsed_s']} | {r['peak_rss_mib']} | "
                     f"{r['final_loss']} | {r['linear_probe_acc']:.3f} | {r['random_init_linear_probe_acc']:.3f} | "
                     f"{r['zero_shot_acc']:.3f} ({r['zero_shot_method']}) |")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="ov2 bench baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=COUNT, default=400, help="training steps of every family (default 400)")
    parser.add_argument("--batch", type=COUNT, default=64, help="batch size of every family (default 64)")
    parser.add_argument("--size", type=COUNT, default=32, help="training and evaluation resolution (default 32)")
    parser.add_argument("--seed", type=COUNT0, default=0, help="the runs' seed (initial weights, data order)")
    parser.add_argument("--full-tiny", action="store_true", help="the tiny presets' own towers (slow on CPU)")
    parser.add_argument("--out", default="runs/baselines", help="run folder, one sub-folder per family")
    parser.add_argument("--table", default=os.path.join(RESULTS, "baselines_cpu.md"),
                        help="Markdown table to write (default benchmarks/results/baselines_cpu.md)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma list (default {','.join(FAMILIES)})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --table and OUT/results.json")
    args = parser.parse_args(argv)
    prog = "ov2 bench baselines"
    from encoder.checkpoint import latest_checkpoint, load_model
    from encoder.evaluate import evaluate

    families = [f for f in args.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        return fail(prog, f"--families: unknown family {bad[0] if bad else '(none given)'!r}; choose from "
                          f"{', '.join(FAMILIES)}")
    results = os.path.join(args.out, "results.json")
    if os.path.exists(results) and not args.force:
        return fail(prog, f"{args.out} already holds a run ({results}): pass --force to overwrite it, or another --out")
    for family in families:
        if latest_checkpoint(os.path.join(args.out, family)):
            return fail(prog, f"{os.path.join(args.out, family)} already holds a run: remove it or pass another --out")
    if os.path.exists(args.table) and not args.force:
        return fail(prog, f"{args.table} exists: pass --force to overwrite it")

    size = "tiny" if args.full_tiny else "micro"
    overrides = equal_budget_recipe(args.steps, args.batch, args.size) + [f"--seed={args.seed}"]
    rows = {}
    for family in families:
        run = os.path.join(args.out, family)
        print(f"training {family}-{size} -> {run}", flush=True)
        row = train(f"{family}-{size}", run, overrides)
        model, cfg = load_model(run)
        row.update(evaluate(model, cfg, args.size, 2000, 1000, baseline=True))
        rows[family] = row
        print(json.dumps({family: row}), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    note = (f"Equal recipe for every family: {args.steps} steps, batch {args.batch}, {args.size} px, patch 4, seed "
            f"{args.seed}, 25 % built-in single-object scenes and 75 % Fashion-MNIST train images, lr 3e-3, no weight "
            "decay; towers "
            f"of the {size} presets. Probe: "
            "logistic regression on 2000 train-split features, accuracy on 1000 test-split images; the random-init "
            "probe is the same ViT at its initial weights (same seed); zero-shot on "
            f"the same test images (chance 0.1). Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
            "one run each. Command: python -m benchmarks.bench.baselines "
            + " ".join(argv if argv is not None else sys.argv[1:]))
    os.makedirs(os.path.dirname(args.table), exist_ok=True)
    with open(args.table, "w") as f:
        f.write("# Baselines on CPU: OpenVision 2 vs OpenVision (v1) vs CLIP\n\n" + table(rows, note))
    print(table(rows, note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
