"""Model and loss registry: `{family: builder}` and one `build_model(cfg)` that raises a clear error.

OV2, OV1 and CLIP share the ViT, tokenizer, data and trainer; they differ by preset only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from encoder.config import ModelConfig, TrainConfig


def _ov2(cfg: ModelConfig) -> nn.Module:
    from encoder.ov2 import OpenVision2

    return OpenVision2(cfg.vit, cfg.decoder, keep_ratio=cfg.keep_ratio, keep_at_eval=cfg.keep_at_eval)


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {"ov2": _ov2}


def register(family: str, builder: Callable[[ModelConfig], nn.Module]) -> None:
    MODELS[family] = builder


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.family not in MODELS:
        import encoder.contrastive_models  # noqa: F401  (the baselines register themselves on import)
    if cfg.family not in MODELS:
        raise ValueError(f"model family {cfg.family!r} is not available; known: {', '.join(sorted(MODELS))}")
    return MODELS[cfg.family](cfg)


def build_losses(cfg: TrainConfig) -> list[nn.Module]:
    """Loss modules for the family; each returns {"<name>_loss": tensor}."""
    from encoder.losses import CaptionLoss

    losses: list[nn.Module] = []
    if cfg.model.family in ("ov2", "ov1"):
        losses.append(CaptionLoss(cfg.model.caption_weight, impl=cfg.loss_impl))
    if cfg.model.family in ("ov1", "clip"):
        from encoder.contrastive import ContrastiveLoss

        losses.append(ContrastiveLoss())
    return losses
