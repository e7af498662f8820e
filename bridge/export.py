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


def export_encoder(spec: str, out_dir: str | Path, layout: str | None = None) -> Path:
    """Our checkpoint (or any tower spec) -> a transformers vision-model folder with the exact same weights."""
    from bridge.towers import OursTower, load_tower

    tower = load_tower(spec)
    if layout is not None and isinstance(tower, OursTower) and tower.vit_cfg.layout != layout:
        raise ValueError(
            f"this encoder has the {tower.vit_cfg.layout!r} layout; it maps exactly only onto "
            f"{'CLIPVisionModel' if tower.vit_cfg.layout == 'clip' else 'ViTModel'} (asked: {layout!r})"
        )
    model = tower.hf_model()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tower.image_processor.save_pretrained(out)
    return out
