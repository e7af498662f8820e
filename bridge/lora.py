"""LoRA adapters on the frozen LLM for bridge stage 2 (`stage2.lora_r > 0`), through `peft`.

LLaVA-1.5 publishes a LoRA recipe beside full fine-tuning (r 128, alpha 256, LR 2e-4, the projector at 2e-5): the
LLM's weights stay frozen and low-rank adapters on every attention and MLP projection train instead, so stage 2
keeps no LLM gradients or AdamW state. Before export the adapters are merged into the weights they adapt
(W + B A alpha / r), so the exported folder is the same standard LlavaForConditionalGeneration as without LoRA.

    add_lora(model, r=16, alpha=32, seed=0)   # adapters on model.model.language_model (B = 0: no change yet)
    has_lora(model) -> bool
    merge_lora(model)                         # adapters folded in and removed; plain nn.Linear layers again
"""

from __future__ import annotations

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama / Qwen2 / Mistral


def add_lora(model, *, r: int, alpha: float, seed: int = 0) -> None:
    """Low-rank adapters on every TARGETS linear of the LLM; their A is random (seeded), their B zero."""
    from peft import LoraConfig, inject_adapter_in_model

    llm = model.model.language_model
    if not any(name.rsplit(".", 1)[-1] in TARGETS for name, _ in llm.named_modules()):
        raise ValueError(f"no LoRA target ({', '.join(TARGETS)}) in this LLM")
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(TARGETS))
    inject_adapter_in_model(config, llm)


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if "lora_" in name]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base layer and put the base layer back in its place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    if has_lora(model):
        raise RuntimeError("LoRA parameters left after merging")
