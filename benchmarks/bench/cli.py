"""`ov2 bench ...`: efficiency and kernel benchmarks (each prints a table and saves it under benchmarks/results/)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "kernels": ("benchmarks.bench.kernels", "fused linear CE vs eager, torch.compile, F.linear_cross_entropy, CCE"),
    "baselines": ("benchmarks.bench.baselines", "ov2 vs ov1 vs clip (micro, equal budget): time, memory, FMNIST accuracy"),
    "flops": ("benchmarks.bench.flops", "forward GFLOPs per image of OV2 / OV1 / CLIP at paper presets vs the paper"),
    "train": ("benchmarks.bench.train_cost", "training cost OV2 vs OV1 vs CLIP: step time, peak memory, batch headroom"),
    "bridge": ("benchmarks.bench.bridge_step", "LLaVA stage 1 / stage 2 step time, float32 vs bf16 autocast"),
}


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ov2 bench NAME [options]   (NAME --help for its options)\n\nbenchmarks:")
        for name, (_, help_) in BENCHMARKS.items():
            print(f"  {name:<10} {help_}")
        return 0
    if argv[0] not in BENCHMARKS:
        print(f"ov2 bench: unknown benchmark {argv[0]!r}; choose from: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(BENCHMARKS[argv[0]][0])
    except ModuleNotFoundError as err:
        if err.name != BENCHMARKS[argv[0]][0]:
            raise
        print(f"ov2 bench {argv[0]}: not built yet", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]) or 0)
