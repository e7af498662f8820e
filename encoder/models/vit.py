"""Vision Transformer in the OpenVision layout (and a CLIP layout), mapping 1:1 onto transformers.

pixels [B, 3, H, W] -> patch embed (Conv2d, no bias) -> [B, N, D] -> prepend cls -> + fixed 2-D sin-cos
position table (zero row for cls) -> (layout="clip": pre-LayerNorm) -> depth x pre-LN block -> tokens
[B, 1 + N, D]. The final LayerNorm `norm` is kept for pooled features and for exported weights, but
`forward` returns the last block's output without it (OpenVision 2 feeds that to its decoder).

Weight mapping: layout="openvision" is transformers' `ViTModel` (patch bias zero, the sin-cos table as
`position_embeddings`, eps 1e-6, exact GELU); layout="clip" is `CLIPVisionModel` with hidden_act "gelu".
The sin-cos table is computed for whatever grid the input has, so a model trained at 84 px runs at 224 px
without interpolation (the two-stage schedule relies on this).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from encoder.models.layers import Block


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_dim: int = 768
    layout: str = "openvision"  # "openvision" | "clip"
    ln_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@functools.lru_cache(maxsize=16)
def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> torch.Tensor:
    """[grid_h * grid_w, width] table in big_vision's order: sin(x), cos(x), sin(y), cos(y)."""
    if width % 4:
        raise ValueError(f"width {width} must be divisible by 4 for the 2-D sin-cos embedding")
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                          indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4 - 1))
    y = y.flatten()[:, None] * omega[None]
    x = x.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def position_table(grid_h: int, grid_w: int, width: int) -> torch.Tensor:
    """[1, 1 + N, D]: a zero row for cls, then the sin-cos rows of the patches."""
    return torch.cat([torch.zeros(1, width), sincos_2d(grid_h, grid_w, width)])[None]


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.layout not in ("openvision", "clip"):
            raise ValueError(f"unknown ViT layout {cfg.layout!r}; choose 'openvision' or 'clip'")
        self.cfg = cfg
        D = cfg.width
        self.patch_embed = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", position_table(cfg.grid, cfg.grid, D), persistent=False)
        self.pre_norm = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.layout == "clip" else nn.Identity()
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_dim, cfg.ln_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """big_vision-style init: LeCun-normal patch embedding (so pixels are not drowned by the position
        table at init), Xavier-uniform block matrices, zero biases, cls ~ N(0, 0.02)."""
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        fan_in = self.patch_embed.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embed.weight, std=fan_in**-0.5, a=-2 * fan_in**-0.5, b=2 * fan_in**-0.5)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # [B, D, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.position(h, w, x.device, x.dtype)

    def position(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1, 1 + h w, D] position table of an h x w grid on `device` in `dtype`: the buffer for the model's own grid,
        any other grid built once per (grid, device, dtype) and kept (a stage at another resolution would otherwise
        rebuild it on the host and copy it, a blocking host-to-device transfer, every micro-step)."""
        if (h, w) == (self.cfg.grid, self.cfg.grid):
            return self.pos_embed.to(device=device, dtype=dtype)
        key = (h, w, str(device), dtype)
        tables = self.__dict__.setdefault("_tables", {})  # not a buffer: never saved, never moved by .to()
        if key not in tables:
            tables[key] = position_table(h, w, self.cfg.width).to(device=device, dtype=dtype)
        return tables[key]

    def forward(self, pixels: torch.Tensor, output_hidden_states: bool = False) -> dict[str, torch.Tensor]:
        """tokens: [B, 1 + N, D] (last block, no final LN); hidden_states: embeddings + every block."""
        x = self.pre_norm(self.embed(pixels))  # hidden_states[0] is after the pre-LN, as in CLIPVisionModel
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        out = {"tokens": x}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden)
        return out

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, D]: mean of patch tokens (cls dropped), then the final LayerNorm (OpenVision v1 / CLIP head input)."""
        return self.norm(tokens[:, 1:].mean(dim=1))
