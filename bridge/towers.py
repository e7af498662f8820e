"""Vision towers behind one interface (B batch, N patches, D width).

    tower = load_tower(spec, feature_layer=-2)
    tower(pixel_values [B,3,H,W]) -> [B,N,D]   patch tokens of hidden_states[feature_layer] (cls dropped)
    tower.hidden_size, tower.num_patches, tower.patch_size, tower.image_size, tower.image_processor
    tower.has_cls, tower.strategy ("default": drop cls, "full": no cls to drop)
    tower.hf_model() -> the transformers vision model (ViTModel / CLIPVisionModel / SiglipVisionModel) that
                        LlavaForConditionalGeneration holds, giving the same features

`spec` is one of (first match wins):
    a local transformers folder whose config is clip / clip_vision_model / siglip / siglip_vision_model / vit
    a local OpenVision release folder in open_clip layout (open_clip_config.json + weights)
    "preset:NAME" (a freshly initialised encoder from encoder.config presets, e.g. preset:ov2-tiny, seeded by `seed`)
    one of our checkpoints or training-run folders (encoder.checkpoint.load_model)
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bridge.processor import make_image_processor
from encoder.weights import VitShape, build_hf_vision_model, openclip_shape, openclip_to_canonical

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_VISION_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip",
                   "vit": "vit"}


class VisionTower(nn.Module):
    """Patch features of a transformers vision model at one layer."""

    def __init__(self, model: nn.Module, image_processor, *, feature_layer: int = -2, has_cls: bool = True,
                 source: str = ""):
        super().__init__()
        self.model = model
        self.image_processor = image_processor
        self.feature_layer = feature_layer
        self.has_cls = has_cls
        self.source = source
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.image_size = cfg.image_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        depth = cfg.num_hidden_layers
        if not -(depth + 1) <= feature_layer <= depth:
            raise ValueError(f"feature_layer {feature_layer} outside this {depth}-block tower's hidden states")

    @property
    def strategy(self) -> str:
        return "default" if self.has_cls else "full"

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.hidden_states(pixel_values)[self.feature_layer]
        return h[:, 1:] if self.has_cls else h

    def hf_model(self) -> nn.Module:
        return self.model


class OursTower(VisionTower):
    """Our ViT (encoder.models.vit.ViT) run natively; hf_model() is its exact ViTModel / CLIPVisionModel conversion."""

    def __init__(self, vit: nn.Module, vit_cfg, image_processor, *, feature_layer: int = -2, source: str = ""):
        nn.Module.__init__(self)
        self.model = vit
        self.vit_cfg = vit_cfg
        self.image_processor = image_processor
        self.feature_layer = feature_layer
        self.has_cls = True
        self.source = source
        self.hidden_size = vit_cfg.width
        self.patch_size = vit_cfg.patch_size
        self.image_size = vit_cfg.image_size
        self.num_patches = (vit_cfg.image_size // vit_cfg.patch_size) ** 2
        if not -(vit_cfg.depth + 1) <= feature_layer <= vit_cfg.depth:
            raise ValueError(f"feature_layer {feature_layer} outside this {vit_cfg.depth}-block ViT's hidden states")

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model(pixel_values, output_hidden_states=True)["hidden_states"]

    def shape(self) -> VitShape:
        c = self.vit_cfg
        return VitShape(c.image_size, c.patch_size, c.width, c.depth, c.heads, c.mlp_dim, c.layout,
                        getattr(c, "ln_eps", 1e-6))

    def hf_model(self) -> nn.Module:
        sd = {k: v.detach() for k, v in self.model.state_dict().items()}
        sd["pos_embed"] = self.model.pos_embed.detach()  # a non-persistent buffer: not in state_dict()
        return build_hf_vision_model(sd, self.shape())


def _hf_tower(folder: Path, feature_layer: int) -> VisionTower:
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel, ViTModel

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    kind = HF_VISION_TYPES[model_type]
    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "vit": ViTModel}[kind]
    model = cls.from_pretrained(folder).eval()
    if (folder / "preprocessor_config.json").is_file():
        image_processor = AutoImageProcessor.from_pretrained(folder)
    else:
        mean, std = (OPENAI_MEAN, OPENAI_STD) if kind == "clip" else ((0.5,) * 3, (0.5,) * 3) \
            if kind == "siglip" else (IMAGENET_MEAN, IMAGENET_STD)
        image_processor = make_image_processor(model.config.image_size, mean, std)
    return VisionTower(model, image_processor, feature_layer=feature_layer, has_cls=kind != "siglip",
                       source=str(folder))


def _openclip_tower(folder: Path, feature_layer: int) -> VisionTower:
    from safetensors.torch import load_file

    config = json.loads((folder / "open_clip_config.json").read_text())
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: open_clip_config.json but no *.safetensors or *.bin weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True))
    canonical = {k: v.float() for k, v in openclip_to_canonical(sd).items()}
    shape = openclip_shape(config, canonical)
    model = build_hf_vision_model(canonical, shape)
    pre = config.get("preprocess_cfg", {})
    image_processor = make_image_processor(shape.image_size, pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD))
    return VisionTower(model, image_processor, feature_layer=feature_layer, has_cls=True, source=str(folder))


def _ours_tower(spec: str, feature_layer: int, seed: int = 0) -> OursTower:
    from encoder.data import transforms

    if spec.startswith("preset:"):
        from encoder.config import get_preset
        from encoder.models import build_model

        cfg = get_preset(spec[len("preset:"):])
        with torch.random.fork_rng(devices=[]):  # the same tower for the same seed; the caller's RNG untouched
            torch.manual_seed(seed)
            model = build_model(cfg.model)
    else:
        from encoder.checkpoint import load_model

        model, cfg = load_model(spec)
    vit = model.vit.eval()
    vit_cfg = cfg.model.vit
    image_processor = make_image_processor(vit_cfg.image_size, transforms.MEAN, transforms.STD)
    return OursTower(vit, vit_cfg, image_processor, feature_layer=feature_layer, source=spec)


def load_tower(spec: str | Path, feature_layer: int = -2, seed: int = 0) -> VisionTower:
    """Registry entry point: see the module docstring for what `spec` may be (`seed` initialises a preset:)."""
    spec = str(spec)
    folder = Path(spec)
    if folder.is_dir() and (folder / "config.json").is_file():
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type in HF_VISION_TYPES:
            return _hf_tower(folder, feature_layer)
        if not (folder / "config.yaml").is_file() and not (folder / "open_clip_config.json").is_file():
            what = "a LLaVA model" if "llava" in str(model_type).lower() else f"a transformers {model_type!r} model"
            raise FileNotFoundError(
                f"vision tower {spec!r} is {what} folder, not a vision encoder: give our checkpoint or run folder, "
                f"preset:NAME, a transformers {'/'.join(sorted(HF_VISION_TYPES))} folder or an open_clip folder")
    if folder.is_dir() and (folder / "open_clip_config.json").is_file():
        return _openclip_tower(folder, feature_layer)
    if spec.startswith("preset:") or folder.exists():
        return _ours_tower(spec, feature_layer, seed)
    raise FileNotFoundError(
        f"vision tower {spec!r}: not a local transformers vision folder, open_clip folder, preset:NAME or checkpoint"
    )


def resize_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A position table ([P, D] or [1, P, D]; P = g*g, or 1 + g*g with a class position first) for a grid x grid
    input: the patch positions interpolated bicubically, as transformers' `interpolate_pos_encoding` does."""
    flat = table.reshape(-1, table.shape[-1])
    old = int(round((flat.shape[0]) ** 0.5))
    cls = flat.shape[0] - old * old
    if cls not in (0, 1):
        old = int(round((flat.shape[0] - 1) ** 0.5))
        cls = flat.shape[0] - old * old
    patches = flat[cls:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    out = torch.cat([flat[:cls].float(), patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)]).to(table.dtype)
    return out.reshape(*table.shape[:-2], -1, table.shape[-1]) if table.dim() == 3 else out


def at_image_size(tower: VisionTower, image_size: int) -> VisionTower:
    """The same tower taking `image_size` px images (image_size // patch_size squared tokens; 0: its own size).
    Our ViT computes its sin-cos positions for any grid; a transformers tower is rebuilt at the new size with its
    position table interpolated. Either way `hf_model()` is a plain transformers vision model at that size."""
    import copy
    from dataclasses import replace

    if not image_size or image_size == tower.image_size:
        return tower
    if image_size % tower.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the tower's patch size {tower.patch_size}")
    grid = image_size // tower.patch_size
    mean, std = tower.image_processor.image_mean, tower.image_processor.image_std
    processor = make_image_processor(image_size, mean, std, int(getattr(tower.image_processor, "resample", 3)))
    if isinstance(tower, OursTower):
        from encoder.models.vit import position_table

        vit = tower.model
        vit.cfg = replace(vit.cfg, image_size=image_size)
        vit.pos_embed = position_table(grid, grid, vit.cfg.width)
        return OursTower(vit, replace(tower.vit_cfg, image_size=image_size), processor,
                         feature_layer=tower.feature_layer, source=tower.source)
    model = tower.model
    config = copy.deepcopy(model.config)
    config.image_size = image_size
    state = {k: (resize_positions(v, grid) if k.endswith(("position_embedding.weight", "position_embeddings")) else v)
             for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    resized = type(model)(config).eval()
    missing, unexpected = resized.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise ValueError(f"cannot resize this {type(model).__name__}: {sorted(missing + unexpected)[:4]}")
    return VisionTower(resized, processor, feature_layer=tower.feature_layer, has_cls=tower.has_cls,
                       source=tower.source)
