"""Training configuration: dataclasses, named presets, `--key=value` and YAML overrides, validation.

    cfg = get_preset("ov2-tiny")
    cfg = apply_overrides(cfg, ["--model.keep_ratio=0.25", "--stages.0.steps=50", "--seed=3"])
    cfg = apply_yaml(cfg, "exp.yaml")      # nested mapping with the same keys
    validate(cfg)                          # raises ConfigError with one clear line

A key is a dotted path (`model.vit.width`, `stages.1.lr`) or a leaf name that is unique in the tree
(`keep_ratio`, `seed`). Presets differ only in numbers and `model.family` ("ov2" | "ov1" | "clip").
Each preset has a two-stage resolution schedule: low-resolution pretraining, then high-resolution
finetuning that starts from stage 1's weights (sin-cos positions need no interpolation); `ov2-so400m14` adds the
released third stage (84 -> 224 -> 378 px). A stage's `batch_size` is the global batch of one optimizer step;
`accumulation()` derives the per-process micro-batch and the micro-steps per optimizer step from the world size and
`micro_batch` (the micro-batch that fits; the accumulation follows) or `grad_accum`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from encoder.models.decoder import DecoderConfig
from encoder.models.registry import FAMILIES as REGISTRY
from encoder.models.text import TextConfig
from encoder.models.vit import ViTConfig
from ov2.config import ConfigError, apply_overrides, apply_tree, read_yaml, set_value  # noqa: F401
from ov2.precision import check_bf16


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
class PretrainStageConfig:
    """One pretraining stage at one resolution (a TrainConfig holds one per stage, run one after the other)."""

    image_size: int = 64
    steps: int = 100
    batch_size: int = 32  # GLOBAL batch of one optimizer step; per process: micro_batch(stage, world, grad_accum)
    lr: float = 1e-3
    warmup_steps: int = 10


@dataclass
class DataConfig:
    source: str = "synth"  # "synth" (generated on the fly) | webdataset shards (dir, glob, list) | image folder
    captions: str = ""  # captions file (JSONL / CSV / parquet) for an image-folder source
    captions_outside: bool = False  # allow captions-file image paths that leave the image folder (.., absolute, links)
    synth_seed: int = 0  # the held-out synthetic streams use other seeds
    synth_size: int = 50_000  # distinct synthetic scenes in one epoch
    kinds: str = "shapes,text,chart"
    synth_max_groups: int = 3  # object groups per shapes scene (1 = single-object scenes)
    fashion_mnist: float = 0.0  # fraction of Fashion-MNIST train images mixed in (needs dataset-fashion-mnist)
    crop_min_scale: float = 0.4  # random resized crop scale range is (crop_min_scale, 1)
    color_jitter: float = 0.4  # brightness / contrast / saturation: factors drawn from [1 - x, 1 + x]
    hue_jitter: float = 0.0  # hue shift drawn from [-x, x] (fraction of the colour circle); released: 0.08
    color_jitter_p: float = 1.0  # probability that an image is colour-jittered at all; released: 0.8
    grayscale_p: float = 0.2  # probability of a grayscale image
    resize: str = "bicubic"  # crop resize filter (antialiased): "bilinear" (released) | "bicubic"
    max_bad_fraction: float = 0.05  # stop when more than this fraction of samples read so far was unusable
    workers: int = 1  # DataLoader worker processes per rank


@dataclass
class TrainConfig:
    preset: str = "ov2-tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[PretrainStageConfig] = field(default_factory=lambda: [PretrainStageConfig()])
    grad_accum: int = 1  # micro-steps per optimizer step (ignored when micro_batch is set)
    micro_batch: int = 0  # per-process micro-batch that fits in memory; 0: the whole per-process share. When set,
    #                       gradient accumulation is each stage's batch_size / (processes x micro_batch). The paper
    #                       presets carry one that fits an 80 GB GPU (PAPER_MICRO_BATCH)
    activation_checkpointing: bool = False  # recompute each transformer block's activations in the backward pass
    weight_decay: float = 0.2  # decoupled, on weight matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 0.0  # clip the gradient's global norm to this before each step; 0: off (the paper's
    #                             recipe: no gradient clipping, FACTS.md)
    bf16: str = "auto"  # bf16 autocast: auto (where the device multiplies bf16 natively: ov2.precision), true, false
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


# what `--resume` may change (ov2.resume.check_resume): how often it logs and saves, how it reads data, how it runs on
# the machine; and what makes the architecture (changing it is refused as such)
RESUME_SAFE = ("log_every", "ckpt_every", "keep_last", "nan_patience", "data.workers", "data.max_bad_fraction",
               "activation_checkpointing",
               "loss_impl", "distributed")
ARCHITECTURE = ("model", "preset")
# what a run saved before these keys existed was trained with (no gradient clipping)
BEFORE = {"max_grad_norm": 0.0}


def upgrade(tree: dict | None) -> dict | None:
    """A saved config (RUN/config.yaml as a dict, or None) with the keys that came later set to what it was trained
    with (BEFORE)."""
    return {**BEFORE, **tree} if isinstance(tree, dict) else tree


# --- presets -------------------------------------------------------------------------------------------

VITS = {  # width, depth, mlp, heads (FACTS.md)
    "ti": (192, 12, 768, 3), "s": (384, 12, 1536, 6), "b": (768, 12, 3072, 12), "l": (1024, 24, 4096, 16),
    "so400m": (1152, 27, 4304, 16), "h": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16),
}
DECODERS = {  # decoder paired with each encoder size (FACTS.md)
    "b": (512, 12, 2048, 8), "l": (768, 12, 3072, 12), "so400m": (1152, 27, 4304, 16),
    "h": (1024, 24, 4096, 16), "g": (1024, 24, 4096, 16),
}
# The released recipe: stage 1 at low resolution (12.8B samples, batch 32k), stage 2 at high (1.02B, 16k); batches
# are global. A third stage (the released 384 px models) starts from the 224 px checkpoint with the only numbers
# released for it (OpenVision v1's 384 px script): batch 8,192, 256M samples, peak LR 3.2e-6, no warm-up.
PAPER_STAGES = dict(batch=(32_768, 16_384, 8_192), steps=(390_625, 62_256, 31_250), lr=(1.024e-3, 2.56e-5, 3.2e-6),
                    warmup=(1_563, 1_563, 0))
# Per-process micro-batch of each paper preset (size -> family -> images): the largest power of two whose training step
# at the preset's highest resolution fits an 80 GB GPU (85 % of it) without activation checkpointing, counted on the
# meta device by tests/test_cost.py as an upper bound (float32 weights, gradients, AdamW moments and bf16 copies,
# whole as DDP holds them; every tensor saved for the backward, in float32, attention's T x T included). The global
# batch then takes batch_size / (processes x micro_batch) micro-steps; `--micro_batch` overrides it.
PAPER_MICRO_BATCH = {
    "b16": {"ov2": 256, "ov1": 128, "clip": 256}, "l14": {"ov2": 64, "ov1": 32, "clip": 64},
    "so400m14": {"ov2": 16, "ov1": 8, "clip": 16}, "h14": {"ov2": 32, "ov1": 16, "clip": 32},
    "g14": {"ov2": 16, "ov1": 16, "clip": 32},
}
# Released augmentation: colour jitter as SimCLR's with strength s = 0.4 (brightness / contrast / saturation
# 0.8 s, hue 0.2 s), applied with p 0.8; grayscale p 0.2; bilinear antialiased resize.
RELEASED_DATA = dict(color_jitter=0.8 * 0.4, hue_jitter=0.2 * 0.4, color_jitter_p=0.8, grayscale_p=0.2,
                     resize="bilinear")


def accumulation(stage: PretrainStageConfig, world_size: int, cfg: TrainConfig) -> tuple[int, int]:
    """(per-process micro-batch, micro-steps per optimizer step) of a stage: from `micro_batch` when set (the
    accumulation follows from the global batch), else from `grad_accum`."""
    if not cfg.micro_batch:
        return micro_batch(stage, world_size, cfg.grad_accum), cfg.grad_accum
    parts = world_size * cfg.micro_batch
    if stage.batch_size % world_size:
        raise ConfigError(f"global batch {stage.batch_size} does not split over {world_size} processes")
    if stage.batch_size % parts:
        raise ConfigError(f"global batch {stage.batch_size} is not divisible by {world_size} process(es) x "
                          f"micro_batch {cfg.micro_batch} = {parts}: choose a micro_batch that divides "
                          f"{stage.batch_size // world_size}")
    return cfg.micro_batch, stage.batch_size // parts


def micro_batch(stage: PretrainStageConfig, world_size: int = 1, grad_accum: int = 1) -> int:
    """Per-process batch of one micro-step: the stage's global batch / (world size x gradient accumulation)."""
    parts = world_size * grad_accum
    if stage.batch_size % parts:
        raise ConfigError(f"global batch {stage.batch_size} is not divisible by world size {world_size} x grad_accum "
                          f"{grad_accum} = {parts}: choose a batch_size that is a multiple of {parts}")
    return stage.batch_size // parts


def _paper_preset(size: str, patch: int, low: int, high: int, final: int | None = None) -> TrainConfig:
    """Stages low -> high px (the released two-stage recipe), then `final` px from the high checkpoint if given."""
    width, depth, mlp, heads = VITS[size]
    d_width, d_depth, d_mlp, d_heads = DECODERS[size]
    model = ModelConfig(
        vit=ViTConfig(image_size=final or high, patch_size=patch, width=width, depth=depth, heads=heads, mlp_dim=mlp),
        decoder=DecoderConfig(width=d_width, depth=d_depth, heads=d_heads, mlp_dim=d_mlp),
        # v1 / CLIP text encoder: as wide and deep as the decoder (FACTS.md cost arithmetic), context 80
        text=TextConfig(width=d_width, depth=d_depth, heads=d_heads, mlp_dim=d_mlp),
        embed_dim=d_width,
    )
    stages = [
        PretrainStageConfig(image_size=res, steps=PAPER_STAGES["steps"][i], batch_size=PAPER_STAGES["batch"][i],
                            lr=PAPER_STAGES["lr"][i], warmup_steps=PAPER_STAGES["warmup"][i])
        for i, res in enumerate((low, high) if final is None else (low, high, final))
    ]
    # 8 data workers per GPU: decoding and augmenting a micro-batch of web images keeps several cores busy
    return TrainConfig(model=model, stages=stages, data=DataConfig(**RELEASED_DATA, workers=8))


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
        PretrainStageConfig(image_size=32, steps=400, batch_size=32, lr=2e-3, warmup_steps=40),
        PretrainStageConfig(image_size=64, steps=200, batch_size=32, lr=5e-4, warmup_steps=20),
    ]
    # built-in scenes name every object, its colour and position: augment gently so captions stay true
    data = DataConfig(crop_min_scale=0.85, color_jitter=0.1, grayscale_p=0.0)
    return TrainConfig(model=model, data=data, stages=stages, weight_decay=0.05, ckpt_every=100)


def _micro() -> TrainConfig:
    """Tests and smoke runs (seconds on 2 cores): ViT 64 x 2 (patch 8), decoder / text encoder 64 x 1, 16 px then
    32 px, batch 8. The tiny preset's gentle augmentation; its stage-2 LR."""
    model = ModelConfig(
        vit=ViTConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_dim=128),
        decoder=DecoderConfig(width=64, depth=1, heads=2, mlp_dim=128, max_len=24),
        text=TextConfig(width=64, depth=1, heads=2, mlp_dim=128, context=24),
        embed_dim=64,
        num_queries=24,
    )
    stages = [
        PretrainStageConfig(image_size=16, steps=12, batch_size=8, lr=2e-3, warmup_steps=2),
        PretrainStageConfig(image_size=32, steps=8, batch_size=8, lr=5e-4, warmup_steps=1),
    ]
    data = DataConfig(crop_min_scale=0.85, color_jitter=0.1, grayscale_p=0.0, workers=0)
    # float32 on every machine: the micro presets are smoke and test runs, whose numbers must mean the same on any CPU
    return TrainConfig(model=model, data=data, stages=stages, weight_decay=0.05, log_every=2, ckpt_every=10,
                       bf16="false")


def equal_budget_recipe(steps: int = 400, batch: int = 64, size: int = 32) -> list[str]:
    """Overrides of the baselines comparison, equal for every family (applied to `{family}-micro` by
    `benchmarks/bench/baselines.py` and the baseline learning tests): single-object built-in scenes plus 75 %
    Fashion-MNIST train images, steps x batch at `size` px, patch 4, lr 3e-3, no weight decay. Patch 4 gives 64
    patches at 32 px, so OpenVision 2 still sees 22 after keeping 35 % (patch 8 would leave it 5 of 16, and then its
    probe does not rise above the random-init floor in this budget). Stage 2 is one step at 1/20 of 5e-4."""
    return ["--data.kinds=shapes", "--synth_max_groups=1", "--data.fashion_mnist=0.75", "--model.vit.patch_size=4",
            f"--stages.0.image_size={size}", f"--stages.0.steps={steps}", f"--stages.0.batch_size={batch}",
            "--stages.0.lr=3e-3", "--stages.0.warmup_steps=10", "--stages.1.steps=1", "--stages.1.lr=5e-4",
            "--stages.1.warmup_steps=20", f"--stages.1.image_size={size}", f"--stages.1.batch_size={batch}",
            "--weight_decay=0", "--log_every=10", f"--ckpt_every={steps + 1}", "--data.workers=0"]


_BASES = {
    "micro": _micro,
    "tiny": _tiny,
    "b16": lambda: _paper_preset("b", 16, 112, 224),
    "l14": lambda: _paper_preset("l", 14, 84, 224),
    # 378 = 27 x 14: the same 27 x 27 grid that a 384 px input gives with patch 14 (the conv drops 6 px);
    # 84 -> 224 -> 378 as the released 384 px models
    "so400m14": lambda: _paper_preset("so400m", 14, 84, 224, 378),
    "h14": lambda: _paper_preset("h", 14, 84, 224),
    "g14": lambda: _paper_preset("g", 14, 84, 224),
}
FAMILIES = tuple(REGISTRY)  # the model registry (encoder.models.registry) is the one table of families
PRESETS = [f"{family}-{size}" for family in FAMILIES for size in _BASES]


def get_preset(name: str) -> TrainConfig:
    family, _, size = name.partition("-")
    if family not in FAMILIES or size not in _BASES:
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    cfg = _BASES[size]()
    cfg.preset = name
    cfg.model.family = family
    if size in PAPER_MICRO_BATCH:
        cfg.micro_batch = PAPER_MICRO_BATCH[size][family]
    return cfg


# --- overrides (the engine is ov2.config, shared with the bridge config) ----------------------


def apply_yaml(cfg: TrainConfig, path: str) -> TrainConfig:
    """`cfg` with a YAML file of overrides applied (a `preset:` key in it starts from that preset)."""
    tree = read_yaml(path)
    if "preset" in tree:
        preset = tree.pop("preset")
        if not isinstance(preset, str):
            raise ConfigError(f"preset: expected a preset name, got {preset!r}; choose from: {', '.join(PRESETS)}")
        cfg = get_preset(preset)
    return apply_tree(cfg, tree)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict) -> TrainConfig:
    preset = tree.get("preset", "ov2-tiny")
    if not isinstance(preset, str):
        raise ConfigError(f"preset: expected a preset name, got {preset!r}")
    return apply_tree(get_preset(preset), {k: v for k, v in upgrade(tree).items() if k != "preset"})


def validate(cfg: TrainConfig) -> TrainConfig:
    cfg.bf16 = check_bf16(cfg.bf16, "bf16")
    m = cfg.model
    if m.family not in FAMILIES:
        raise ConfigError(f"model.family must be one of {FAMILIES}, got {m.family!r}")
    if not 0.0 < m.keep_ratio <= 1.0:
        raise ConfigError(f"model.keep_ratio must be in (0, 1], got {m.keep_ratio}")
    positive = {"model.vit.patch_size": m.vit.patch_size, "model.vit.image_size": m.vit.image_size,
                **{f"model.{name}.{k}": getattr(getattr(m, name), k) for name in ("vit", "decoder", "text")
                   for k in ("width", "depth", "heads", "mlp_dim")}}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if not cfg.stages:
        raise ConfigError("stages: at least one stage is needed")
    if cfg.data.workers < 0:
        raise ConfigError(f"data.workers must be 0 or more, got {cfg.data.workers}")
    for i, stage in enumerate(cfg.stages):
        if stage.image_size <= 0:
            raise ConfigError(f"stages.{i}.image_size must be positive, got {stage.image_size}")
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
    if cfg.data.resize not in ("bilinear", "bicubic"):
        raise ConfigError(f"data.resize must be 'bilinear' or 'bicubic', got {cfg.data.resize!r}")
    if not (0.0 <= cfg.data.color_jitter_p <= 1.0 and 0.0 <= cfg.data.hue_jitter <= 0.5):
        raise ConfigError("data.color_jitter_p must be in [0, 1] and data.hue_jitter in [0, 0.5]")
    if not 0.0 <= cfg.data.fashion_mnist < 1.0:
        raise ConfigError(f"data.fashion_mnist must be in [0, 1), got {cfg.data.fashion_mnist}")
    if cfg.micro_batch < 0:
        raise ConfigError(f"micro_batch must be 0 (no accumulation beyond grad_accum) or more, got {cfg.micro_batch}")
    if not cfg.max_grad_norm >= 0:
        raise ConfigError(f"max_grad_norm must be 0 (off) or a positive norm, got {cfg.max_grad_norm}")
    if cfg.grad_accum < 1 or cfg.keep_last < 1 or cfg.ckpt_every < 1 or cfg.log_every < 1:
        raise ConfigError("grad_accum, keep_last, ckpt_every and log_every must be at least 1")
    return cfg
