"""Command lines of the encoder package (`ov2 train|data|caption`, or `python -m encoder ...`).

Exit codes (every sub-command): 0 ok; 2 bad usage, config or input (one line on stderr, no traceback);
1 a failure while running; 130 interrupted (one line saying how to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ov2.cli import ArgumentParser, fail, os_error

MAX_SYNTH_SIZE = 4096  # `ov2 data` image side: a 100000-px scene would need ~30 GB of memory

TRAIN_EPILOG = """
overrides: any config key as --key=value, by dotted path or by a unique leaf name, e.g.
  --model.keep_ratio=0.25  --stages.0.steps=50  --stages.1.image_size=64  --bf16=true  --seed=3
examples:
  ov2 train --preset ov2-tiny --out runs/demo                      # CPU demo on built-in scenes (~10 min)
  ov2 train --preset ov2-micro --out runs/smoke                    # seconds: a smoke run
  ov2 train --out runs/demo --resume                               # continue exactly where it stopped
  ov2 train --preset ov2-tiny --data.source=data/synth --out runs/shards   # webdataset shards
  torchrun --nproc_per_node=2 -m encoder train --preset clip-tiny --out runs/clip
a resume may change only bookkeeping (log_every, ckpt_every, keep_last, data.workers, ...) and add steps.
presets: {presets}
"""


def train_main(argv: list[str]) -> int:
    from encoder.config import PRESETS, ConfigError, apply_overrides, apply_yaml, get_preset, validate
    from ov2.runfolder import RunLocked

    parser = argparse.ArgumentParser(
        prog="ov2 train", description="Pretrain a vision encoder (OpenVision 2, OpenVision v1 or CLIP preset).",
        epilog=TRAIN_EPILOG.format(presets=", ".join(PRESETS)), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default=None, help="named preset (default ov2-tiny; on --resume, the run's own)")
    parser.add_argument("--config", default=None, help="YAML file of overrides (applied before --key=value)")
    parser.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints/")
    parser.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    args, rest = parser.parse_known_args(argv)
    prog, trainer = "ov2 train", None
    try:
        cfg = _resume_base(args.out) if args.resume and args.preset is None else None
        cfg = cfg or get_preset(args.preset or "ov2-tiny")
        if args.config:
            cfg = apply_yaml(cfg, args.config)
        cfg = validate(apply_overrides(cfg, rest))
        from encoder.train import Trainer

        trainer = Trainer(cfg, args.out, resume=args.resume)
        record = trainer.run()
    except KeyboardInterrupt:
        step = trainer.state["step"] if trainer is not None else 0
        print(f"{prog}: interrupted at step {step}; resume with: ov2 train --out {args.out} --resume",
              file=sys.stderr)
        return 130
    except (ConfigError, RunLocked, FileNotFoundError, NotADirectoryError) as err:
        return fail(prog, err)
    except OSError as err:
        return os_error(prog, err)
    except Exception as err:
        from encoder.data.loader import DataError
        from encoder.train import TrainingStopped
        from ov2.checkpoint import CheckpointError

        if isinstance(err, (DataError, TrainingStopped, CheckpointError)):
            return fail(prog, err, 1)
        if "No space left on device" in str(err) or _disk_full(args.out):  # torch.save / safetensors lose errno
            return fail(prog, f"no space left on the device ({args.out}): {str(err).splitlines()[0][:200]}", 1)
        if isinstance(err, ValueError):
            return fail(prog, err)
        raise
    if record:
        print(f"done: step {record['step']} loss {record['loss']:.4f} -> {args.out}")
    return 0


def _disk_full(out: str) -> bool:
    import shutil

    try:
        return shutil.disk_usage(out).free < 1 << 20
    except OSError:
        return False


def _resume_base(out: str):
    """The config a run was started with: RUN/config.yaml, else its newest checkpoint's copy."""
    from encoder.checkpoint import latest_checkpoint, load_config

    for path in (os.path.join(out, "config.yaml"), os.path.join(latest_checkpoint(out) or out, "config.yaml")):
        if os.path.isfile(path):
            return load_config(path)
    return None


def data_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="ov2 data", description="Training data tools.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{synth,samples}")
    synth = sub.add_parser("synth", help="write built-in captioned scenes as webdataset shards",
                           description="Write built-in captioned scenes (shapes, words, charts) as webdataset "
                                       "shards: KEY.png + KEY.json ({caption, alt, kind}) + KEY.txt.")
    synth.add_argument("--n", type=int, default=20_000, help="number of scenes")
    synth.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar (must be empty or new)")
    synth.add_argument("--seed", type=int, default=0, help="stream seed (held-out sets use another seed)")
    synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--kinds", default="shapes,text,chart", help="comma-separated scene kinds")
    synth.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    synth.add_argument("--force", action="store_true",
                       help="write into a non-empty folder, first removing the shard-*.tar files in it")
    samples = sub.add_parser("samples", help="write a few built-in scenes as PNG files (held-out seed by default)")
    samples.add_argument("--n", type=int, default=4)
    samples.add_argument("--out", required=True)
    samples.add_argument("--seed", type=int, default=999)
    samples.add_argument("--size", type=int, default=64)
    samples.add_argument("--force", action="store_true", help="write into a non-empty folder (replacing scene_*.png)")
    args = parser.parse_args(argv)
    prog = f"ov2 data {args.cmd}"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return fail(prog, f"--out {args.out} is a file, not a folder")
    if args.n <= 0:
        return fail(prog, f"--n must be positive, got {args.n}")
    if not 0 < args.size <= MAX_SYNTH_SIZE:
        return fail(prog, f"--size must be between 1 and {MAX_SYNTH_SIZE} pixels, got {args.size}")
    if args.cmd == "samples" and os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        return fail(prog, f"{args.out} is not empty: choose a new folder, or pass --force to write scene_*.png there")
    try:
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
        paths = write_synth_shards(args.out, args.n, args.seed, args.size, kinds, args.per_shard, force=args.force)
    except ValueError as err:
        return fail(prog, err)
    except OSError as err:
        return os_error(prog, err)
    print(f"wrote {args.n} samples in {len(paths)} shards to {args.out}")
    return 0


def caption_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="ov2 caption", description="Greedy captions from an OpenVision 2 checkpoint.")
    parser.add_argument("--ckpt", required=True, help="run folder (newest intact checkpoint) or checkpoint folder")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--max-len", type=int, default=48, help="maximum caption tokens")
    parser.add_argument("--size", type=int, default=None, help="input resolution (default: the last stage's)")
    args = parser.parse_args(argv)
    prog = "ov2 caption"
    import torch
    from PIL import Image

    from encoder.checkpoint import load_model
    from encoder.config import ConfigError
    from encoder.data.transforms import eval_transform
    from encoder.tokenizer import get_tokenizer

    if args.max_len < 1:
        return fail(prog, f"--max-len must be at least 1, got {args.max_len}")
    try:
        model, cfg = load_model(args.ckpt)
    except (FileNotFoundError, NotADirectoryError, ConfigError) as err:
        if os.path.isfile(os.path.join(args.ckpt, "config.json")):
            return fail(prog, f"--ckpt {args.ckpt} is a transformers folder (config.json), not one of our run or "
                              "checkpoint folders (config.yaml)")
        return fail(prog, err)
    if not hasattr(model, "generate"):
        return fail(prog, f"a {cfg.model.family} model has no caption decoder to generate with")
    size = cfg.stages[-1].image_size if args.size is None else args.size
    if not 0 < size <= MAX_SYNTH_SIZE or size % cfg.model.vit.patch_size:
        return fail(prog, f"--size {size} must be a multiple of the patch size {cfg.model.vit.patch_size} between "
                          f"1 and {MAX_SYNTH_SIZE}")
    transform = eval_transform(size)
    images = []
    for path in args.images:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    images.append(transform(image))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return fail(prog, f"{path}: image too large (more than {Image.MAX_IMAGE_PIXELS} pixels)")
        except (OSError, ValueError, SyntaxError) as err:
            return fail(prog, f"cannot read image {path}: {err}")
    tokenizer = get_tokenizer()
    for path, ids in zip(args.images, model.generate(torch.stack(images), args.max_len)):
        print(f"{path}\t{tokenizer.decode(ids)}")
    return 0
