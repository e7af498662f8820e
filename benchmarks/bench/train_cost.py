"""Training cost of OpenVision 2 vs OpenVision (v1) vs CLIP, plus the ablations of the paper's strategy table.

    ov2 bench train                                  # CPU default: B/16 recipe, towers shrunk to ViT-Ti, 224 px
    ov2 bench train --batch 4 --steps 2 --no-headroom --out /tmp/cost           # quicker smoke
    ov2 bench train --rounds 2 --headroom-step 2 --out /tmp/cost2      # busy machine: interleave, finer headroom
    ov2 bench train --preset l14 --paper-towers --batch 256 --cap-mib 80000    # a GPU (bf16) at the paper's size

Every measurement runs in a fresh process (`benchmarks.bench.train_worker`): a full training step (forward, losses,
backward, AdamW) on random pixels and full-length texts, warm-up steps, then the median of the timed steps.
Peak memory is the CUDA allocator's peak on a GPU and the peak resident set of that process on the CPU (which
includes ~0.3 GB of torch itself: 'net' subtracts the resident set measured before the model was built).

Measured variants at the preset's final resolution: OV2 (keep 0.35), OV2 without token dropping (keep 1.0), OV1,
CLIP; and both OV2 variants at the low resolution of stage 1, from which the recipe estimate of the paper's
ablation follows: time per sample averaged over the preset's stages (most samples at low resolution) with and
without the low-resolution stage and token dropping. Batch headroom: the largest batch (a multiple of
--headroom-step) whose step fits under --cap-mib, by doubling then bisection, each probe a fresh process.
Writes NAME.csv and NAME.md (default benchmarks/results/cost_train_cpu or cost_train_cuda) and never overwrites
them without --force.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from benchmarks.bench.results import RESULTS, ROOT, OutputExists, check_writable, markdown_table, write_results
from ov2.cli import ArgumentParser, fail, positive

# A CPU size: ViT-Ti/16 with a decoder / text encoder of 2/3 its width and half its depth (the L/14 pairing,
# scaled down). Its forward FLOPs keep the L/14 proportions: OV1 (two text passes) / OV2 = 1.32 (L/14: 1.37).
SMALL_TOWERS = [
    "--model.vit.width=192", "--model.vit.depth=12", "--model.vit.heads=3", "--model.vit.mlp_dim=768",
    "--model.decoder.width=128", "--model.decoder.depth=6", "--model.decoder.heads=2", "--model.decoder.mlp_dim=512",
    "--model.text.width=128", "--model.text.depth=6", "--model.text.heads=2", "--model.text.mlp_dim=512",
    "--model.embed_dim=128",
]
SMALL_NAME = "towers shrunk to ViT-Ti/16 + 128 x 6 decoder / text encoder"
PAPER = {"time_ov1_ov2": 83 / 57, "memory_ov1_ov2": 24.5 / 13.8}  # ViT-L/14 @224 (OpenVision 2 paper)
# strategy ablation, ViT-L/14 @224, TPU v4-64 hours: (low-res stage, token dropping) -> hours
PAPER_ABLATION = {(False, False): 217, (False, True): 190, (True, False): 67, (True, True): 55}

COUNT, COUNT0 = positive(int), positive(int, zero=True)  # argparse types: > 0, >= 0


def run_worker(spec: dict, timeout: float | None = None) -> dict:
    """One measurement in a fresh process; {"oom": True} when it ran out of memory; RuntimeError on a crash."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "benchmarks.bench.train_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 3 or proc.returncode in (-9, 137):  # CUDA OOM, or killed by the kernel's OOM killer
        return {"oom": True}
    if proc.returncode or not lines:
        raise RuntimeError(f"measurement {spec} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return json.loads(lines[-1])


def largest_batch(fits: Callable[[int], bool], start: int, step: int, limit: int) -> int:
    """The largest multiple of `step` (from `start` up to `limit`) for which fits(batch) holds, assuming memory
    grows with the batch: double while it fits, then bisect between the last fit and the first failure.
    0 when even `start` does not fit."""
    if not fits(start):
        return 0
    lo, hi = start, None
    while hi is None:
        nxt = min(lo * 2, limit)
        if nxt <= lo:
            return lo
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > step:
        mid = lo + (hi - lo) // (2 * step) * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def probe(spec: dict, cap_mib: float | None) -> Callable[[int], bool]:
    """fits(batch): two steps at this batch in a fresh process stay under the cap (and do not run out of memory).
    Two, because AdamW allocates its state in the first step: the second step's peak is the steady one."""

    def fits(batch: int) -> bool:
        result = run_worker({**spec, "batch": batch, "steps": 1, "warmup": 1})
        ok = not result.get("oom") and (cap_mib is None or result["peak_mib"] <= cap_mib)
        used = "out of memory" if result.get("oom") else f"{result['peak_mib']:.0f} MiB"
        print(f"  headroom probe batch {batch}: {'fits' if ok else 'does not fit'} ({used})", flush=True)
        return ok

    return fits


def variants(args) -> list[dict]:
    from encoder.config import get_preset

    stages = get_preset(f"ov2-{args.preset}").stages
    high, low = args.image_size or stages[-1].image_size, args.low_size or stages[0].image_size
    out = [{"name": "ov2", "family": "ov2", "keep": 0.35, "image_size": high},
           {"name": "ov2 no token dropping", "family": "ov2", "keep": 1.0, "image_size": high},
           {"name": "ov1", "family": "ov1", "keep": None, "image_size": high},
           {"name": "clip", "family": "clip", "keep": None, "image_size": high}]
    if low != high:
        out += [{"name": "ov2 @ low res", "family": "ov2", "keep": 0.35, "image_size": low},
                {"name": "ov2 no token dropping @ low res", "family": "ov2", "keep": 1.0, "image_size": low}]
    return out


def spec_of(v: dict, args) -> dict:
    overrides = ([] if args.paper_towers else SMALL_TOWERS) + list(args.override)
    if v["keep"] is not None:
        overrides.append(f"--model.keep_ratio={v['keep']}")
    return {"preset": f"{v['family']}-{args.preset}", "image_size": v["image_size"], "overrides": overrides,
            "warmup": args.warmup, "steps": args.steps, "batch": args.batch, "cpu": args.cpu,
            "threads": args.threads}


def recipe_ablation(rows: dict, preset: str) -> list[dict]:
    """Time per sample over the preset's recipe (stage samples as weights) for the four strategy combinations."""
    from encoder.config import get_preset

    stages = get_preset(f"ov2-{preset}").stages
    samples = [s.steps * s.batch_size for s in stages]
    names = {(True, True): ("ov2 @ low res", "ov2"),
             (True, False): ("ov2 no token dropping @ low res", "ov2 no token dropping")}
    if not all(n in rows for pair in names.values() for n in pair):
        return []
    out = []
    for (low_res, drop), hours in PAPER_ABLATION.items():
        low_name, high_name = names[(True, drop)]
        t_low, t_high = (rows[n]["step_s"] / rows[n]["batch"] for n in (low_name, high_name))
        # with the low-res stage: stage 1 at low res, later stages at the final res; without: all at the final res
        per_sample = ((samples[0] * t_low + sum(samples[1:]) * t_high) / sum(samples)) if low_res else t_high
        out.append({"low_res_stage": low_res, "token_dropping": drop, "ms_per_sample": 1000 * per_sample,
                    "paper_hours": hours})
    both = next(r["ms_per_sample"] for r in out if r["low_res_stage"] and r["token_dropping"])
    for r in out:
        r["vs_both"] = r["ms_per_sample"] / both
        r["paper_vs_both"] = r["paper_hours"] / PAPER_ABLATION[(True, True)]
    return out


def render(rows: dict, ablation: list[dict], args, device: str, note: str) -> str:
    header = ["variant", "px", "batch", "step (s)", "images/s", "peak (MiB)", "net (MiB)", "max batch", "time / ov2",
              "memory / ov2", "net memory / ov2", "load"]
    table = [[r["variant"], r["image_size"], r["batch"], f"{r['step_s']:.3f}", f"{r['images_per_s']:.2f}",
              f"{r['peak_mib']:.0f}", f"{r['net_mib']:.0f}", r.get("max_batch", ""), f"{r['time_vs_ov2']:.2f}",
              f"{r['memory_vs_ov2']:.2f}", f"{r['net_memory_vs_ov2']:.2f}", f"{r['load_1m']:.1f}"]
             for r in rows.values()]
    text = f"# Training cost, OV2 vs OV1 vs CLIP ({device})\n\n{note}\n\n" + markdown_table(header, table)
    ov1 = rows.get("ov1")
    if ov1:
        text += ("\nOV1 / OV2 beside the paper (ViT-L/14 @224, TPU): step time "
                 f"{ov1['time_vs_ov2']:.2f}x (paper {PAPER['time_ov1_ov2']:.2f}x), peak memory "
                 f"{ov1['memory_vs_ov2']:.2f}x, net {ov1['net_memory_vs_ov2']:.2f}x (paper "
                 f"{PAPER['memory_ov1_ov2']:.2f}x)")
        if "max_batch" in ov1 and rows["ov2"].get("max_batch"):
            text += f"; largest batch under the cap OV2 / OV1 {rows['ov2']['max_batch']} / {ov1['max_batch']}"
        text += " (paper: OV1 runs out of memory at 4k per chip, OV2 fits 8k).\n"
    if ablation:
        text += ("\nStrategy ablation: time per sample over the preset's recipe (stage 1 samples at the low "
                 "resolution), relative to using both strategies, beside the paper's hours (L/14, TPU v4-64):\n\n")
        text += markdown_table(
            ["low-res stage", "token dropping", "ms / sample", "vs both", "paper hours", "paper vs both"],
            [[a["low_res_stage"], a["token_dropping"], f"{a['ms_per_sample']:.1f}", f"{a['vs_both']:.2f}",
              a["paper_hours"], f"{a['paper_vs_both']:.2f}"] for a in ablation])
    return text


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="ov2 bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="b16", help="paper size whose recipe and towers are used (default b16)")
    parser.add_argument("--paper-towers", action="store_true",
                        help="the preset's own tower sizes (default: shrunk to ViT-Ti/16 + 128 x 6 towers for a CPU)")
    parser.add_argument("--image-size", type=COUNT0, default=0, help="final resolution (default: the preset's last)")
    parser.add_argument("--low-size", type=COUNT0, default=0, help="low resolution (default: the preset's stage 1)")
    parser.add_argument("--batch", type=COUNT, default=8, help="batch of the timed steps (default 8)")
    parser.add_argument("--warmup", type=COUNT0, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--steps", type=COUNT, default=3, help="timed steps; the median is reported (default 3)")
    parser.add_argument("--rounds", type=COUNT, default=1,
                        help="measure every variant this many times, interleaved (a busy machine); default 1")
    parser.add_argument("--cap-mib", type=positive(float, zero=True), default=0,
                        help="memory cap of the headroom search in MiB (default: 1024 on CPU; the GPU's memory)")
    parser.add_argument("--headroom-step", type=COUNT, default=4, help="batch granularity of the search (default 4)")
    parser.add_argument("--max-batch", type=COUNT, default=65_536, help="stop the search here (default 65536)")
    parser.add_argument("--no-headroom", action="store_true", help="skip the batch-headroom search")
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even when a GPU is present")
    parser.add_argument("--threads", type=COUNT0, default=0, help="torch threads per process (default: torch's)")
    parser.add_argument("--override", action="append", default=[], metavar="--KEY=VALUE",
                        help="a config override for every variant (repeatable): --override=--model.decoder.depth=4")
    parser.add_argument("--out", default=RESULTS, help="folder for the result files (default benchmarks/results)")
    parser.add_argument("--name", default="", help="result file name (default cost_train_cpu / cost_train_cuda)")
    parser.add_argument("--force", action="store_true", help="overwrite existing result files")
    args = parser.parse_args(argv)
    import torch

    from encoder.config import PRESETS, ConfigError, apply_overrides, get_preset

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    name = args.name or f"cost_train_{device}"
    try:
        if f"ov2-{args.preset}" not in PRESETS:
            raise ConfigError(f"unknown preset size {args.preset!r}")
        apply_overrides(get_preset(f"ov2-{args.preset}"), args.override)
        if min(args.batch, args.steps, args.headroom_step, args.rounds) < 1 or args.warmup < 0:
            raise ConfigError("--batch, --steps, --rounds and --headroom-step must be at least 1, --warmup at least 0")
        check_writable(args.out, name, args.force)
    except (ConfigError, OutputExists) as err:
        return fail("ov2 bench train", err)
    cap = args.cap_mib or (None if device == "cuda" else 1024.0)
    started = time.time()
    rows: dict[str, dict] = {}
    from tqdm import tqdm

    times: dict[str, list[float]] = {}
    jobs = [v for _ in range(args.rounds) for v in variants(args)]  # rounds interleave: a load change hits all
    for v in tqdm(jobs, desc="measuring", dynamic_ncols=True):
        result = run_worker(spec_of(v, args))
        if result.get("oom"):
            return fail("ov2 bench train", f"{v['name']} ran out of memory at batch {args.batch}: lower --batch", 1)
        times.setdefault(v["name"], []).extend(result["step_s"])
        step = statistics.median(times[v["name"]])
        old = rows.get(v["name"], {})
        peak = max(result["peak_mib"], old.get("peak_mib", 0.0))
        rows[v["name"]] = {"variant": v["name"], "family": v["family"], "keep_ratio": v["keep"],
                           "image_size": v["image_size"], "batch": args.batch, "step_s": step,
                           "images_per_s": args.batch / step, "peak_mib": peak,
                           "net_mib": max(result["peak_mib"] - result["base_mib"], old.get("net_mib", 0.0)),
                           "params_m": result["params_m"], "device": result["device"],
                           "steps_timed": len(times[v["name"]]),
                           "load_1m": max(os.getloadavg()[0], old.get("load_1m", 0.0))}
        print(json.dumps(rows[v["name"]]), flush=True)
    if not args.no_headroom:
        for v in variants(args)[:4]:
            if v["name"] == "ov2 no token dropping":
                continue
            print(f"headroom of {v['name']} under {cap or 'the device memory'} MiB", flush=True)
            rows[v["name"]]["max_batch"] = largest_batch(probe(spec_of(v, args), cap), args.headroom_step,
                                                         args.headroom_step, args.max_batch)
            rows[v["name"]]["cap_mib"] = cap
    ref = rows["ov2"]
    for r in rows.values():
        r["time_vs_ov2"] = r["step_s"] / ref["step_s"]
        r["memory_vs_ov2"] = r["peak_mib"] / ref["peak_mib"]
        r["net_memory_vs_ov2"] = r["net_mib"] / max(ref["net_mib"], 1e-9)
    ablation = recipe_ablation(rows, args.preset)
    towers = "the preset's own towers" if args.paper_towers else SMALL_NAME
    note = (f"Preset {args.preset} ({towers}); full training steps (forward, losses, backward, AdamW) on random "
            f"pixels and full-length texts; median of {args.steps} timed steps after {args.warmup} warm-up, each "
            f"variant in a fresh process{', bf16 autocast' if device == 'cuda' else ', fp32'}"
            f"{f', {args.rounds} interleaved rounds (median over all timed steps)' if args.rounds > 1 else ''}. Peak = "
            f"{'CUDA allocator peak' if device == 'cuda' else 'peak resident set of the process'}; net = peak minus "
            f"the resident set before the model was built. Max batch: largest multiple of {args.headroom_step} "
            f"whose two steps fit under {cap or 'the device memory'} MiB. Machine: {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
            f"{', ' + torch.cuda.get_device_name() if device == 'cuda' else ''}; 'load' = the 1-minute load average "
            "when the variant finished, the highest over rounds (other jobs on the machine slow a variant); "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}, {time.time() - started:.0f} s. Command: ov2 bench train "
            + " ".join(argv if argv is not None else sys.argv[1:]))
    markdown = render(rows, ablation, args, device, note)
    csv_rows = list(rows.values()) + [{"variant": f"recipe: low-res {a['low_res_stage']}, drop "
                                                  f"{a['token_dropping']}", **a} for a in ablation]
    print(markdown)
    paths = write_results(args.out, name, csv_rows, markdown, args.force)
    print("wrote " + ", ".join(paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
