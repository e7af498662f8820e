"""Standard transformers folders that tools we do not own can load.

    export_llava(model, processor, out)  -> config.json, model.safetensors, generation_config.json, tokenizer +
                                            processor files, chat template: LlavaForConditionalGeneration +
                                            AutoProcessor (and lmms-eval's llava_hf) load it with nothing of ours
    export_encoder(spec, out)            -> the vision encoder alone as ViTModel (OpenVision layout) or
                                            CLIPVisionModel (layout "clip") + preprocessor_config.json
"""

from __future__ import annotations

import json
from pathlib import Path


def export_llava(model, processor, out_dir: str | Path, extra: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if extra:
        (out / "ov2_bridge.json").write_text(json.dumps(extra, indent=1))
    return out


def _refuse_destination(spec: str, out: Path, force: bool) -> None:
    """Never write inside a run's checkpoints (or over a run folder); a non-empty folder only with `force`."""
    from ov2.config import ConfigError

    target = out.resolve()
    if (target / "checkpoints").is_dir():
        raise ConfigError(f"{out} is a training run folder: export to a folder outside it")
    for folder in (target, *target.parents):
        if folder.name == "checkpoints" or (folder / "trainer.json").is_file():
            raise ConfigError(f"{out} is inside a training run's checkpoints ({folder}): choose another destination")
        if (folder / "model.safetensors").is_file() and (folder / "config.yaml").is_file():
            raise ConfigError(f"{out} is inside the checkpoint folder {folder}: choose another destination")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} is not empty: choose a new folder, or pass --force to overwrite its files")


def export_encoder(spec: str, out_dir: str | Path, layout: str | None = None, force: bool = False) -> Path:
    """Our checkpoint (or any tower spec) -> a transformers vision-model folder with the exact same weights."""
    from bridge.towers import OursTower, load_tower

    out = Path(out_dir)
    _refuse_destination(str(spec), out, force)
    tower = load_tower(spec)
    if layout is not None and isinstance(tower, OursTower) and tower.vit_cfg.layout != layout:
        raise ValueError(
            f"this encoder has the {tower.vit_cfg.layout!r} layout; it maps exactly only onto "
            f"{'CLIPVisionModel' if tower.vit_cfg.layout == 'clip' else 'ViTModel'} (asked: {layout!r})"
        )
    model = tower.hf_model()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tower.image_processor.save_pretrained(out)
    return out
