"""Helpers for the bridge tests (no tests here): tiny checkpoints written by the tests themselves, in each layout
the bridge reads. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tiny_vit_cfg(layout: str = "openvision", image_size: int = 32):
    from encoder.models.vit import ViTConfig

    return ViTConfig(image_size=image_size, patch_size=8, width=64, depth=3, heads=2, mlp_dim=128, layout=layout)


def write_our_checkpoint(folder: Path, layout: str = "openvision", seed: int = 0, image_size: int = 32):
    """An ov2 checkpoint folder (config.yaml + model.safetensors with `model.` keys), as encoder.checkpoint reads it.

    Returns the model; its LayerNorms and biases are randomised so that a wrong mapping cannot pass by accident.
    """
    from encoder.config import get_preset, to_dict
    from encoder.models import build_model
    from ov2.runfolder import write_config

    cfg = get_preset("ov2-tiny")
    cfg.model.vit = tiny_vit_cfg(layout, image_size)
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for name, p in model.vit.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, to_dict(cfg))
    save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model


def write_clip_folder(folder: Path, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    model = CLIPVisionModel(cfg).eval()
    model.save_pretrained(folder)
    return model


def write_siglip_folder(folder: Path, seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                             image_size=32, patch_size=8)
    model = SiglipVisionModel(cfg).eval()
    model.save_pretrained(folder)
    return model


class OpenClipBlock(torch.nn.Module):
    """open_clip's ResidualAttentionBlock, rebuilt from torch.nn parts (nn.MultiheadAttention's key names)."""

    def __init__(self, width: int, heads: int, eps: float):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width, eps=eps)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(width, eps=eps)
        self.mlp = torch.nn.Sequential()
        self.mlp.add_module("c_fc", torch.nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", torch.nn.GELU())
        self.mlp.add_module("c_proj", torch.nn.Linear(width * 4, width))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipVisual(torch.nn.Module):
    """The open_clip VisionTransformer trunk (OpenVision release: no ln_pre, LN eps 1e-6), as an independent oracle."""

    def __init__(self, width=48, layers=3, heads=2, patch=8, image=32, ln_pre=False, eps=1e-6):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = torch.nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * 0.1)
        self.ln_pre = torch.nn.LayerNorm(width, eps=eps) if ln_pre else torch.nn.Identity()
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList(OpenClipBlock(width, heads, eps) for _ in range(layers))
        self.ln_post = torch.nn.LayerNorm(width, eps=eps)
        self.proj = torch.nn.Parameter(torch.randn(width, 16) * 0.1)

    def hidden_states(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        out = [x]
        for block in self.transformer.resblocks:
            x = block(x)
            out.append(x)
        return out


def write_openclip_folder(folder: Path, ln_pre: bool = False, seed: int = 0) -> OpenClipVisual:
    torch.manual_seed(seed)
    visual = OpenClipVisual(ln_pre=ln_pre).eval()
    with torch.no_grad():
        for name, p in visual.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {"visual." + k: v.contiguous() for k, v in visual.state_dict().items()}
    sd["text_projection"] = torch.zeros(16, 16)  # a text tower key the adapter must ignore
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 24,
                           "no_ln_pre": not ln_pre, "pool_type": "avg", "norm_kwargs": {"eps": 1e-6}},
            "text_cfg": {"width": 16, "layers": 1},
        },
        "preprocess_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic",
                           "resize_mode": "squash"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return visual


def smollm2_tokenizer():
    from bridge.llm import load_tokenizer

    return load_tokenizer("smollm2")


def write_tiny_llama_folder(folder: Path, seed: int = 0) -> Path:
    """A local causal-LM folder: a random 2-layer Llama with SmolLM2's tokenizer."""
    from bridge.llm import tiny_llama

    tokenizer = smollm2_tokenizer()
    model = tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_llava(folder: Path, seed: int = 1, image_size: int = 32):
    """A tiny LLaVA (our ViT checkpoint + random 2-layer Llama, projector scaled up so that answers depend on the
    image) exported as a standard folder. Returns (model, processor) as assembled in memory."""
    from bridge.assemble import assemble
    from bridge.export import export_llava
    from bridge.llm import tiny_llama
    from bridge.towers import load_tower

    tokenizer = smollm2_tokenizer()
    write_our_checkpoint(Path(folder).with_name(Path(folder).name + "-encoder"), seed=seed, image_size=image_size)
    tower = load_tower(Path(folder).with_name(Path(folder).name + "-encoder"))
    model, processor = assemble(tower, tiny_llama(tokenizer, seed=seed, init_std=0.3), tokenizer, seed=seed)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(4.0)
    export_llava(model.eval(), processor, folder)
    return model, processor
