"""Training configuration: dataclasses, named presets, `--key=value` and YAML overrides, validation.

    cfg = get_preset("ov2-tiny")
    cfg = apply_overrides(cfg, ["--model.keep_ratio=0.25", "--stages.0.steps=50", "--seed=3"])
    cfg = apply_yaml(cfg, "exp.yaml")      # nested mapping with the same keys
    validate(cfg)                          # raises ConfigError with one clear line

A key is a dotted path (`model.vit.width`, `stages.1.lr`) or a leaf name that is unique in the tree
(`keep_ratio`, `seed`). Presets differ only in numbers and `model.family` ("ov2" | "ov1" | "clip").
Each preset has a two-stage resolution schedule: low-resolution pretraining, then high-resolution
finetuning that starts from stage 1's weights (sin-cos positions need no interpolation).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from encoder.decoder import DecoderConfig
from encoder.vit import ViTConfig


class ConfigError(ValueError):
    """A bad configuration; the CLI prints it as one line and exits 2."""


@dataclass
class TextConfig:
    """Text encoder of the contrastive baselines (bidirectional, pooled at the last token)."""

    width: int = 256
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 1024
    context: int = 80


@dataclass
class ModelConfig:
    family: str = "ov2"  # "ov2" (caption only) | "ov1" (contrastive + caption) | "clip" (contrastive)
    vit: ViTConfig = field(default_factory=ViTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    keep_ratio: float = 0.35
    keep_at_eval: bool = False
    caption_weight: float = 2.0
    embed_dim: int = 256  # contrastive embedding width (ov1, clip)
    num_queries: int = 128  # ov1 parallel caption queries


@dataclass
class StageConfig:
    image_size: int = 64
    steps: int = 100
    batch_size: int = 32  # per process and micro-step; global batch = batch_size x grad_accum x world size
    lr: float = 1e-3
    warmup_steps: int = 10


@dataclass
class DataConfig:
    source: str = "synth"  # "synth" (generated on the fly) | webdataset shards (dir, glob, list) | image folder
    captions: str = ""  # captions file (JSONL / CSV / parquet) for an image-folder source
    synth_seed: int = 0  # the held-out synthetic streams use other seeds
    synth_size: int = 50_000  # distinct synthetic scenes in one epoch
    kinds: str = "shapes,text,chart"
    synth_max_groups: int = 3  # object groups per shapes scene (1 = single-object scenes)
    fashion_mnist: float = 0.0  # fraction of Fashion-MNIST train images mixed in (needs dataset-fashion-mnist)
    crop_min_scale: float = 0.4  # random resized crop scale range is (crop_min_scale, 1)
    color_jitter: float = 0.4  # brightness / contrast / saturation strength
    grayscale_p: float = 0.2  # probability of a grayscale image
    max_bad_fraction: float = 0.05  # stop when more than this fraction of samples read so far was unusable
    workers: int = 1  # DataLoader worker processes per rank


@dataclass
class TrainConfig:
    preset: str = "ov2-tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    grad_accum: int = 1
    weight_decay: float = 0.2  # decoupled, on weight matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    bf16: bool = False  # bf16 autocast
    seed: int = 0
    loss_impl: str = "auto"  # linear cross-entropy implementation: auto | torch | triton | eager
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 3
    nan_patience: int = 5  # stop after this many non-finite steps in a row
    distributed: str = "ddp"  # "ddp" | "fsdp" (FSDP2 fully_shard), used under torchrun

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


# --- presets -------------------------------------------------------------------------------------------

VITS = {  # width, depth, mlp, heads (FACTS.md)
    "ti": (192, 12, 768, 3), "s": (384, 12, 1536, 6), "b": (768, 12, 3072, 12), "l": (1024, 24, 4096, 16),
    "so400m": (1152, 27, 4304, 16), "h": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16),
}
DECODERS = {  # decoder paired with each encoder size (FACTS.md)
    "b": (512, 12, 2048, 8), "l": (768, 12, 3072, 12), "so400m": (1152, 27, 4304, 16),
    "h": (1024, 24, 4096, 16), "g": (1024, 24, 4096, 16),
}
# The released recipe: stage 1 at low resolution (12.8B samples, batch 32k), stage 2 at high (1.02B, 16k).
PAPER_STAGES = dict(batch=(32_768, 16_384), steps=(390_625, 62_256), lr=(1.024e-3, 2.56e-5), warmup=(1_563, 1_563))


def _paper_preset(size: str, patch: int, low: int, high: int) -> TrainConfig:
    width, depth, mlp, heads = VITS[size]
    d_width, d_depth, d_mlp, d_heads = DECODERS[size]
    model = ModelConfig(
        vit=ViTConfig(image_size=high, patch_size=patch, width=width, depth=depth, heads=heads, mlp_dim=mlp),
        decoder=DecoderConfig(width=d_width, depth=d_depth, heads=d_heads, mlp_dim=d_mlp),
        # v1 / CLIP text encoder: as wide and deep as the decoder (FACTS.md cost arithmetic), context 80
        text=TextConfig(width=d_width, depth=d_depth, heads=d_heads, mlp_dim=d_mlp),
        embed_dim=d_width,
    )
    stages = [
        StageConfig(image_size=res, steps=PAPER_STAGES["steps"][i], batch_size=PAPER_STAGES["batch"][i],
                    lr=PAPER_STAGES["lr"][i], warmup_steps=PAPER_STAGES["warmup"][i])
        for i, res in enumerate((low, high))
    ]
    return TrainConfig(model=model, stages=stages)


def _tiny() -> TrainConfig:
    """CPU demo: 64 px, patch 8 (64 patches), ViT 192 x 6, decoder 256 x 2; 32 px then 64 px."""
    model = ModelConfig(
        vit=ViTConfig(image_size=64, patch_size=8, width=192, depth=6, heads=3, mlp_dim=768),
        decoder=DecoderConfig(width=256, depth=2, heads=4, mlp_dim=1024, max_len=48),
        text=TextConfig(width=256, depth=2, heads=4, mlp_dim=1024, context=48),
        embed_dim=256,
        num_queries=48,
    )
    stages = [
        StageConfig(image_size=32, steps=400, batch_size=32, lr=2e-3, warmup_steps=40),
        StageConfig(image_size=64, steps=200, batch_size=32, lr=5e-4, warmup_steps=20),
    ]
    # built-in scenes name every object, its colour and position: augment gently so captions stay true
    data = DataConfig(crop_min_scale=0.85, color_jitter=0.1, grayscale_p=0.0)
    return TrainConfig(model=model, data=data, stages=stages, weight_decay=0.05, ckpt_every=100)


_BASES = {
    "tiny": _tiny,
    "b16": lambda: _paper_preset("b", 16, 112, 224),
    "l14": lambda: _paper_preset("l", 14, 84, 224),
    # 378 = 27 x 14: the same 27 x 27 grid that a 384 px input gives with patch 14 (the conv drops 6 px)
    "so400m14": lambda: _paper_preset("so400m", 14, 84, 378),
    "h14": lambda: _paper_preset("h", 14, 84, 224),
    "g14": lambda: _paper_preset("g", 14, 84, 224),
}
FAMILIES = ("ov2", "ov1", "clip")
PRESETS = [f"{family}-{size}" for family in FAMILIES for size in _BASES]


def get_preset(name: str) -> TrainConfig:
    family, _, size = name.partition("-")
    if family not in FAMILIES or size not in _BASES:
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    cfg = _BASES[size]()
    cfg.preset = name
    cfg.model.family = family
    return cfg


# --- overrides -----------------------------------------------------------------------------------------


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} for every scalar in the config tree (list items as `.0`, `.1`, ...)."""
    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, list):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return {prefix: obj}
    out = {}
    for name, value in items:
        out.update(_leaves(value, f"{prefix}.{name}" if prefix else name))
    return out


def _coerce(value: Any, like: Any, key: str) -> Any:
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    try:
        if isinstance(like, int):
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if isinstance(like, float):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {type(like).__name__}, got {value!r}") from None
    return str(value)


def _resolve(cfg: TrainConfig, key: str) -> str:
    leaves = _leaves(cfg)
    if key in leaves:
        return key
    matches = [path for path in leaves if path.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"ambiguous key {key!r}: say one of {', '.join(matches)}")
    raise ConfigError(f"unknown config key {key!r}")


def set_value(cfg: TrainConfig, key: str, value: Any) -> None:
    path = _resolve(cfg, key)
    *parents, last = path.split(".")
    obj = cfg
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    old = obj[int(last)] if isinstance(obj, list) else getattr(obj, last)
    new = _coerce(value, old, path)
    if isinstance(obj, list):
        obj[int(last)] = new
    else:
        setattr(obj, last, new)


def apply_overrides(cfg: TrainConfig, args: list[str]) -> TrainConfig:
    cfg = copy.deepcopy(cfg)
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        set_value(cfg, key.replace("-", "_"), value)
    return cfg


def _merge(cfg: TrainConfig, tree: dict, prefix: str = "") -> None:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if path == "stages" and isinstance(value, list):
            template = cfg.stages[-1]
            cfg.stages = [copy.deepcopy(cfg.stages[i] if i < len(cfg.stages) else template) for i in range(len(value))]
            for i, stage in enumerate(value):
                _merge(cfg, stage, f"stages.{i}.")
        elif isinstance(value, dict):
            _merge(cfg, value, f"{path}.")
        else:
            set_value(cfg, path, value)


def apply_yaml(cfg: TrainConfig, path: str) -> TrainConfig:
    try:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    cfg = copy.deepcopy(cfg)
    if "preset" in tree:
        cfg = get_preset(tree.pop("preset"))
    _merge(cfg, tree)
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict) -> TrainConfig:
    cfg = get_preset(tree.get("preset", "ov2-tiny"))
    _merge(cfg, {k: v for k, v in tree.items() if k != "preset"})
    return cfg


def validate(cfg: TrainConfig) -> TrainConfig:
    m = cfg.model
    if m.family not in FAMILIES:
        raise ConfigError(f"model.family must be one of {FAMILIES}, got {m.family!r}")
    if not 0.0 < m.keep_ratio <= 1.0:
        raise ConfigError(f"model.keep_ratio must be in (0, 1], got {m.keep_ratio}")
    for i, stage in enumerate(cfg.stages):
        if stage.image_size % m.vit.patch_size:
            raise ConfigError(
                f"stages.{i}.image_size {stage.image_size} is not divisible by the patch size {m.vit.patch_size}"
            )
        if stage.steps <= 0 or stage.batch_size <= 0 or stage.lr <= 0 or stage.warmup_steps < 0:
            raise ConfigError(f"stages.{i}: steps, batch_size and lr must be positive, warmup_steps >= 0")
    if m.vit.image_size % m.vit.patch_size:
        raise ConfigError(
            f"model.vit.image_size {m.vit.image_size} is not divisible by the patch size {m.vit.patch_size}"
        )
    for name, width, heads in (("vit", m.vit.width, m.vit.heads), ("decoder", m.decoder.width, m.decoder.heads),
                               ("text", m.text.width, m.text.heads)):
        if width % heads:
            raise ConfigError(f"model.{name}.width {width} is not divisible by its {heads} heads")
    if m.vit.width % 4:
        raise ConfigError(f"model.vit.width {m.vit.width} must be divisible by 4 (2-D sin-cos positions)")
    if m.vit.layout not in ("openvision", "clip"):
        raise ConfigError(f"model.vit.layout must be 'openvision' or 'clip', got {m.vit.layout!r}")
    if m.decoder.mask not in ("prefix", "causal"):
        raise ConfigError(f"model.decoder.mask must be 'prefix' or 'causal', got {m.decoder.mask!r}")
    if cfg.loss_impl not in ("auto", "torch", "triton", "eager"):
        raise ConfigError(f"loss_impl must be auto, torch, triton or eager, got {cfg.loss_impl!r}")
    if cfg.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"distributed must be 'ddp' or 'fsdp', got {cfg.distributed!r}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if not 0.0 <= cfg.data.fashion_mnist < 1.0:
        raise ConfigError(f"data.fashion_mnist must be in [0, 1), got {cfg.data.fashion_mnist}")
    if cfg.grad_accum < 1 or cfg.keep_last < 1 or cfg.ckpt_every < 1 or cfg.log_every < 1:
        raise ConfigError("grad_accum, keep_last, ckpt_every and log_every must be at least 1")
    return cfg
