"""The bridge's configuration: one LLaVA run (`BridgeConfig`) holding two training stages (`LlavaStageConfig`).

Every field is set the one way configs are set in this project (`ov2.config`): `--key=value` by dotted
path (`--stage1.steps=50`) or unique leaf (`--eval_samples=8`), or a YAML file of the same keys; a bad key or value
is a ConfigError naming it (one line, exit 2).

    stage 1: projector only, LR 1e-3          stage 2: projector + LLM, LR 2e-5 (projector_lr: the projector's own)
                                              or projector + LoRA adapters on a frozen LLM (stage2.lora_r, bridge.lora)
    unfreeze_vision: the tower trains too, at its own LR (Open-LLaVA-NeXT style, 2e-6)

RESUME_SAFE / RUN_RESUME_SAFE: what a rerun into the same folder may change (ov2.resume.check_resume), for a stage
and for the whole run. `upgrade(tree)` reads a config saved under older key names (save_every -> ckpt_every).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ov2.config import ConfigError
from ov2.precision import check_bf16

DEFAULT_LR = {1: 1e-3, 2: 2e-5}
# what a rerun may change: how often a stage saves, how it reports, when it gives up on non-finite losses ...
RESUME_SAFE = ("ckpt_every", "keep_last", "nan_patience", "max_bad_fraction", "workers", "progress",
               "gradient_checkpointing")
# ... and, for the whole run, where it is, how much it evaluates and where it trains
RUN_RESUME_SAFE = (*RESUME_SAFE, "out", "eval_samples", "caption_samples", "device")
RENAMED = {"save_every": "ckpt_every"}  # older key names in saved configs -> today's


# what a run saved before these keys existed was trained with (ChatML always, centre-cropped images), and a stage
# (no gradient clipping)
BEFORE = {"chat_template": "chatml", "pad_to_square": False}
STAGE_BEFORE = {"max_grad_norm": 0.0}


def upgrade(tree):
    """A saved config (stage or run) with older key names renamed to today's (RENAMED), at any depth, and a run or
    stage config's keys that came later set to what it was trained with (BEFORE, STAGE_BEFORE)."""
    if not isinstance(tree, dict):
        return tree
    out = {RENAMED.get(k, k): upgrade(v) for k, v in tree.items()}
    if "encoder" in out and "stage1" in out:
        out = {**BEFORE, **out}
    if "stage" in out and "steps" in out:
        out = {**STAGE_BEFORE, **out}
    return out


@dataclass
class LlavaStageConfig:
    """One LLaVA training stage (1: projector; 2: projector + LLM), a run folder of its own."""

    stage: int = 1
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-3 for stage 1, 2e-5 for stage 2
    projector_lr: float | None = None  # None: lr (LLaVA); a short CPU budget trains the projector faster
    unfreeze_vision: bool = False
    vision_lr: float = 2e-6
    lora_r: int = 0  # stage 2: 0 trains the whole LLM (LLaVA-1.5); r > 0 LoRA adapters of rank r on a frozen LLM
    lora_alpha: float | None = None  # None: 2 r (LLaVA-1.5's LoRA recipe: r 128, alpha 256)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip the gradient's global norm to this before each step (LLaVA: 1.0); 0: off
    bf16: str = "auto"  # bf16 autocast: auto (where the device multiplies bf16 natively: ov2.precision), true, false
    seed: int = 0
    ckpt_every: int = 50
    keep_last: int = 2
    nan_patience: int = 5  # stop after this many non-finite steps in a row
    max_bad_fraction: float = 0.05  # stop when more than this fraction of the records read so far was unusable
    fsdp: bool = False  # stage 2 under torchrun: the LLM sharded over the ranks (FSDP2, as LLaVA-1.5's ZeRO-3:
    #                     bridge.engine); false: every rank holds the model (DDP). One process: no effect
    gradient_checkpointing: bool = False  # the LLM's decoder layers recompute their activations in the backward
    workers: int = 0  # DataLoader processes building the batches (images, chat template, tokens) ahead of the
    #                   step; 0: in the training process (a 2-core CPU has no core to spare)
    progress: bool = True

    def __post_init__(self):
        validate_stage(self)

    @property
    def total_steps(self) -> int:
        return self.steps


def validate_stage(cfg: LlavaStageConfig, name: str = "stage") -> LlavaStageConfig:
    if cfg.stage not in (1, 2):
        raise ConfigError(f"{name}.stage must be 1 or 2, got {cfg.stage}")
    cfg.bf16 = check_bf16(cfg.bf16, f"{name}.bf16")
    for key in ("steps", "batch_size", "grad_accum", "ckpt_every", "keep_last", "nan_patience"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{name}.{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.workers < 0:
        raise ConfigError(f"{name}.workers must be 0 (in the training process) or more, got {cfg.workers}")
    if cfg.lora_r < 0 or (cfg.lora_r and cfg.stage != 2):
        raise ConfigError(f"{name}.lora_r: LoRA adapters are for stage 2 only, with r >= 1 (0: off), got {cfg.lora_r}")
    if cfg.fsdp and cfg.stage != 2:
        raise ConfigError(f"{name}.fsdp: the LLM is sharded in stage 2 only (stage 1 trains the projector alone)")
    if cfg.fsdp and cfg.lora_r:
        raise ConfigError(f"{name}.fsdp with {name}.lora_r: LoRA adapters on a sharded LLM are not supported; "
                          f"choose one")
    if cfg.lora_r and cfg.lora_alpha is None:
        cfg.lora_alpha = 2.0 * cfg.lora_r
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ConfigError(f"{name}.lora_alpha must be positive, got {cfg.lora_alpha}")
    if cfg.lr is None:
        cfg.lr = DEFAULT_LR[cfg.stage]
    if cfg.lr <= 0 or cfg.vision_lr <= 0 or (cfg.projector_lr is not None and cfg.projector_lr <= 0):
        raise ConfigError(f"{name}.lr, {name}.projector_lr and {name}.vision_lr must be positive, got {cfg.lr}, "
                          f"{cfg.projector_lr} and {cfg.vision_lr}")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise ConfigError(f"{name}.max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ConfigError(f"{name}.warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"{name}.weight_decay must be 0 or more, got {cfg.weight_decay}")
    if not cfg.max_grad_norm >= 0:
        raise ConfigError(f"{name}.max_grad_norm must be 0 (off) or a positive norm, got {cfg.max_grad_norm}")
    return cfg


@dataclass
class BridgeConfig:
    encoder: str
    out: str
    llm: str = "smollm2"
    llm_layers: int = 0  # keep the LLM's first N decoder layers (0: all); the export is a standard LLaVA of N layers.
    #                      A cost cut for smoke runs: SmolLM2 cut to 4-16 layers is no longer a language model
    #                      (benchmarks/results/bridge_signal_cpu.md, recipe G)
    feature_layer: int = -2
    image_size: int = 0  # the tower's input in px (0: its own); 32 for a 64 px tower of patch 8: 16 tokens, not 64
    stage1_data: str = "synth"
    stage2_data: str = "synth"
    image_root: str | None = None  # images of the stage-2 JSON (LLaVA: ./playground/data), and of stage 1's unless
    stage1_image_root: str | None = None  # ... this is set (LLaVA: ./playground/data/LLaVA-Pretrain/images)
    stage1_samples: int = 4000  # built-in data size (each record is generated from (seed, index))
    stage2_samples: int = 8000
    synth_kinds: str = "shapes,text,chart"  # built-in scene kinds (comma-separated)
    stage2_types: str = ""  # built-in question types to keep (comma-separated; empty = all)
    stage2_turns: int = 1  # built-in stage 2: questions per image, one conversation (LLaVA-1.5's data is multi-turn)
    stage2_tasks: str = ""  # built-in tasks whose train split stage 2 holds (held-in, as LLaVA-1.5's mix holds GQA's)
    stage2_task_share: float = 0.5  # the fraction of stage-2 records drawn from those train splits
    stage1: LlavaStageConfig = field(default_factory=lambda: LlavaStageConfig(stage=1, steps=100))
    stage2: LlavaStageConfig = field(default_factory=lambda: LlavaStageConfig(stage=2, steps=200))
    eval_samples: int = 200
    caption_samples: int = 64  # after stage 1: caption loss on unseen built-in scenes (bridge.evaluate.caption_loss),
    #                            the vision-dependence measure set beside the blind control's; 0: off
    seed: int = 0
    device: str = "auto"  # where the stages train: "auto" (cuda when there is one), "cpu", "cuda", "cuda:1" ...
    blind: bool = False  # the no-vision control: no image reaches the LLM (bridge.assemble.make_blind)
    chat_template: str = "auto"  # auto: the LLM tokenizer's own (ChatML where it has none); chatml: ChatML always
    pad_to_square: bool = True  # LLaVA-1.5: pad images to a square with the mean colour; false: centre-crop

    @classmethod
    def from_dict(cls, d: dict) -> BridgeConfig:
        """A saved config (config.yaml / bridge_config.json) back as a BridgeConfig."""
        from ov2.config import apply_tree

        if not isinstance(d, dict) or "encoder" not in d or "out" not in d:
            raise ConfigError("not a bridge config (expected a mapping with encoder and out)")
        base = cls(encoder=str(d["encoder"]), out=str(d["out"]))
        return validate(apply_tree(base, {k: v for k, v in upgrade(d).items() if k not in ("encoder", "out")}))


# what the model is made of: a resume into the same --out may never change these
ARCHITECTURE = ("encoder", "llm", "llm_layers", "feature_layer", "image_size", "seed", "blind", "chat_template",
                "pad_to_square")


def validate(cfg: BridgeConfig) -> BridgeConfig:
    """ConfigError naming the key for any impossible value."""
    validate_stage(cfg.stage1, "stage1")
    validate_stage(cfg.stage2, "stage2")
    if cfg.stage1.stage != 1 or cfg.stage2.stage != 2:
        raise ConfigError("stage1.stage must be 1 and stage2.stage 2")
    for key in ("stage1_samples", "stage2_samples"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.stage2_turns < 1:
        raise ConfigError(f"stage2_turns must be at least 1, got {cfg.stage2_turns}")
    if not 0.0 <= cfg.stage2_task_share <= 1.0:
        raise ConfigError(f"stage2_task_share must be in [0, 1], got {cfg.stage2_task_share}")
    tasks = [t for t in cfg.stage2_tasks.split(",") if t]
    if tasks:
        from benchmarks.evals.suite.tasks import TASKS

        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"stage2_tasks: unknown built-in tasks {unknown}; choose from {', '.join(TASKS)}")
        unseen = [t for t in tasks if TASKS[t].heldout]
        if unseen:
            raise ConfigError(f"stage2_tasks: {unseen} ask only about held-out scenes: they have no train split")
    for key in ("eval_samples", "caption_samples"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {getattr(cfg, key)}")
    if cfg.llm_layers < 0:
        raise ConfigError(f"llm_layers must be 0 (all of the LLM's layers) or more, got {cfg.llm_layers}")
    if cfg.image_size < 0:
        raise ConfigError(f"image_size must be 0 (the tower's own) or a size in px, got {cfg.image_size}")
    from bridge.processor import TEMPLATES

    if cfg.chat_template not in TEMPLATES:
        raise ConfigError(f"chat_template must be one of {', '.join(TEMPLATES)}, got {cfg.chat_template!r}")
    if not cfg.encoder:
        raise ConfigError("encoder: give a checkpoint or run folder, preset:NAME, or a transformers / open_clip folder")
    if not (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda")):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    from encoder.data.synth import KINDS as SCENES

    known = (*SCENES, "fashion")  # "fashion": Fashion-MNIST train images (bridge.data.fashion_scene)
    kinds = [k for k in cfg.synth_kinds.split(",") if k]
    if not kinds or set(kinds) - set(known):
        raise ConfigError(f"synth_kinds: unknown kinds {sorted(set(kinds) - set(known))}; choose from {known}")
    return cfg
