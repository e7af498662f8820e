"""The LLaVA-1.5 recipe end to end: assemble -> stage 1 -> stage 2 -> export -> held-out accuracy.

    cfg = BridgeConfig(encoder="runs/ov2-tiny", llm="smollm2", out="runs/llava")
    summary = run(cfg)     # OUT/stage1, OUT/stage2 (resumable), OUT/model (standard LLaVA folder), OUT/summary.json

Data: "synth" (built-in scenes: SynthCaptions for stage 1, SynthInstructions for stage 2) or a LLaVA JSON file
(`stage1_data` / `stage2_data`, images under `image_root`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from bridge.train import StageConfig, train_stage


@dataclass
class BridgeConfig:
    encoder: str
    out: str
    llm: str = "smollm2"
    feature_layer: int = -2
    stage1_data: str = "synth"
    stage2_data: str = "synth"
    image_root: str | None = None
    stage1_samples: int = 4000  # built-in data size (each record is generated from (seed, index))
    stage2_samples: int = 8000
    synth_kinds: str = "shapes,text,chart"  # built-in scene kinds (comma-separated)
    stage2_types: str = ""  # built-in question types to keep (comma-separated; empty = all)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(stage=1, steps=100))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(stage=2, steps=200))
    eval_samples: int = 200
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> BridgeConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown bridge config keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("stage1", "stage2"):
            if isinstance(d.get(key), dict):
                d[key] = StageConfig(**d[key])
        return cls(**d)


def build(cfg: BridgeConfig):
    """-> (model, processor, tower) freshly assembled (random projector)."""
    from bridge.assemble import assemble
    from bridge.llm import load_llm
    from bridge.towers import load_tower

    tower = load_tower(cfg.encoder, feature_layer=cfg.feature_layer)
    llm, tokenizer = load_llm(cfg.llm)
    model, processor = assemble(tower, llm, tokenizer, seed=cfg.seed)
    return model, processor, tower


def datasets(cfg: BridgeConfig, image_size: int):
    from bridge.data import LlavaJsonDataset, SynthCaptions, SynthInstructions

    def pick(spec: str, synth):
        return synth if spec == "synth" else LlavaJsonDataset(spec, cfg.image_root)

    kinds = tuple(k for k in cfg.synth_kinds.split(",") if k)
    types = tuple(t for t in cfg.stage2_types.split(",") if t) or None
    return (pick(cfg.stage1_data, SynthCaptions(cfg.stage1_samples, image_size=image_size, kinds=kinds)),
            pick(cfg.stage2_data, SynthInstructions(cfg.stage2_samples, image_size=image_size, kinds=kinds,
                                                    types=types)))


def run(cfg: BridgeConfig, *, evaluate: bool = True) -> dict:
    from bridge.data import Collator
    from bridge.evaluate import heldout_accuracy
    from bridge.export import export_llava

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bridge_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    model, processor, tower = build(cfg)
    data1, data2 = datasets(cfg, tower.image_size)
    collate = Collator(processor.tokenizer, processor.image_processor, tower.num_patches)
    summary = {"encoder": cfg.encoder, "llm": cfg.llm}
    summary["stage1"] = train_stage(model, data1, collate, cfg.stage1, out / "stage1")
    summary["stage2"] = train_stage(model, data2, collate, cfg.stage2, out / "stage2")
    export_llava(model, processor, out / "model", extra={"encoder": cfg.encoder, "llm": cfg.llm})
    if evaluate and cfg.eval_samples > 0:
        summary["heldout"] = heldout_accuracy(model, processor, n=cfg.eval_samples)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_trained(run_dir: str | Path):
    """Rebuild a run's model from bridge_config.json and its stage weights (finished or latest checkpoint)."""
    from bridge.train import load_trainable

    run_dir = Path(run_dir)
    cfg = BridgeConfig.from_dict(json.loads((run_dir / "bridge_config.json").read_text()))
    model, processor, _ = build(cfg)
    for stage in ("stage1", "stage2"):
        for candidate in (run_dir / stage / "final.safetensors", run_dir / stage / "ckpt" / "trainable.safetensors"):
            if candidate.is_file():
                load_trainable(model, candidate)
                break
    return model.eval(), processor, cfg
