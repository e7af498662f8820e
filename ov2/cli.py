"""The `ov2` console script: a thin dispatcher over each package's own `main(argv)`.

    ov2 run benchmarks/runner/experiments/default.yaml    the whole job: train encoders, bridge them, evaluate, report
    ov2 train --preset ov2-tiny --out runs/demo    pretrain an encoder (OpenVision 2 / OpenVision / CLIP)
    ov2 bridge train --encoder runs/demo --out runs/llava    LLaVA stage 1 + 2 and a standard LLaVA export
    ov2 eval runs/llava/model --tasks ov2_gqa --out runs/eval    lmms-eval on a LLaVA folder
    ov2 report runs/default                        the HTML report of a run folder

Each sub-command has its own --help. Sub-commands import their package only when called.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help); the function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("encoder.cli:data_main", "make or inspect training data (built-in synthetic scenes -> shards)"),
    "train": ("encoder.cli:train_main", "pretrain an encoder from a preset (ov2-*, ov1-*, clip-*)"),
    "caption": ("encoder.cli:caption_main", "greedy captions of images with a trained OpenVision 2 checkpoint"),
    "eval-encoder": ("encoder.evaluate:main", "linear-probe and zero-shot accuracy on Fashion-MNIST"),
    "export-encoder": ("bridge.cli:export_encoder_main", "write an encoder as a transformers ViTModel/CLIPVisionModel"),
    "bridge": ("bridge.cli:main", "LLaVA-style model: train stage 1/2, export, chat"),
    "bench": ("benchmarks.bench.cli:bench_main", "efficiency and kernel benchmarks"),
    "eval": ("benchmarks.evals.evaluate:main", "evaluate a LLaVA folder with lmms-eval (built-in suite or lmms-eval tasks)"),
    "run": ("benchmarks.runner.cli:main", "the whole pipeline: train -> bridge -> evaluate -> report"),
    "report": ("reports.cli:main", "build the HTML report from a run folder"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [__doc__.strip(), "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ov2: unknown command {name!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):
            raise  # a missing third-party dependency, not a missing part of ours
        module = None
    func = getattr(module, func_name, None)
    if func is None:
        print(f"ov2 {name}: not built yet", file=sys.stderr)
        return 2
    return int(func(rest) or 0)
