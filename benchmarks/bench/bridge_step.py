"""LLaVA training step cost: stage 1 and stage 2, float32 vs bf16 autocast, on the machine at hand.

    ov2 bench bridge                                         # the default experiment's bridge: SmolLM2 + ov2-tiny
    ov2 bench bridge --encoder runs/default/encoders/openvision2/export/encoder --repeats 7
    ov2 bench bridge --llm LLAMA_FOLDER --steps 1 --repeats 1 --out /tmp/bb     # any local transformers LLM

One process builds the model once and times full optimizer steps (forward, answer loss, backward, AdamW) on one
fixed built-in batch, the variants interleaved round by round so that a busy machine slows them alike; the table
gives the median step time of each, its ratio to float32, and the step's achieved TFLOP/s beside torch's own matmul
rate in the same precision on the step's shapes (the limit), measured in the same process. bf16 pays off where the
CPU multiplies bf16 natively (avx512_bf16 / AMX) or on a GPU; the table names the CPU's flags so a reader can tell.
Writes NAME.md and NAME.json (default benchmarks/results/bridge_step_cpu) and never overwrites them without --force.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks.bench.results import OutputExists, check_writable, out_options, write_results
from ov2.cli import ArgumentParser, doc_parser, fail


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
    return " ".join(have) or "no avx512"


def timed_step(model, opt, loss_fn, batch: dict, bf16: bool) -> float:
    """Seconds of one full optimizer step (forward, answer loss, backward, AdamW) under CPU bf16 autocast or not."""
    import torch

    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = loss_fn(model, batch)
    out["lm_loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def step_flops(model, opt, loss_fn, batch: dict) -> int:
    """Floating-point operations of one step's forward and backward (torch's FLOP counter: matmuls; the CPU's fused
    attention counts 0, a few percent at these lengths), the optimizer's elementwise update left out."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch)["lm_loss"].backward()
    opt.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_rate(m: int, k: int, n: int, dtype, repeats: int = 5) -> float:
    """torch's own [m, k] @ [k, n] rate in TFLOP/s (median of `repeats`, after a warm-up): the machine's limit on
    the step's own shapes."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e12


def bench_parser(prog: str, doc: str, out: str, unit: str) -> ArgumentParser:
    """The options every bridge benchmark takes (encoder, LLM, batch, steps, rounds, --out NAME, --force)."""
    parser = doc_parser(prog, doc)
    parser.add_argument("--encoder", default="preset:ov2-tiny", help="any bridge encoder (default preset:ov2-tiny)")
    parser.add_argument("--llm", default="smollm2", help="the LLM (default smollm2)")
    parser.add_argument("--batch", type=int, default=8, help="samples per step (default 8, the default experiment's)")
    parser.add_argument("--steps", type=int, default=2, help=f"timed steps per {unit} per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (after one warm-up round)")
    out_options(parser, out)
    return parser


def measure(encoder: str, llm: str, batch: int, steps: int, repeats: int, progress: bool = True,
            precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[dict]:
    import torch

    from bridge.assemble import trainable_groups
    from bridge.config import BridgeConfig
    from bridge.data import Collator
    from bridge.loss import AnswerLoss
    from bridge.pipeline import build, datasets

    cfg = BridgeConfig(encoder=encoder, llm=llm, out="unused")
    model, processor, tower = build(cfg)
    data1, data2 = datasets(cfg, tower.image_size)
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    batches = {1: collate([data1[i] for i in range(batch)]), 2: collate([data2[i] for i in range(batch)])}
    loss_fn = AnswerLoss()
    model.train()
    times: dict[tuple[int, bool], list[float]] = {(s, p == "bf16"): [] for s in (1, 2) for p in precisions}
    optimizers = {}  # one per stage, kept across rounds: its state is allocated in the warm-up round, not timed
    for r in range(repeats + 1):  # round 0 warms up every variant
        for stage, bf16 in times:
            groups = trainable_groups(model, stage=stage)  # sets requires_grad for this stage
            if stage not in optimizers:
                optimizers[stage] = torch.optim.AdamW([p for ps in groups.values() for p in ps], lr=1e-6)
            opt = optimizers[stage]
            for _ in range(steps):
                seconds = timed_step(model, opt, loss_fn, batches[stage], bf16)
                if r:
                    times[(stage, bf16)].append(seconds)
            if progress:
                print(f"round {r}/{repeats}: stage {stage} {'bf16' if bf16 else 'fp32'} done", file=sys.stderr)
    flops = {}
    for stage in (1, 2):
        groups = trainable_groups(model, stage=stage)
        flops[stage] = step_flops(model, optimizers[stage], loss_fn, batches[stage])
    llm = model.config.text_config
    rows = []
    for (stage, bf16), ts in times.items():
        tokens = int(batches[stage]["input_ids"].numel())  # padded: what the step multiplies
        limit = matmul_rate(tokens, llm.hidden_size, llm.intermediate_size, torch.bfloat16 if bf16 else torch.float32)
        achieved = flops[stage] / statistics.median(ts) / 1e12
        rows.append({"stage": stage, "precision": "bf16" if bf16 else "fp32", "median_s": statistics.median(ts),
                     "min_s": min(ts), "n": len(ts), "tokens": int(batches[stage]["attention_mask"].sum()),
                     "tflop": flops[stage] / 1e12, "tflops": achieved, "matmul_tflops": limit,
                     "of_matmul": achieved / limit})
    for row in rows:
        fp32 = next((x for x in rows if x["stage"] == row["stage"] and x["precision"] == "fp32"), None)
        row["ratio_to_fp32"] = row["median_s"] / fp32["median_s"] if fp32 else float("nan")
    return rows


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"# LLaVA step time: {meta['llm']} + {meta['encoder']}, batch {meta['batch']}",
             "", f"`{meta['command']}` on {meta['machine']} (CPU flags: {meta['flags']}, {meta['threads']} threads).",
             "", "| stage | precision | median s/step | min s/step | steps | tokens/batch | ratio to fp32 | TFLOP/step "
                 "| achieved TFLOP/s | matmul TFLOP/s (same precision, step's MLP shape) | of matmul |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['precision']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['n']} | {r['tokens']} "
              f"| {r['ratio_to_fp32']:.2f} | {r['tflop']:.3f} | {r['tflops']:.3f} | {r['matmul_tflops']:.3f} "
              f"| {100 * r['of_matmul']:.0f}% |" for r in rows]
    lines += ["", "Achieved: the step's matmul FLOPs (torch's counter, forward + backward) over its median time. "
              "Matmul: torch's own rate on [padded tokens, hidden] @ [hidden, intermediate] in that precision, in the "
              "same process: the limit the step is measured against."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("ov2 bench bridge", __doc__, "bridge_step_cpu", "variant")
    parser.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both",
                        help="which precisions to time (default both; on an AVX2-only CPU a bf16 step is ~30x slower)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    prog = "ov2 bench bridge"
    if min(args.batch, args.steps, args.repeats) < 1:
        return fail(prog, "--batch, --steps and --repeats must be at least 1")
    try:
        check_writable(str(out.parent), out.name, args.force, ("json", "md"))
    except OutputExists as err:
        return fail(prog, err)
    import torch

    from ov2.config import ConfigError

    try:
        rows = measure(args.encoder, args.llm, args.batch, args.steps, args.repeats,
                       precisions=("fp32", "bf16") if args.precision == "both" else (args.precision,))
    except (ConfigError, FileNotFoundError) as err:
        return fail(prog, err)
    meta = {"encoder": args.encoder, "llm": args.llm, "batch": args.batch, "flags": cpu_flags(),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "command": "ov2 bench bridge " + " ".join(argv or sys.argv[1:])}
    text = table(rows, meta)
    print(text)
    write_results(str(out.parent), out.name, rows, text, args.force, formats=("json", "md"), meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
