"""Command lines of the encoder package (`ov2 train|data|caption`, or `python -m encoder ...`)."""

from __future__ import annotations

import argparse
import os
import sys

TRAIN_EPILOG = """
overrides: any config key as --key=value, by dotted path or by a unique leaf name, e.g.
  --model.keep_ratio=0.25  --stages.0.steps=50  --stages.1.image_size=64  --bf16=true  --seed=3
examples:
  ov2 train --preset ov2-tiny --out runs/demo                      # CPU demo on built-in scenes (~10 min)
  ov2 train --preset ov2-tiny --out runs/smoke --stages.0.steps=20 --stages.1.steps=10
  ov2 train --out runs/demo --resume                               # continue exactly where it stopped
  ov2 train --preset ov2-tiny --data.source=data/synth --out runs/shards   # webdataset shards
  torchrun --nproc_per_node=2 -m encoder train --preset clip-tiny --out runs/clip
presets: {presets}
"""


def _fail(prog: str, message: str, code: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def train_main(argv: list[str]) -> int:
    from encoder.config import PRESETS, ConfigError, apply_overrides, apply_yaml, get_preset, validate

    parser = argparse.ArgumentParser(
        prog="ov2 train", description="Pretrain a vision encoder (OpenVision 2, OpenVision v1 or CLIP preset).",
        epilog=TRAIN_EPILOG.format(presets=", ".join(PRESETS)), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default=None, help="named preset (default ov2-tiny; on --resume, the run's own)")
    parser.add_argument("--config", default=None, help="YAML file of overrides (applied before --key=value)")
    parser.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints/")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    args, rest = parser.parse_known_args(argv)
    try:
        from encoder.checkpoint import load_config

        saved = os.path.join(args.out, "config.yaml")
        if args.resume and os.path.exists(saved) and args.preset is None:
            cfg = load_config(saved)
        else:
            cfg = get_preset(args.preset or "ov2-tiny")
        if args.config:
            cfg = apply_yaml(cfg, args.config)
        cfg = validate(apply_overrides(cfg, rest))
        from encoder.train import train

        record = train(cfg, args.out, resume=args.resume)
    except ConfigError as err:
        return _fail("ov2 train", str(err))
    except Exception as err:
        from encoder.data.loader import DataError
        from encoder.train import TrainingStopped

        if isinstance(err, (DataError, TrainingStopped, FileNotFoundError)):
            return _fail("ov2 train", str(err), 1)
        raise
    if record:
        print(f"done: step {record['step']} loss {record['loss']:.4f} -> {args.out}")
    return 0


def data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ov2 data", description="Training data tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    synth = sub.add_parser("synth", help="write built-in captioned scenes as webdataset shards",
                           description="Write built-in captioned scenes (shapes, words, charts) as webdataset "
                                       "shards: KEY.png + KEY.json ({caption, alt, kind}) + KEY.txt.")
    synth.add_argument("--n", type=int, default=20_000, help="number of scenes")
    synth.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar")
    synth.add_argument("--seed", type=int, default=0, help="stream seed (held-out sets use another seed)")
    synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--kinds", default="shapes,text,chart", help="comma-separated scene kinds")
    synth.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    samples = sub.add_parser("samples", help="write a few built-in scenes as PNG files (held-out seed by default)")
    samples.add_argument("--n", type=int, default=4)
    samples.add_argument("--out", required=True)
    samples.add_argument("--seed", type=int, default=999)
    samples.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.cmd == "samples":
        from encoder.data.synth import make_scene

        os.makedirs(args.out, exist_ok=True)
        for i in range(args.n):
            scene = make_scene(args.seed, i, args.size)
            scene.image.save(os.path.join(args.out, f"scene_{i:03d}.png"))
            print(f"scene_{i:03d}.png\t{scene.caption}")
        return 0
    from encoder.data.shards import write_synth_shards

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    try:
        paths = write_synth_shards(args.out, args.n, args.seed, args.size, kinds, args.per_shard)
    except ValueError as err:
        return _fail("ov2 data synth", str(err))
    print(f"wrote {args.n} samples in {len(paths)} shards to {args.out}")
    return 0


def caption_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ov2 caption", description="Greedy captions from an OpenVision 2 checkpoint.")
    parser.add_argument("--ckpt", required=True, help="run folder (latest checkpoint) or checkpoint folder")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--max-len", type=int, default=48, help="maximum caption tokens")
    parser.add_argument("--size", type=int, default=None, help="input resolution (default: the last stage's)")
    args = parser.parse_args(argv)
    import torch
    from PIL import Image

    from encoder.checkpoint import load_model
    from encoder.data.transforms import eval_transform
    from encoder.tokenizer import get_tokenizer

    try:
        model, cfg = load_model(args.ckpt)
    except FileNotFoundError as err:
        return _fail("ov2 caption", str(err))
    if not hasattr(model, "generate"):
        return _fail("ov2 caption", f"a {cfg.model.family} model has no caption decoder to generate with")
    transform = eval_transform(args.size or cfg.stages[-1].image_size)
    try:
        pixels = torch.stack([transform(Image.open(path)) for path in args.images])
    except OSError as err:
        return _fail("ov2 caption", f"cannot read image: {err}")
    tokenizer = get_tokenizer()
    for path, ids in zip(args.images, model.generate(pixels, args.max_len)):
        print(f"{path}\t{tokenizer.decode(ids)}")
    return 0


COMMANDS = {"train": train_main, "data": data_main, "caption": caption_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m encoder {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
