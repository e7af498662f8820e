"""Weight conversion to and from transformers: exact mappings between ViT layouts (no arithmetic beyond
splitting fused qkv and reshaping).

Canonical names (our `encoder.models.vit.ViT`, D width, N patches, L blocks):

    patch_embed.weight [D,3,P,P] (+ optional bias)  cls_token [1,1,D]  pos_embed [1,1+N,D]  pre_norm.* (clip layout)
    blocks.{i}.norm1.*  blocks.{i}.attn.qkv.{weight [3D,D], bias [3D]}  blocks.{i}.attn.proj.*  blocks.{i}.norm2.*
    blocks.{i}.mlp.fc1.*  blocks.{i}.mlp.fc2.*  norm.*

Targets: transformers `ViTModel` (OpenVision layout: no pre-LN; patch bias zero; the fixed sin-cos table becomes the
`position_embeddings` parameter) and `CLIPVisionModel` (layout "clip": `pre_layrnorm` = pre_norm). Both record
`hidden_states[0]` as the input of the first block (after the pre-LN for CLIP) and `hidden_states[i]` as block i's
output, as our ViT does. Sources: canonical state dicts and open_clip's `visual.*` layout (OpenVision releases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VitShape:
    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    layout: str = "openvision"  # "openvision" (-> ViTModel) | "clip" (-> CLIPVisionModel)
    ln_eps: float = 1e-6
    act: str = "gelu"  # exact GELU; "quick_gelu" for OpenAI-style CLIP weights


def hf_config(shape: VitShape):
    """The transformers config of the target model for a ViT shape."""
    common = {
        "hidden_size": shape.width,
        "num_hidden_layers": shape.depth,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.mlp_dim,
        "hidden_act": shape.act,
        "layer_norm_eps": shape.ln_eps,
        "image_size": shape.image_size,
        "patch_size": shape.patch_size,
        "num_channels": 3,
    }
    if shape.layout == "clip":
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**common, attention_dropout=0.0)
    if shape.layout == "openvision":
        from transformers import ViTConfig

        return ViTConfig(**common, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raise ValueError(f"unknown ViT layout {shape.layout!r}; choose openvision or clip")


def _split_qkv(sd: dict, prefix: str, out: dict, names: tuple[str, str, str]) -> None:
    w, b = sd[prefix + ".weight"], sd.get(prefix + ".bias")
    for name, wi, bi in zip(names, w.chunk(3, 0), b.chunk(3, 0) if b is not None else (None,) * 3):
        out[name + ".weight"] = wi.clone()
        if bi is not None:
            out[name + ".bias"] = bi.clone()


def _copy(sd: dict, src: str, out: dict, dst: str) -> None:
    for suffix in (".weight", ".bias"):
        if src + suffix in sd:
            out[dst + suffix] = sd[src + suffix].clone()



# our block module names -> transformers' names ("{}" is q, k or v for the split qkv projection)
CLIP_BLOCK_NAMES = {"norm1": "layer_norm1", "attn.qkv": "self_attn.{}_proj", "attn.proj": "self_attn.out_proj",
                    "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
VIT_BLOCK_NAMES = {"norm1": "layernorm_before", "attn.qkv": "attention.{}_proj", "attn.proj": "attention.o_proj",
                   "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _copy_blocks(sd: dict, out: dict, depth: int, prefix: str, names: dict[str, str]) -> None:
    for i in range(depth):
        s, t = f"blocks.{i}.", f"{prefix}{i}."
        for ours, theirs in names.items():
            if ours == "attn.qkv":
                _split_qkv(sd, s + ours, out, tuple(t + theirs.format(n) for n in "qkv"))
            else:
                _copy(sd, s + ours, out, t + theirs)

def canonical_to_hf(sd: dict[str, torch.Tensor], shape: VitShape) -> dict[str, torch.Tensor]:
    """Canonical ViT state dict -> ViTModel / CLIPVisionModel state dict (pooler of ViTModel set to identity)."""
    out: dict[str, torch.Tensor] = {}
    D = shape.width
    patch_bias = sd.get("patch_embed.bias")
    if shape.layout == "clip":
        if patch_bias is not None and patch_bias.abs().max() > 0:
            raise ValueError("CLIPVisionModel has no patch-embedding bias, but this ViT's is non-zero")
        out["embeddings.patch_embedding.weight"] = sd["patch_embed.weight"].clone()
        out["embeddings.class_embedding"] = sd["cls_token"].reshape(D).clone()
        out["embeddings.position_embedding.weight"] = sd["pos_embed"].reshape(-1, D).clone()
        _copy(sd, "pre_norm", out, "pre_layrnorm")
        _copy_blocks(sd, out, shape.depth, "encoder.layers.", CLIP_BLOCK_NAMES)
        _copy(sd, "norm", out, "post_layernorm")
        return out
    if "pre_norm.weight" in sd:
        raise ValueError("this ViT has a pre-LayerNorm (clip layout); export it with layout='clip'")
    out["embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.weight"].clone()
    out["embeddings.patch_embeddings.projection.bias"] = (
        patch_bias.clone() if patch_bias is not None else torch.zeros(D, dtype=sd["patch_embed.weight"].dtype)
    )
    out["embeddings.cls_token"] = sd["cls_token"].reshape(1, 1, D).clone()
    out["embeddings.position_embeddings"] = sd["pos_embed"].reshape(1, -1, D).clone()
    _copy_blocks(sd, out, shape.depth, "layers.", VIT_BLOCK_NAMES)
    _copy(sd, "norm", out, "layernorm")
    dtype = out["layernorm.weight"].dtype
    out["pooler.dense.weight"] = torch.eye(D, dtype=dtype)  # unused by LLaVA; identity rather than random
    out["pooler.dense.bias"] = torch.zeros(D, dtype=dtype)
    return out


def build_hf_vision_model(sd: dict[str, torch.Tensor], shape: VitShape):
    """A ViTModel / CLIPVisionModel holding exactly the canonical weights `sd` (strict load, eval mode)."""
    from transformers import CLIPVisionModel, ViTModel

    cls = CLIPVisionModel if shape.layout == "clip" else ViTModel
    model = cls(hf_config(shape))
    model.load_state_dict(canonical_to_hf(sd, shape), strict=True)
    return model.eval()


def openclip_to_canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip `visual.*` keys (OpenVision release layout) -> canonical keys; text tower and heads are dropped."""
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    out: dict[str, torch.Tensor] = {}
    out["patch_embed.weight"] = sd["conv1.weight"]
    if "conv1.bias" in sd:
        out["patch_embed.bias"] = sd["conv1.bias"]
    D = sd["conv1.weight"].shape[0]
    out["cls_token"] = sd["class_embedding"].reshape(1, 1, D)
    if "positional_embedding" not in sd:
        raise KeyError("open_clip weights without visual.positional_embedding are not supported")
    out["pos_embed"] = sd["positional_embedding"].reshape(1, -1, D)
    _copy(sd, "ln_pre", out, "pre_norm")
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        s, t = f"transformer.resblocks.{i}.", f"blocks.{i}."
        _copy(sd, s + "ln_1", out, t + "norm1")
        out[t + "attn.qkv.weight"] = sd[s + "attn.in_proj_weight"]
        if s + "attn.in_proj_bias" in sd:
            out[t + "attn.qkv.bias"] = sd[s + "attn.in_proj_bias"]
        _copy(sd, s + "attn.out_proj", out, t + "attn.proj")
        _copy(sd, s + "ln_2", out, t + "norm2")
        _copy(sd, s + "mlp.c_fc", out, t + "mlp.fc1")
        _copy(sd, s + "mlp.c_proj", out, t + "mlp.fc2")
        i += 1
    if i == 0:
        raise KeyError("no visual.transformer.resblocks.* weights found: not an open_clip ViT")
    _copy(sd, "ln_post", out, "norm")
    return out


def openclip_shape(config: dict, sd: dict[str, torch.Tensor]) -> VitShape:
    """VitShape from open_clip_config.json (`model_cfg.vision_cfg`) checked against the weights."""
    model_cfg = config.get("model_cfg", config)
    v = model_cfg.get("vision_cfg", {})
    width = int(v.get("width", sd["patch_embed.weight"].shape[0]))
    depth = sum(1 for k in sd if k.endswith(".norm1.weight"))
    if "layers" in v and int(v["layers"]) != depth:
        raise ValueError(f"open_clip_config says {v['layers']} layers, the weights hold {depth}")
    if v.get("ls_init_value") is not None:
        raise ValueError("open_clip layer-scale (ls_init_value) has no transformers ViT equivalent")
    head_width = int(v.get("head_width", 64))
    mlp_dim = sd["blocks.0.mlp.fc1.weight"].shape[0]
    norm_kwargs = v.get("norm_kwargs") or {}
    act_kwargs = v.get("act_kwargs") or {}
    if act_kwargs.get("approximate", "none") != "none":
        raise ValueError("tanh-approximate GELU towers are not supported")
    image_size = v.get("image_size", 224)
    return VitShape(
        image_size=int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size),
        patch_size=int(v.get("patch_size", sd["patch_embed.weight"].shape[-1])),
        width=width,
        depth=depth,
        heads=width // head_width,
        mlp_dim=mlp_dim,
        layout="clip" if "pre_norm.weight" in sd else "openvision",
        ln_eps=float(norm_kwargs.get("eps", 1e-5)),
        act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
    )
