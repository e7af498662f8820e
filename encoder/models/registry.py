"""The model families: one table `{family: (model class, loss classes)}` and one getter that raises a clear error.

OpenVision 2, OpenVision (v1) and CLIP share the ViT, tokenizer, data and trainer; they differ by preset only.
Every model class takes the same `ModelConfig`, takes tensors (the collate tokenises the texts named by the class's
`text_inputs(cfg)`), and returns a dict that its losses read; every loss class is built by `from_config(cfg)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from encoder.losses import CaptionLoss, ContrastiveLoss
from encoder.models.clip import CLIP
from encoder.models.ov1 import OpenVision1
from encoder.models.ov2 import OpenVision2

if TYPE_CHECKING:
    from encoder.config import ModelConfig, TrainConfig

FAMILIES: dict[str, tuple[type[nn.Module], tuple[type[nn.Module], ...]]] = {
    "ov2": (OpenVision2, (CaptionLoss,)),
    "ov1": (OpenVision1, (CaptionLoss, ContrastiveLoss)),
    "clip": (CLIP, (ContrastiveLoss,)),
}


def get_family(name: str) -> tuple[type[nn.Module], tuple[type[nn.Module], ...]]:
    """(model class, loss classes) of a family."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose from: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_model(cfg: ModelConfig) -> nn.Module:
    model_cls, _ = get_family(cfg.family)
    return model_cls(cfg)


def build_losses(cfg: TrainConfig) -> list[nn.Module]:
    """Loss modules of the run's family, in the table's order; each returns {"<name>_loss": tensor}."""
    _, loss_classes = get_family(cfg.model.family)
    return [loss_cls.from_config(cfg) for loss_cls in loss_classes]


def text_inputs(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
    """{batch key: (sample text field, token length)}: what the data collate tokenises for this family's model."""
    model_cls, _ = get_family(cfg.family)
    return model_cls.text_inputs(cfg)
