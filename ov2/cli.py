"""The `ov2` console script: one table of sub-commands, one error path for all of them.

    ov2 run benchmarks/runner/experiments/default.yaml    the whole job: train, bridge, evaluate, report
    ov2 train --preset ov2-tiny --out runs/demo           pretrain an encoder (OpenVision 2 / OpenVision / CLIP)
    ov2 bridge train --encoder runs/demo --out runs/llava LLaVA stage 1 + 2 and a standard LLaVA export
    ov2 eval runs/llava/model --tasks ov2_gqa --out runs/eval    lmms-eval on a LLaVA folder
    ov2 report runs/default                               the HTML report of a run folder
    ov2 bench kernels                                     a benchmark (ov2 bench --help lists them)

Each sub-command has its own --help. A sub-command's module is imported only when it is called, so this file
imports no stage package. Exit codes (every command): 0 ok; 2 bad usage, config or input (one line on stderr, no
traceback); 1 a failure while running; 130 interrupted (one line saying how to resume).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

# name -> ("module:function", one-line help); the function takes argv (list[str]) and returns an exit code.
# A name "group sub" is reached as `ov2 group sub ...`; `ov2 group --help` lists the group.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("benchmarks.runner.cli:main", "the whole pipeline: train -> bridge -> evaluate -> report"),
    "data": ("encoder.cli:data_main", "make or inspect training data (built-in synthetic scenes -> shards)"),
    "train": ("encoder.cli:train_main", "pretrain an encoder from a preset (ov2-*, ov1-*, clip-*)"),
    "caption": ("encoder.cli:caption_main", "greedy captions of images with a trained OpenVision 2 checkpoint"),
    "eval-encoder": ("encoder.evaluate:main", "linear-probe and zero-shot accuracy on Fashion-MNIST"),
    "export-encoder": ("bridge.cli:export_encoder_main", "write an encoder as a transformers ViTModel/CLIPVisionModel"),
    "bridge": ("bridge.cli:main", "LLaVA-style model: train stage 1/2, export, chat"),
    "eval": ("benchmarks.evals.evaluate:main", "evaluate a LLaVA folder with lmms-eval (built-in suite or its tasks)"),
    "report": ("reports.cli:main", "build the HTML report from a run folder"),
    "bench kernels": ("benchmarks.bench.kernels:main", "fused linear CE vs eager, torch.compile, CCE"),
    "bench baselines": ("benchmarks.bench.baselines:main", "ov2 vs ov1 vs clip (micro, equal budget): time, memory, "
                                                          "FMNIST accuracy"),
    "bench flops": ("benchmarks.bench.flops:main", "forward GFLOPs per image of OV2 / OV1 / CLIP at the paper presets"),
    "bench train": ("benchmarks.bench.train_cost:main", "training cost OV2 vs OV1 vs CLIP: step time, peak memory, "
                                                       "batch headroom"),
    "bench bridge": ("benchmarks.bench.bridge_step:main", "LLaVA stage 1 / stage 2 step time, float32 vs bf16"),
    "bench data": ("benchmarks.bench.data_stream:main", "shard streaming: start-up, memory and samples/s at two set "
                                                        "sizes; images/s per worker at 84 px"),
    "bench image-use": ("benchmarks.bench.image_use:main", "does a bridged model look at the image? option likelihood "
                                                           "with its own vs a shuffled image"),
    "bench bridge-options": ("benchmarks.bench.bridge_options:main", "bridge options on a CPU budget (full LLM vs "
                             "LoRA, tower share): step time, held-in accuracy"),
    "bench memory": ("benchmarks.bench.bridge_memory:main", "LLaVA stage 2 at 7B under FSDP2: peak memory per rank "
                     "counted on the meta device"),
}


def fail(prog: str, message, code: int = 2) -> int:
    """One line on stderr; the exit code (2: bad usage, config or input; 1: a failure while running)."""
    line = (str(message).strip().splitlines() or ["error"])[0]
    print(f"{prog}: error: {line}", file=sys.stderr)
    return code


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line (`PROG: error: ...`, exit 2) instead of usage text plus the error."""

    def error(self, message: str):
        sys.exit(fail(self.prog, message))


def doc_parser(prog: str, doc: str) -> ArgumentParser:
    """A command's parser whose --help is its module docstring: the first paragraph as the description, the rest
    (usage lines, details) as the epilog, line breaks kept."""
    paragraphs = doc.split("\n\n")
    return ArgumentParser(prog=prog, description=paragraphs[0], epilog="\n\n".join(paragraphs[1:]),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def positive(kind=int, zero: bool = False):
    """An argparse type: a finite number > 0 (>= 0 with `zero`), else one line naming the value."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value == value or value in (float("inf"), float("-inf")) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"expected a {'non-negative' if zero else 'positive'} number, "
                                             f"got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def os_error(prog: str, err: OSError) -> int:
    """An OSError as one line: a full disk or a folder we may not write is the user's to fix (2), others 1."""
    if err.errno == errno.ENOSPC:
        return fail(prog, f"no space left on the device ({err.filename or 'writing the run folder'})")
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return fail(prog, f"cannot write {err.filename}: {err.strerror}")
    return fail(prog, f"{err.strerror or err}: {err.filename}" if err.filename else str(err), 1)


def _usage(group: str = "") -> str:
    names = [n for n in COMMANDS if (n.startswith(group + " ") if group else " " not in n)]
    if not group:
        names.insert(names.index("report") + 1, "bench")
    width = max(len(n.removeprefix(group).strip()) for n in names)
    head = __doc__.strip() if not group else f"usage: ov2 {group} NAME [options]   (NAME --help for its options)"
    lines = [head, "", "commands:"]
    for name in names:
        help_ = COMMANDS[name][1] if name in COMMANDS else "efficiency and kernel benchmarks (ov2 bench --help)"
        lines.append(f"  {name.removeprefix(group).strip():<{width}}  {help_}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    groups = {n.split()[0] for n in COMMANDS if " " in n}
    if name in groups:
        if not rest or rest[0] in ("-h", "--help", "help"):
            print(_usage(name))
            return 0
        choices = [n.split()[1] for n in COMMANDS if n.startswith(name + " ")]
        if rest[0] not in choices:
            return fail(f"ov2 {name}", f"unknown command {rest[0]!r}; choose from: {', '.join(choices)}")
        name, rest = f"{name} {rest[0]}", rest[1:]
    if name not in COMMANDS:
        top = dict.fromkeys(n.split()[0] for n in COMMANDS)
        return fail("ov2", f"unknown command {name!r}; choose from: {', '.join(top)}")
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)
